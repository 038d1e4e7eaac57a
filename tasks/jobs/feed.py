"""Follow a job's events live: replay its log, then take each event as it is published.

An append PUBLISHes the event itself on `dawet:wake:<id>` (tasks/jobs/log.py), and each process
holds one pub/sub connection, subscribed only to the jobs it relays right now. So a follower
usually takes events straight from the message, with no read, and a process never hears the
jobs of others. Pub/sub loses the messages sent while a connection is down and those sent
before a subscription takes effect, so a follower reads the log once its subscription is
confirmed (one read: what the log lacks then, a message brings), and a re-subscription after a
reconnect, a gap in the sequence numbers and a quiet second each make it read the log again.
"""
from __future__ import annotations

import json
import logging
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis

from tasks.jobs.contract import is_terminal
from tasks.jobs.log import JobStore, as_text, job_of_channel, wake_channel

logger = logging.getLogger(__name__)

RECHECK_SECONDS = 1.0  # re-read the log this often even without a message
CONTROL_CHANNEL = wake_channel("-")  # keeps the connection subscribed while no job is followed
RESYNC = None  # an inbox item meaning "re-read the log": messages may have been missed


class StreamIdle(Exception):
    """No event arrived within the idle timeout."""


class JobNotFound(LookupError):
    """The job to follow does not exist (or its records expired)."""


class Inbox:
    """What the feed delivered to one follower: (seq, raw event) pairs and RESYNC marks."""

    def __init__(self):
        self.ready = threading.Event()
        self._items: deque[tuple[int, str] | None] = deque()

    def put(self, item: tuple[int, str] | None) -> None:
        self._items.append(item)
        self.ready.set()

    def events_after(self, after: int) -> list[dict[str, Any]] | None:
        """The delivered events that follow `after` without a gap, or None to re-read the log."""
        self.ready.clear()  # before draining, so a message arriving now sets it again
        items = [self._items.popleft() for _ in range(len(self._items))]
        if RESYNC in items:
            return None
        events = []
        for seq, raw in items:
            if seq <= after:
                continue  # already read from the log
            if seq != after + 1:
                return None  # a message went missing
            events.append({"seq": seq, **json.loads(raw)})
            after = seq
        return events


class JobFeed:
    """One pub/sub connection per process, subscribed to the jobs someone follows now.

    Give it a client of its own: a listener thread must share no connection pool with threads
    that outlive it (a pool lock held by a daemon thread frozen at exit deadlocks the exit).
    """

    def __init__(self, client: redis.Redis):
        self._pubsub = client.pubsub()
        self._inboxes: dict[str, set[Inbox]] = {}
        self._confirmed: set[str] = set()  # jobs whose subscription Redis has confirmed
        self._lock = threading.Lock()
        self._started = False
        self._closed = threading.Event()

    def close(self) -> None:
        """Stop listening within a second and drop the connection."""
        self._closed.set()

    @contextmanager
    def subscription(self, job_id: str) -> Iterator[Inbox]:
        """An inbox that receives the job's events while the block runs. Its first item is a
        RESYNC once the subscription is in effect: from then on, no event is missed."""
        inbox = Inbox()
        self._add(job_id, inbox)
        try:
            yield inbox
        finally:
            self._remove(job_id, inbox)

    def _add(self, job_id: str, inbox: Inbox) -> None:
        with self._lock:
            self._ensure_started()
            inboxes = self._inboxes.get(job_id)
            if inboxes is None:  # the first follower: subscribe, and record it once that worked
                self._pubsub.subscribe(wake_channel(job_id))
                inboxes = self._inboxes[job_id] = set()
            elif job_id in self._confirmed:  # no confirmation is coming for this one
                inbox.put(RESYNC)
            inboxes.add(inbox)

    def _remove(self, job_id: str, inbox: Inbox) -> None:
        with self._lock:
            inboxes = self._inboxes.get(job_id)
            if inboxes is None:
                return
            inboxes.discard(inbox)
            if not inboxes:
                del self._inboxes[job_id]
                self._confirmed.discard(job_id)
                try:
                    self._pubsub.unsubscribe(wake_channel(job_id))
                except redis.RedisError:
                    pass  # the connection is down; a stale subscription's messages find no inbox

    def _ensure_started(self) -> None:
        """Subscribe the control channel and start the listener (under the lock)."""
        if not self._started:
            self._pubsub.subscribe(CONTROL_CHANNEL)
            threading.Thread(target=self._run, name="dawet-job-feed", daemon=True).start()
            self._started = True

    def _run(self) -> None:
        """Listen until closed; on a lost connection, have everyone re-read, and retry."""
        while not self._closed.is_set():
            try:
                message = self._pubsub.get_message(timeout=RECHECK_SECONDS)
                if message is not None:
                    self._dispatch(message)
            except Exception:  # noqa: BLE001 - the listener must outlive any failure
                logger.warning("job feed lost Redis; retrying", exc_info=True)
                self._resync_all()
                self._closed.wait(RECHECK_SECONDS)
        self._pubsub.close()

    def _dispatch(self, message: dict[str, Any]) -> None:
        if message["type"] == "subscribe":
            item = RESYNC  # events appended before the subscription took effect were missed
        elif message["type"] == "message":
            seq, _, raw = as_text(message["data"]).partition(" ")
            item = (int(seq), raw)
        else:
            return
        job_id = job_of_channel(message["channel"])
        with self._lock:
            inboxes = list(self._inboxes.get(job_id, ()))
            if item is RESYNC and inboxes:
                self._confirmed.add(job_id)
        for inbox in inboxes:
            inbox.put(item)

    def _resync_all(self) -> None:
        with self._lock:
            self._confirmed.clear()  # redis-py subscribes again on reconnecting: confirmed anew
            inboxes = [inbox for group in self._inboxes.values() for inbox in group]
        for inbox in inboxes:
            inbox.put(RESYNC)


def _ended_by(last: dict[str, Any] | None, after: int) -> bool:
    return last is not None and is_terminal(last) and last["seq"] <= after


def follow(store: JobStore, feed: JobFeed, job_id: str, after: int,
           idle_timeout: float) -> Iterator[dict[str, Any]]:
    """Replay events after `after`, then follow live until a terminal event.

    Raises JobNotFound for an unknown job, and StreamIdle when a running job sends no event
    for `idle_timeout` seconds: the silence of a worker, not the wait in the queue (which a
    job's deadline bounds). A stream that resumes mid-job counts it as running.
    """
    with feed.subscription(job_id) as inbox:
        inbox.ready.wait(RECHECK_SECONDS)  # the confirmation: then one read misses nothing
        inbox.events_after(after)  # whatever came with it is in the log too
        events = store.read_existing(job_id, after)
        if events is None:
            raise JobNotFound(job_id)
        if not events and _ended_by(store.last_event(job_id), after):
            return  # a reader that resumes after the last event of a finished job
        idle, running = 0.0, after > 0
        while True:
            for event in events:
                yield event
                if is_terminal(event):
                    return
                after = event["seq"]
                if event["type"] == "status":  # queued or restarted: back in a queue
                    running = event["state"] == "started"
            woke = inbox.ready.wait(RECHECK_SECONDS)
            events = inbox.events_after(after) if woke else None
            if events is None:
                events = store.read(job_id, after)
            if events:
                idle = 0.0
            elif not woke and running:
                idle += RECHECK_SECONDS
                if idle >= idle_timeout:
                    raise StreamIdle(job_id)
