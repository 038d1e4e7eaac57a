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

from tasks.jobs.background import survive
from tasks.jobs.contract import TERMINAL_TYPES, Event, Job
from tasks.jobs.usage import SETTLE_LUA

logger = logging.getLogger(__name__)

CANCEL_PATTERN = "dawet:cancel:*"
LEASES_KEY = "dawet:leases"  # running jobs' leases (tasks/jobs/leases.py)
OWNERS_KEY = "dawet:lease-owners"
RETRY_SECONDS = 1.0  # between attempts to re-subscribe after losing Redis
WRITE_BATCH = 256  # the most events EventWriter sends in one round trip
RETRY_FIRST_SECONDS, RETRY_MAX_SECONDS = 0.05, 2.0  # backoff of an attempt's retried writes

# Every append: KEYS job hash, log Stream, leases, lease owners; ARGV event, TTL, wake channel,
# the writer's fence (0: no attempt's write, as the API's `queued` or the reaper's
# `restarted`), "1" for a terminal event, the job id, and the attempt's write number (1, 2, ...
# per fence; 0 for unfenced writes). Refused (-1) after a terminal event, and (-2) when the
# fence is not the job's current one: a stale attempt, fenced out when its lease was reaped,
# writes nothing. A write whose number this attempt already wrote is a retry whose first try
# went through (-3): nothing is written twice. A write whose predecessor in its attempt is
# missing (-4) finds a log that went backwards: a failover to a replica that had not received
# the attempt's latest writes; JobStore writes them again first. A terminal event releases the
# job's lease and settles its key's usage in the same step.
_GUARD = """
local number = tonumber(ARGV[7])
local wfence, wnumber = string.match(redis.call('HGET', KEYS[1], 'written') or '', '(%d+):(%d+)')
wnumber = tonumber(wnumber) or 0
if number > 0 and wfence == ARGV[4] and wnumber >= number then return -3 end
if redis.call('HGET', KEYS[1], 'ended') then return -1 end
if ARGV[4] ~= '0' and redis.call('HGET', KEYS[1], 'fence') ~= ARGV[4] then return -2 end
if number > 1 and (wfence ~= ARGV[4] or wnumber < number - 1) then return -4 end
if number > 0 then redis.call('HSET', KEYS[1], 'written', ARGV[4] .. ':' .. ARGV[7]) end
"""
_WRITE = """
if ARGV[5] == '1' then
  settle_usage()
  redis.call('HSET', KEYS[1], 'ended', 1)
  redis.call('ZREM', KEYS[3], ARGV[6])
  redis.call('HDEL', KEYS[4], ARGV[6])
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('XADD', KEYS[2], seq .. '-0', 'event', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('PUBLISH', ARGV[3], seq .. ' ' .. ARGV[1])
"""
_APPEND = SETTLE_LUA + _GUARD + _WRITE + "return seq\n"
# A job's start: as an append, then whether a cancel was requested (KEYS[5], its flag).
_START = SETTLE_LUA + _GUARD + _WRITE + "return redis.call('EXISTS', KEYS[5])\n"
ENDED, FENCED, WRITTEN, LOST = -1, -2, -3, -4  # what a refused append answers


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


def _indexed(job: Job) -> dict[str, str | int]:
    """Job fields its hash keeps apart, for the scripts and the ownership check to read."""
    fields: dict[str, str | int] = {"model": job.model}
    if job.owner is not None:
        fields["owner"] = job.owner
    if job.charge is not None:
        fields |= {"usage_day": job.charge.day, "held": job.charge.held}
    return fields


class JobStart(NamedTuple):
    """What a worker learns as it starts a job."""

    ended_before: bool  # the log already ends: nothing was appended, the job must not run
    cancel_requested: bool
    fenced: bool = False  # another attempt holds the job: nothing was appended


class StaleAttempt(RuntimeError):
    """The job's log refused this attempt's write: its lease was reaped, or the job ended."""


class _Write(dict):
    """One call of the append script, as its Script takes it: {"keys": [...], "args": [event,
    TTL, wake channel, fence, terminal, job id, write number]} (see _APPEND)."""

    @property
    def attempt(self) -> tuple[str, int]:
        return self["args"][5], self["args"][3]

    @property
    def number(self) -> int:
        return self["args"][6]


