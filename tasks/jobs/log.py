"""Per-job event logs in Redis: append with a sequence number, replay from any point, follow live.

Each job has a hash (`dawet:job:{id}`, holding the job and the last sequence number) and a
Stream (`dawet:job:{id}:log`) whose entry ids are `<seq>-0`, so "replay after seq N" is a
plain XRANGE. Appends also PUBLISH "<seq> <event>" on `dawet:wake:<id>`, which followers
take live (tasks/jobs/feed.py).
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import defaultdict
from typing import Any, NamedTuple

import redis

from tasks.jobs.contract import TERMINAL_TYPES, Event, Job

logger = logging.getLogger(__name__)

CANCEL_PATTERN = "dawet:cancel:*"
RETRY_SECONDS = 1.0  # between attempts to re-subscribe after losing Redis
WRITE_BATCH = 256  # the most events EventWriter sends in one round trip

_APPEND_EVENT = """
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('XADD', KEYS[2], seq .. '-0', 'event', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('PUBLISH', ARGV[3], seq .. ' ' .. ARGV[1])
"""
_APPEND = _APPEND_EVENT + "return seq\n"

# A job's start: -1 if its log already ends (with an event of a type in ARGV[4:]), else
# append the `started` event and answer whether a cancel was requested (KEYS[3], its flag).
_START = """
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1]
if last then
  local kind = cjson.decode(last[2][2])['type']
  for i = 4, #ARGV do
    if kind == ARGV[i] then return -1 end
  end
end
""" + _APPEND_EVENT + "return redis.call('EXISTS', KEYS[3])\n"


def _job_key(job_id: str) -> str:
    return f"dawet:job:{{{job_id}}}"  # {id} keeps a job's keys in one cluster slot


def _log_key(job_id: str) -> str:
    return f"{_job_key(job_id)}:log"


def _cancel_key(job_id: str) -> str:
    return f"{_job_key(job_id)}:cancel"


def wake_channel(job_id: str) -> str:
    return f"dawet:wake:{job_id}"


def _cancel_channel(job_id: str) -> str:
    return f"dawet:cancel:{job_id}"


class JobStart(NamedTuple):
    """What a worker learns as it starts a job."""

    ended_before: bool  # the log already ends: nothing was appended, the job must not run
    cancel_requested: bool


class JobStore:
    """Job records, event logs and cancel flags in one Redis."""

    def __init__(self, client: redis.Redis, ttl_seconds: int):
        self.redis = client
        self.ttl = ttl_seconds
        self._append = client.register_script(_APPEND)
        self._start = client.register_script(_START)

    def create(self, job: Job, first: Event | None = None) -> None:
        """Record a new job, its log empty or holding `first`, in one round trip."""
        key = _job_key(job.id)

        def commands(pipe: redis.client.Pipeline) -> None:
            pipe.hset(key, mapping={"job": job.model_dump_json(), "seq": 0})
            pipe.expire(key, self.ttl)
            if first is not None:
                self._append_in(pipe, job.id, first)

        self._pipelined(commands)

    def exists(self, job_id: str) -> bool:
        return bool(self.redis.exists(_job_key(job_id)))

    def load(self, job_id: str) -> Job | None:
        raw = self.redis.hget(_job_key(job_id), "job")
        return Job.model_validate_json(raw) if raw else None

    def append(self, job_id: str, event: Event) -> int:
        """Append an event and wake followers; returns its sequence number."""
        return int(self._append(**self._append_call(job_id, event)))

    def start(self, job_id: str, started: Event) -> JobStart:
        """Append the job's `started` event unless its log already ended (a redelivered task
        of a finished job), and read its cancel flag: one round trip at every job's start."""
        call = self._append_call(job_id, started)
        answer = int(self._start(keys=[*call["keys"], _cancel_key(job_id)],
                                 args=[*call["args"], *sorted(TERMINAL_TYPES)]))
        return JobStart(ended_before=answer < 0, cancel_requested=answer > 0)

    def append_many(self, events: list[tuple[str, Event]]) -> None:
        """Append (job id, event) pairs in one round trip, each job's in the given order."""
        def commands(pipe: redis.client.Pipeline) -> None:
            for job_id, event in events:
                self._append_in(pipe, job_id, event)

        self._pipelined(commands)

    def _append_call(self, job_id: str, event: Event) -> dict[str, list]:
        return {"keys": [_job_key(job_id), _log_key(job_id)],
                "args": [json.dumps(event.to_dict()), self.ttl, wake_channel(job_id)]}

    def _append_in(self, pipe: redis.client.Pipeline, job_id: str, event: Event) -> None:
        call = self._append_call(job_id, event)
        pipe.evalsha(self._append.sha, len(call["keys"]), *call["keys"], *call["args"])

    def _pipelined(self, commands) -> None:
        """Run `commands(pipe)` in one round trip. The append script goes by its digest: a
        Script in a pipeline costs a SCRIPT EXISTS round trip first, on every execution. If
        Redis lost its scripts (a restart), load it and run the commands again."""
        for attempt in (1, 2):
            with self.redis.pipeline(transaction=False) as pipe:
                commands(pipe)
                try:
                    pipe.execute()
                    return
                except redis.exceptions.NoScriptError:
                    if attempt == 2:
                        raise
                    self.redis.script_load(_APPEND)

    def read(self, job_id: str, after: int = 0) -> list[dict[str, Any]]:
        """Events with seq > after, in order, each with its `seq`."""
        entries = self.redis.xrange(_log_key(job_id), min=f"({after}-0", max="+")
        return [_decode(entry_id, fields) for entry_id, fields in entries]

    def read_existing(self, job_id: str, after: int = 0) -> list[dict[str, Any]] | None:
        """As `read`, in the same round trip as a check that the job exists: None if not."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(_job_key(job_id))
            pipe.xrange(_log_key(job_id), min=f"({after}-0", max="+")
            exists, entries = pipe.execute()
        if not exists:
            return None
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

    def cancelled(self, job_ids: list[str]) -> list[bool]:
        """Whether each job's cancel was requested, in one round trip."""
        if not job_ids:
            return []
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.exists(_cancel_key(job_id))
            return [bool(found) for found in pipe.execute()]


