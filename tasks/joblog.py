"""Per-job event logs in Redis: append with a sequence number, replay from any point, follow live.

Each job has a hash (`dawet:job:{id}`, holding the job and the last sequence number) and a
Stream (`dawet:job:{id}:log`) whose entry ids are `<seq>-0`, so "replay after seq N" is a
plain XRANGE. Appends also PUBLISH the seq on `dawet:wake:<id>`; one subscriber thread per
process wakes every follower of that job, so a follower holds no Redis connection while it
waits. Pub/sub may drop a message; followers re-read the Stream after every wake-up and on
a short timer, so nothing is lost.
"""
from __future__ import annotations

import json
import logging
import threading
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import redis

from tasks.contract import Event, Job, is_terminal

logger = logging.getLogger(__name__)

WAKE_PATTERN = "dawet:wake:*"
CANCEL_PATTERN = "dawet:cancel:*"
RECHECK_SECONDS = 1.0  # re-read the log this often even without a wake-up

_APPEND = """
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('XADD', KEYS[2], seq .. '-0', 'event', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('PUBLISH', ARGV[3], seq)
return seq
"""


class StreamIdle(Exception):
    """No event arrived within the idle timeout."""


def _job_key(job_id: str) -> str:
    return f"dawet:job:{{{job_id}}}"  # {id} keeps a job's keys in one cluster slot


def _log_key(job_id: str) -> str:
    return f"{_job_key(job_id)}:log"


def _cancel_key(job_id: str) -> str:
    return f"{_job_key(job_id)}:cancel"


def _wake_channel(job_id: str) -> str:
    return f"dawet:wake:{job_id}"


def _cancel_channel(job_id: str) -> str:
    return f"dawet:cancel:{job_id}"


class JobStore:
    """Job records, event logs and cancel flags in one Redis."""

    def __init__(self, client: redis.Redis, ttl_seconds: int):
        self.redis = client
        self.ttl = ttl_seconds
        self._append = client.register_script(_APPEND)

    def create(self, job: Job) -> None:
        """Record a new job; its log starts empty."""
        key = _job_key(job.id)
        self.redis.hset(key, mapping={"job": job.model_dump_json(), "seq": 0})
        self.redis.expire(key, self.ttl)

    def exists(self, job_id: str) -> bool:
        return bool(self.redis.exists(_job_key(job_id)))

    def load(self, job_id: str) -> Job | None:
        raw = self.redis.hget(_job_key(job_id), "job")
        return Job.model_validate_json(raw) if raw else None

    def append(self, job_id: str, event: Event) -> int:
        """Append an event and wake followers; returns its sequence number."""
        keys = [_job_key(job_id), _log_key(job_id)]
        return int(self._append(keys=keys, args=[json.dumps(event.to_dict()), self.ttl,
                                                 _wake_channel(job_id)]))

    def read(self, job_id: str, after: int = 0) -> list[dict[str, Any]]:
        """Events with seq > after, in order, each with its `seq`."""
        entries = self.redis.xrange(_log_key(job_id), min=f"({after}-0", max="+")
        return [_decode(entry_id, fields) for entry_id, fields in entries]

    def last_event(self, job_id: str) -> dict[str, Any] | None:
        """The newest event of a job, or None before the first."""
        entries = self.redis.xrevrange(_log_key(job_id), count=1)
        return _decode(*entries[0]) if entries else None

    def cancel(self, job_id: str) -> None:
        """Ask the worker running this job to stop it: a flag, then a message its worker hears."""
        with self.redis.pipeline() as pipe:
            pipe.set(_cancel_key(job_id), 1, ex=self.ttl)
            pipe.publish(_cancel_channel(job_id), 1)
            pipe.execute()

    def is_cancelled(self, job_id: str) -> bool:
        return bool(self.redis.exists(_cancel_key(job_id)))


def _decode(entry_id: bytes | str, fields: dict) -> dict[str, Any]:
    entry_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    raw = fields.get(b"event", fields.get("event"))
    return {"seq": int(entry_id.split("-", 1)[0]), **json.loads(raw)}


class Notifier:
    """One pub/sub subscription per process that wakes the followers of each job.

    With the cancel pattern, a worker's runner watches its running jobs' cancel messages. A
    lost connection wakes every follower only when `wake_all_on_loss` (they re-read the log);
    cancels must not, so their fallback is the runner polling the cancel flag.
    """

    def __init__(self, client: redis.Redis, pattern: str = WAKE_PATTERN,
                 wake_all_on_loss: bool = True):
        self._client, self._pattern = client, pattern
        self._wake_all_on_loss = wake_all_on_loss
        self._waiters: dict[str, set[threading.Event]] = defaultdict(set)
        self._lock = threading.Lock()
        self._started = False

    def start(self) -> None:
        """Subscribe now instead of at the first watch."""
        self._ensure_started()

    def watch(self, job_id: str) -> threading.Event:
        """Register interest in a job; the returned event is set on each append."""
        self._ensure_started()
        wake = threading.Event()
        with self._lock:
            self._waiters[job_id].add(wake)
        return wake

    def unwatch(self, job_id: str, wake: threading.Event) -> None:
        with self._lock:
            waiters = self._waiters.get(job_id)
            if waiters is not None:
                waiters.discard(wake)
                if not waiters:
                    del self._waiters[job_id]

    def _ensure_started(self) -> None:
        with self._lock:
            if not self._started:
                self._started = True
                threading.Thread(target=self._run, name="dawet-notifier", daemon=True).start()

    def _run(self) -> None:
        """Listen forever; on a lost connection, wake everyone (they re-read) and retry."""
        while True:
            try:
                pubsub = self._client.pubsub(ignore_subscribe_messages=True)
                pubsub.psubscribe(self._pattern)
                for message in pubsub.listen():
                    self._wake(message["channel"])
            except redis.RedisError:
                logger.warning("job notifier lost Redis; retrying")
                if self._wake_all_on_loss:
                    self._wake_all()
                threading.Event().wait(RECHECK_SECONDS)

    def _wake(self, channel: bytes | str) -> None:
        channel = channel.decode() if isinstance(channel, bytes) else channel
        job_id = channel.rsplit(":", 1)[-1]
        with self._lock:
            waiters = list(self._waiters.get(job_id, ()))
        for wake in waiters:
            wake.set()

    def _wake_all(self) -> None:
        with self._lock:
            waiters = [w for group in self._waiters.values() for w in group]
        for wake in waiters:
            wake.set()


def _ended_by(last: dict[str, Any] | None, after: int) -> bool:
    return last is not None and is_terminal(last) and last["seq"] <= after


def follow(store: JobStore, notifier: Notifier, job_id: str, after: int,
           idle_timeout: float) -> Iterator[dict[str, Any]]:
    """Replay events after `after`, then follow live until a terminal event.

    Raises StreamIdle when no event arrives for `idle_timeout` seconds.
    """
    wake = notifier.watch(job_id)
    try:
        idle = 0.0
        while True:
            wake.clear()  # before reading, so an append during the read still wakes us
            events = store.read(job_id, after)
            for event in events:
                yield event
                if is_terminal(event):
                    return
            if not events and _ended_by(store.last_event(job_id), after):
                return  # a reader that resumes after the last event of a finished job
            after = events[-1]["seq"] if events else after
            idle = 0.0 if events else idle
            if not wake.wait(RECHECK_SECONDS):
                idle += RECHECK_SECONDS
                if idle >= idle_timeout:
                    raise StreamIdle(job_id)
    finally:
        notifier.unwatch(job_id, wake)