class JobStore:
    """Job records, event logs and cancel flags in one Redis."""

    def __init__(self, client: redis.Redis, ttl_seconds: int, retry_seconds: float = 0.0,
                 replica_wait: float = 0.0):
        self.redis = client
        self.ttl = ttl_seconds
        self.retry_seconds = retry_seconds  # how long an attempt's writes retry a lost Redis
        self.replica_wait = replica_wait  # how long milestones wait for a replica; 0: never
        # Each running attempt's writes, kept until it ends in case a failover loses some.
        self._writes: dict[tuple[str, int], list[_Write]] = {}
        self._writes_lock = threading.Lock()
        self._append = client.register_script(_APPEND)
        self._start = client.register_script(_START)

    def create(self, job: Job, first: Event | None = None) -> None:
        """Record a new job, its log empty or holding `first`, in one round trip."""

        def commands(pipe: redis.client.Pipeline) -> None:
            self._record_in(pipe, job)
            if first is not None:
                self._append_in(pipe, job.id, first)

        self._pipelined(commands)

    def create_in(self, pipe: redis.client.Pipeline, job: Job, first: Event) -> None:
        """Record a new job and its first event on the caller's pipeline, before commands of
        its own (the job's broker message, api/broker.py). The append goes by the script's
        text: a digest that Redis lost (a restart) would fail the record alone, while the
        pipeline's other commands ran."""
        self._record_in(pipe, job)
        write = self._append_call(job.id, first)
        pipe.eval(_APPEND, len(write["keys"]), *write["keys"], *write["args"])

    def _record_in(self, pipe: redis.client.Pipeline, job: Job) -> None:
        key = _job_key(job.id)
        pipe.hset(key, mapping={"job": job.model_dump_json(), "seq": 0, **_indexed(job)})
        pipe.expire(key, self.ttl)

    def exists(self, job_id: str) -> bool:
        return bool(self.redis.exists(_job_key(job_id)))

    def owner(self, job_id: str) -> tuple[bool, str | None]:
        """Whether the job exists, and the name of the key that created it."""
        seq, owner = self.redis.hmget(_job_key(job_id), "seq", "owner")
        return seq is not None, as_text(owner) if owner is not None else None

    def load(self, job_id: str) -> Job | None:
        raw = self.redis.hget(_job_key(job_id), "job")
        return Job.model_validate_json(raw) if raw else None

    def append(self, job_id: str, event: Event, fence: int = 0) -> int | None:
        """Append an event and wake followers; returns its sequence number (0 if a retry found
        it written), or None if the log refused it (the job ended, or `fence` is not the job's
        current attempt). An attempt's writes retry a lost Redis for `retry_seconds`."""
        seq = self._send(self._append_call(job_id, event, fence))
        return None if seq in (ENDED, FENCED) else max(seq, 0)

    def start(self, job_id: str, started: Event, fence: int = 0) -> JobStart:
        """Append the job's `started` event unless its log already ended (a redelivered task
        of a finished job) or another attempt holds it, and read its cancel flag: one round
        trip at every job's start."""
        write = self._append_call(job_id, started, fence)
        answer = int(self._retrying(lambda: self._start(
            keys=[*write["keys"], _cancel_key(job_id)], args=write["args"])))
        if answer >= 0:  # the claim, the broker's delivery and the start, on a replica
            self.replicate(job_id)
        return JobStart(ended_before=answer == ENDED, cancel_requested=answer > 0,
                        fenced=answer == FENCED)

    def append_many(self, events: list[tuple[str, int, Event]]) -> list[bool]:
        """Append (job id, fence, event) triples in one round trip, each job's in the given
        order; returns whether each was written (now, or by an earlier try)."""
        writes = [self._append_call(job_id, event, fence) for job_id, fence, event in events]

        def commands(pipe: redis.client.Pipeline) -> None:
            for write in writes:
                pipe.evalsha(self._append.sha, len(write["keys"]), *write["keys"], *write["args"])

        replies = [int(seq) for seq in self._retrying(lambda: self._pipelined(commands))]
        # In order: an attempt's writes after a lost one were refused as lost too.
        replies = [self._send(w) if seq == LOST else seq for w, seq in zip(writes, replies)]
        return [seq not in (ENDED, FENCED) for seq in replies]

    def forget(self, job_id: str, fence: int) -> None:
        """The attempt ended: drop its writes and their numbering."""
        with self._writes_lock:
            self._writes.pop((job_id, fence), None)

    def replicate(self, job_id: str) -> int | None:
        """Wait up to `replica_wait` seconds for a replica to hold everything written to the
        primary so far, this job's records included: how many replicas do (None: this store
        does not wait). Best effort: a failure is only logged."""
        if not self.replica_wait:
            return None  # no round trip: on every submission's path and every job's start
        try:
            return self._replicated(job_id, 0)[0]
        except redis.RedisError as exc:
            logger.warning("job %s: could not wait for a replica (%s)", job_id, exc)
            return 0

    def confirm(self, job_id: str, fence: int) -> None:
        """Attempt `fence` ran to its end; before its worker acknowledges the job, make sure
        that the primary holds all its writes, and a replica too. A failover can lose an
        attempt's last writes, and no later write of it would notice: here the job's `written`
        mark, read after the WAIT from whichever primary answered it, shows them missing, and
        they are written again. Raises if Redis stays unreachable (the message then goes
        back to the queue)."""
        with self._writes_lock:
            last = (self._writes.get((job_id, fence)) or [None])[-1]
        if last is None:
            return
        while self._retrying(lambda: self._replicated(job_id, fence))[1] < last.number:
            if self._send(last) in (ENDED, FENCED):
                return  # another attempt has the job now

    def _replicated(self, job_id: str, fence: int) -> tuple[int | None, int]:
        """Wait (up to `replica_wait`; not at all when 0) for a replica to hold everything
        written so far, then read the number of attempt `fence`'s last write the log holds:
        (the replicas that confirmed, or None; that number)."""
        with self.redis.pipeline(transaction=False) as pipe:
            if self.replica_wait:
                # WAIT waits for this connection's last write; a write now follows every
                # earlier write to this primary (another connection's claim or queue push).
                pipe.expire(_job_key(job_id), self.ttl)
                pipe.wait(1, max(1, round(self.replica_wait * 1000)))
            pipe.hget(_job_key(job_id), "written")
            *waited, written = pipe.execute()
        replicas = waited[1] if waited else None
        if replicas == 0:
            logger.warning("job %s: no replica confirmed its writes within %.1f s; a failover "
                           "now could lose them", job_id, self.replica_wait)
        return replicas, _held_number(written, fence)

    def _append_call(self, job_id: str, event: Event, fence: int = 0) -> _Write:
        """The append script's keys and arguments; an attempt's write takes its next number,
        and is kept until the attempt ends (`forget`) in case a failover loses it."""
        data = event.to_dict()
        terminal = "1" if data["type"] in TERMINAL_TYPES else "0"
        keys = [_job_key(job_id), _log_key(job_id), LEASES_KEY, OWNERS_KEY]
        args = [json.dumps(data), self.ttl, wake_channel(job_id), fence, terminal, job_id, 0]
        if not fence:
            return _Write(keys=keys, args=args)
        with self._writes_lock:
            kept = self._writes.setdefault((job_id, fence), [])
            args[6] = len(kept) + 1
            kept.append(_Write(keys=keys, args=args))
        return kept[-1]

    def _send(self, write: _Write) -> int:
        """Run one append (retrying a lost Redis); the script's answer."""
        while True:
            seq = int(self._retrying(lambda: self._append(**write)))
            if seq != LOST:
                return seq
            if not self._rewrite_lost(write):
                return FENCED  # not this store's numbering: the attempt cannot go on

    def _rewrite_lost(self, write: _Write) -> bool:
        """The primary lacks writes of this attempt before `write`: it failed over to a replica
        that had not received them. Write them again, in order. The attempt is the log's only
        writer, so they take the sequence numbers they had, with the same events: a reader
        that saw them on the old primary reads on after them, one that did not reads them now."""
        job_id, fence = write.attempt
        written = self._retrying(lambda: self.redis.hget(_job_key(job_id), "written"))
        held = _held_number(written, fence)
        with self._writes_lock:
            lost = self._writes.get((job_id, fence), [])[held:write.number - 1]
        if not lost:
            return False
        logger.warning("job %s: Redis lost writes %d-%d of attempt %d (a failover); writing "
                       "them again", job_id, held + 1, write.number - 1, fence)
        for earlier in lost:
            self._send(earlier)
        return True

    def _retrying(self, call):
        """Run a write, retrying a lost or stalled Redis with bounded backoff for up to
        `retry_seconds`; safe for an attempt's writes, which the script numbers."""
        deadline, delay = time.monotonic() + self.retry_seconds, RETRY_FIRST_SECONDS
        while True:
            try:
                return call()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if time.monotonic() + delay > deadline:
                    raise
                logger.warning("Redis write failed (%s); retrying in %.2f s", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_SECONDS)

    def _append_in(self, pipe: redis.client.Pipeline, job_id: str, event: Event) -> None:
        write = self._append_call(job_id, event)
        pipe.evalsha(self._append.sha, len(write["keys"]), *write["keys"], *write["args"])

    def _pipelined(self, commands) -> list:
        """Run `commands(pipe)` in one round trip and return the replies. The append script
        goes by its digest: a Script in a pipeline costs a SCRIPT EXISTS round trip first, on
        every execution. If Redis lost its scripts (a restart), load it and run them again."""
        try:
            return self._execute(commands)
        except redis.exceptions.NoScriptError:
            self.redis.script_load(_APPEND)
            return self._execute(commands)

    def _execute(self, commands) -> list:
        with self.redis.pipeline(transaction=False) as pipe:
            commands(pipe)
            return pipe.execute()

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
        self._failed: dict[tuple[str, int], Exception] = {}  # by attempt: (job, fence)
        threading.Thread(target=self._run, name="dawet-event-writer", daemon=True).start()

    def send(self, job_id: str, fence: int, event: Event) -> None:
        """Queue an event for the job's log, written as attempt `fence`; raises if an earlier
        one failed to be written (StaleAttempt if the log refused it)."""
        if (job_id, fence) in self._failed:
            self._raise(job_id, self._failed[job_id, fence])
        self._queue.put((job_id, fence, event))

    def flush(self, job_id: str, fence: int) -> None:
        """Wait until the job's queued events are written; raise if one of attempt `fence`'s
        was not."""
        written = threading.Event()
        self._queue.put((job_id, 0, written))
        written.wait()
        failure = self._failed.pop((job_id, fence), None)
        if failure is not None:
            self._raise(job_id, failure)

    @staticmethod
    def _raise(job_id: str, failure: Exception):
        if isinstance(failure, StaleAttempt):
            raise failure
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

    def _write(self, batch: list[tuple[str, int, Any]]) -> None:
        events = [entry for entry in batch if not isinstance(entry[2], threading.Event)]
        try:
            written = self._store.append_many(events) if events else []
        except Exception as exc:  # noqa: BLE001 - reported to each job's runner at its flush
            logger.warning("could not write %d job events: %s", len(events), exc)
            written = [False] * len(events)
            self._failed.update({(job_id, fence): exc for job_id, fence, _ in events})
        for (job_id, fence, _), ok in zip(events, written):
            if not ok and (job_id, fence) not in self._failed:
                self._failed[job_id, fence] = StaleAttempt(f"job {job_id}: the log refused attempt "
                                                    f"{fence}'s write")
        for _, _, item in batch:
            if isinstance(item, threading.Event):
                item.set()