class EventWriteFailed(RuntimeError):
    """An event of the job could not be written to its log."""


class EventWriter:
    """Appends the token events of all of a worker's jobs from one thread, many per round trip.

    The jobs' step sinks (on the engine's reader thread, or its scheduler thread when it runs
    in this process) queue events without waiting for Redis; the writer sends all that queued
    up meanwhile as one pipeline, so under load a whole decode step's events cost one round
    trip instead of one each. A job's events are written in order; `flush` waits for them and
    raises if one could not be written, so a job never ends with a hole in its text.
    """

    def __init__(self, store: JobStore):
        self._store = store
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._failed: dict[str, Exception] = {}
        threading.Thread(target=self._run, name="dawet-event-writer", daemon=True).start()

    def send(self, job_id: str, event: Event) -> None:
        """Queue an event for the job's log; raises if an earlier one failed to be written."""
        if job_id in self._failed:
            raise EventWriteFailed(job_id) from self._failed[job_id]
        self._queue.put((job_id, event))

    def flush(self, job_id: str) -> None:
        """Wait until the job's queued events are written; raise if one of them was not."""
        written = threading.Event()
        self._queue.put((job_id, written))
        written.wait()
        failure = self._failed.pop(job_id, None)
        if failure is not None:
            raise EventWriteFailed(job_id) from failure

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < WRITE_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._write(batch)

    def _write(self, batch: list[tuple[str, Any]]) -> None:
        events = [(job_id, item) for job_id, item in batch if not isinstance(item, threading.Event)]
        try:
            if events:
                self._store.append_many(events)
        except Exception as exc:  # noqa: BLE001 - reported to each job's runner at its flush
            logger.warning("could not write %d job events: %s", len(events), exc)
            for job_id, _ in events:
                self._failed[job_id] = exc
        for _, item in batch:
            if isinstance(item, threading.Event):
                item.set()


def _decode(entry_id: bytes | str, fields: dict) -> dict[str, Any]:
    raw = fields.get(b"event", fields.get("event"))
    return {"seq": int(as_text(entry_id).split("-", 1)[0]), **json.loads(raw)}


class CancelListener:
    """Sets a running job's cancel event when a cancel for it is requested.

    One pattern subscription per worker hears cancels at once. A message sent while the
    connection is down is lost, so every `poll_seconds` one round trip also checks the cancel
    flags of all the jobs it watches. Give it a client of its own: a listener thread must share
    no connection pool with threads that outlive it (a pool lock held by a daemon thread frozen
    at exit deadlocks the exit).
    """

    def __init__(self, client: redis.Redis, store: JobStore, poll_seconds: float):
        self._client, self._store, self._poll_seconds = client, store, poll_seconds
        self._events: dict[str, set[threading.Event]] = defaultdict(set)
        self._lock = threading.Lock()
        self._started = False
        self._closed = threading.Event()

    def close(self) -> None:
        """Stop listening within `poll_seconds` and drop the connection."""
        self._closed.set()

    def start(self) -> None:
        """Subscribe now instead of at the first watch."""
        with self._lock:
            if not self._started:
                self._started = True
                threading.Thread(target=self._run, name="dawet-cancels", daemon=True).start()

    def watch(self, job_id: str) -> threading.Event:
        """An event set once a cancel for the job is requested from now on. One requested
        before is read by the caller after this call (JobStore.start reads the flag)."""
        self.start()
        event = threading.Event()
        with self._lock:
            self._events[job_id].add(event)
        return event

    def unwatch(self, job_id: str, event: threading.Event) -> None:
        with self._lock:
            events = self._events.get(job_id)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._events[job_id]

    def _run(self) -> None:
        """Listen and poll until closed; on a lost connection, retry (redis-py re-subscribes)."""
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        next_poll = 0.0
        while not self._closed.is_set():
            try:
                if not pubsub.subscribed:
                    pubsub.psubscribe(CANCEL_PATTERN)
                message = pubsub.get_message(timeout=self._poll_seconds)
                if message is not None:
                    self._set(job_of_channel(message["channel"]))
                if time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + self._poll_seconds
                    self._poll()
            except redis.RedisError:
                logger.warning("cancel listener lost Redis; retrying")
                self._closed.wait(RETRY_SECONDS)
        pubsub.close()

    def _poll(self) -> None:
        with self._lock:
            job_ids = list(self._events)
        for job_id, cancelled in zip(job_ids, self._store.cancelled(job_ids)):
            if cancelled:
                self._set(job_id)

    def _set(self, job_id: str) -> None:
        with self._lock:
            events = list(self._events.get(job_id, ()))
        for event in events:
            event.set()


def as_text(value: bytes | str) -> str:
    """A Redis reply as str, whether the client decodes responses or not."""
    return value.decode() if isinstance(value, bytes) else value


def job_of_channel(channel: bytes | str) -> str:
    """The job id that ends a wake or cancel channel's name."""
    return as_text(channel).rsplit(":", 1)[-1]