def _held_number(written: bytes | str | None, fence: int) -> int:
    """The number of attempt `fence`'s last write, from a job's `written` mark ("fence:n")."""
    held_fence, _, number = as_text(written or b"0:0").partition(":")
    return int(number) if int(held_fence) == fence else 0


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
        """Listen and poll until closed; on a failure, retry (redis-py re-subscribes)."""
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        next_poll = [0.0]

        def listen() -> None:
            if not pubsub.subscribed:
                pubsub.psubscribe(CANCEL_PATTERN)
            message = pubsub.get_message(timeout=self._poll_seconds)
            if message is not None:
                self._set(job_of_channel(message["channel"]))
            if time.monotonic() >= next_poll[0]:
                next_poll[0] = time.monotonic() + self._poll_seconds
                self._poll()

        while not self._closed.is_set():
            if not survive("cancels", listen):
                self._closed.wait(RETRY_SECONDS)
        pubsub.close()

    def _poll(self) -> None:
        with self._lock:
            job_ids = list(self._events)
        for job_id, cancelled in zip(job_ids, self._store.cancelled(job_ids)):
            if cancelled:
                self._set(job_id)

    def interrupt(self, job_id: str) -> None:
        """Set the job's cancel events now, as a cancel would (without a cancel flag)."""
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
