"""Job leases: a running job holds a lease that its worker renews; a lapsed lease means its
worker died, and the job runs again on another worker after a `restarted` event.

Each claim starts an attempt: it counts the job's attempts and grants a fencing token, the
job's `fence`, which every write of that attempt carries (tasks/jobs/log.py refuses a write
whose fence is not the current one). Reaping a lapsed lease moves the fence on, so a worker
that was only frozen, and wakes after its job moved, writes nothing more. After
`max_attempts` attempts the reaper ends the job with `worker_lost` instead of restarting it.

`dawet:leases` is a sorted set (member: job id, score: expiry in Redis-clock milliseconds) and
`dawet:lease-owners` a hash (job id -> owning worker). Scripts read the time from Redis, so
workers' clocks need not agree. Each worker's LeaseKeeper thread renews all its jobs' leases
with one script call per beat and reaps lapsed leases; the reap script removes each lapsed
lease atomically, so exactly one worker restarts a given job.

Whose clock measures a lease's silence? Redis's, but only while Redis could be talked to:
every renew and reap notes the time in `dawet:leases:seen`, and when a script finds that no
worker reached Redis for longer than half a lease (Redis was frozen or paused, or cut off from
every worker), it moves every lease on by that gap before it looks at any. So a Redis stall
longer than a lease restarts no job whose worker is alive; one frozen or partitioned worker,
while others keep talking to Redis, still loses its jobs to them.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import redis

from tasks.jobs.background import survive
from tasks.jobs.contract import (WORKER_LOST, ErrorBody, ErrorEvent, Job, JobState, StatusEvent,
                                 is_terminal)
from tasks.jobs.log import LEASES_KEY, OWNERS_KEY, JobStore, as_text

logger = logging.getLogger(__name__)

REAP_BATCH = 100
SEEN_KEY = "dawet:leases:seen"  # when a worker last reached Redis (Redis-clock milliseconds)

_NOW = "local t = redis.call('TIME'); local now = t[1] * 1000 + math.floor(t[2] / 1000)\n"
# After a silence of every worker longer than half a lease (ARGV[2] ms), move every lease on by
# it: KEYS[3] holds when a worker last reached Redis.
_CATCH_UP = _NOW + """
local seen = tonumber(redis.call('GET', KEYS[3]) or now)
if now - seen > tonumber(ARGV[2]) / 2 then
  local leases = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
  for i = 1, #leases, 2 do
    redis.call('ZADD', KEYS[1], tonumber(leases[i + 1]) + now - seen, leases[i])
  end
end
redis.call('SET', KEYS[3], now)
"""

# A job's hash, as tasks/jobs/log.py names it; the owner name of a reaper's hold on a lease
REAPER = "reaper"
_JOB_KEY = ("local function job_key(id) return 'dawet:job:{' .. id .. '}' end\n"
            f"local REAPER = '{REAPER}'\n")

# A new attempt: 0 if another worker's lease is live (a reaper's hold does not count) or the
# job's record is gone, else its fence
_CLAIM = _NOW + _JOB_KEY + """
local job = job_key(ARGV[1])
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) > now and redis.call('HGET', KEYS[2], ARGV[1]) ~= REAPER then
  return 0
end
if redis.call('EXISTS', job) == 0 then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('HINCRBY', job, 'attempts', 1)
return redis.call('HINCRBY', job, 'fence', 1)
"""

_RENEW = _CATCH_UP + """
local lost = {}
for i = 3, #ARGV do
  if redis.call('HGET', KEYS[2], ARGV[i]) == ARGV[1] then
    redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[i])
  else
    table.insert(lost, ARGV[i])
  end
end
return lost
"""

# Only the attempt that holds the lease releases it: the owner's name is not enough, since one
# worker may hold a stale attempt of the job beside a new one (ARGV[3]: the attempt's fence)
_RELEASE = _JOB_KEY + """
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 0 end
if ARGV[3] ~= '0' and redis.call('HGET', job_key(ARGV[1]), 'fence') ~= ARGV[3] then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"""

# Lapsed leases: each attempt fenced out and its lease turned into the reaper's hold for one
# lease, which the reaper gives up once it has re-sent the job (a reaper that dies before
# that leaves the hold to lapse, and another reaper takes the job up again); a job whose
# record is gone loses its lease. Returns [job, attempts so far, fence, ...]
_REAP = _CATCH_UP + _JOB_KEY + """
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local found = {}
for _, id in ipairs(lapsed) do
  local job = job_key(id)
  if redis.call('EXISTS', job) == 1 then
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), id)
    redis.call('HSET', KEYS[2], id, REAPER)
    local fence = redis.call('HINCRBY', job, 'fence', 1)
    table.insert(found, id)
    table.insert(found, redis.call('HGET', job, 'attempts') or '0')
    table.insert(found, fence)
  else
    redis.call('ZREM', KEYS[1], id)
    redis.call('HDEL', KEYS[2], id)
  end
end
return found
"""

_LAPSE = _JOB_KEY + """
if ARGV[2] ~= '0' and redis.call('HGET', job_key(ARGV[1]), 'fence') ~= ARGV[2] then return 0 end
redis.call('ZADD', KEYS[1], 0, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], REAPER)
return 1
"""


class LeaseBook:
    """The lease records in Redis, for one owner (a worker)."""

    def __init__(self, client: redis.Redis, owner: str, lease_seconds: float):
        self.owner = owner
        self._lease_ms = int(lease_seconds * 1000)
        keys = [LEASES_KEY, OWNERS_KEY, SEEN_KEY]
        scripts = {name: client.register_script(src) for name, src in
                   [("claim", _CLAIM), ("renew", _RENEW), ("release", _RELEASE),
                    ("reap", _REAP), ("lapse", _LAPSE)]}
        self._call = lambda name, *args: scripts[name](keys=keys, args=list(args))

    def claim(self, job_id: str) -> int:
        """Take the job's lease unless another worker holds a live one: the new attempt's
        fence, or 0 if not taken."""
        return int(self._call("claim", job_id, self.owner, self._lease_ms))

    def renew(self, job_ids: list[str]) -> set[str]:
        """Extend these jobs' leases; returns the ones this owner no longer holds."""
        if not job_ids:
            return set()  # the reap that follows in the same beat notes this worker's visit
        return {as_text(j) for j in self._call("renew", self.owner, self._lease_ms, *job_ids)}

    def release(self, job_id: str, fence: int = 0) -> None:
        """Give the lease up (the job ended), if attempt `fence` still holds it (0: whatever
        attempt of this owner's)."""
        self._call("release", job_id, self.owner, fence)

    def reap(self) -> list[tuple[str, int, int]]:
        """Take lapsed leases, fencing their attempts out and holding each for the reaper;
        return (job, attempts so far, the fence of the hold) for each. Each lapsed job goes to
        one caller."""
        found = self._call("reap", REAP_BATCH, self._lease_ms)
        return [(as_text(found[i]), int(found[i + 1]), int(found[i + 2]))
                for i in range(0, len(found), 3)]

    def settle(self, job_id: str, fence: int) -> None:
        """Give up the reaper's hold on the job's lease (it was re-sent, or needs no restart)."""
        self._call("release", job_id, REAPER, fence)

    def lapse(self, job_id: str, fence: int = 0) -> None:
        """Mark a job's lease lapsed, so the next reap takes it again (if attempt `fence` is
        still the job's current one; 0: whatever the attempt)."""
        self._call("lapse", job_id, fence)


WORKER_LOST_ERROR = "the job lost its worker {attempts} times; it is not restarted again"


class Reaper:
    """Restarts the jobs of lapsed leases: a `restarted` event, then back to the model's queue;
    a job that has had `max_attempts` attempts ends with `worker_lost` instead."""

    def __init__(self, book: LeaseBook, store: JobStore, send: Callable[[Job], None],
                 max_attempts: int = 3, on_restart: Callable[[Job], None] | None = None):
        self._book, self._store, self._send = book, store, send
        self._max_attempts, self._on_restart = max_attempts, on_restart

    def reap(self) -> list[str]:
        """Restart (or end) every job whose lease lapsed; returns the restarted ones' ids."""
        restarted = []
        for job_id, attempts, fence in self._book.reap():
            try:
                if self._resend(job_id, attempts):
                    restarted.append(job_id)
            except Exception:  # the broker is down: the hold lapses now, a later beat retries
                logger.exception("could not re-send job %s; will retry", job_id)
                self._book.lapse(job_id, fence)
                continue
            self._book.settle(job_id, fence)
        return restarted

    def _resend(self, job_id: str, attempts: int) -> bool:
        """Append `restarted` (unless a reaper that died wrote it already) and queue the job
        again; or end it, once it has had its attempts. Whether it was queued again."""
        job = self._store.load(job_id)
        last = self._store.last_event(job_id)
        if job is None or (last is not None and is_terminal(last)):
            return False  # expired, or it ended just before its worker died
        if attempts >= self._max_attempts:
            body = ErrorBody(WORKER_LOST_ERROR.format(attempts=attempts), "server_error",
                             WORKER_LOST)
            self._store.append(job_id, ErrorEvent(body))
            logger.error("job %s lost its worker %d times; ended it", job_id, attempts)
            return False
        if last is None or last.get("state") != JobState.RESTARTED.value:
            restarted = StatusEvent(JobState.RESTARTED, resumes_after=last["seq"] if last else 0)
            if self._store.append(job_id, restarted) is None:
                return False  # it ended meanwhile
        self._send(job)
        logger.warning("job %s lost its worker; restarted it", job_id)
        if self._on_restart is not None:
            self._on_restart(job)
        return True


class LeaseKeeper:
    """A worker's lease thread: renews its running jobs' leases and reaps lapsed ones."""

    def __init__(self, book: LeaseBook, reaper: Reaper, interval: float,
                 on_lost: Callable[[str], None] | None = None):
        self._book, self._reaper, self._interval = book, reaper, interval
        self._on_lost = on_lost  # a job whose lease this worker lost: stop its generation
        self._running: dict[str, int] = {}  # job -> the fence of this worker's attempt
        self._handed_back: set[tuple[str, int]] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dawet-leases", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    @contextmanager
    def hold(self, job_id: str) -> Iterator[int]:
        """Hold the job's lease while the block runs; yields the attempt's fence, or 0 if
        another worker has the job."""
        fence = self._book.claim(job_id)
        if not fence:
            yield 0
            return
        with self._lock:
            self._running[job_id] = fence  # a stale attempt of it may still be winding down
        try:
            yield fence
        finally:
            with self._lock:
                if self._running.get(job_id) == fence:
                    del self._running[job_id]
                handed_back = (job_id, fence) in self._handed_back
                self._handed_back.discard((job_id, fence))
            if handed_back:  # the reaper restarts it once its lease lapses
                survive("leases", lambda: self._book.lapse(job_id, fence))
            else:
                self._book.release(job_id, fence)

    def hand_back(self, job_id: str, fence: int) -> None:
        """Give up a held attempt without ending the job: its lease is left to lapse (at once
        if Redis answers), so a reaper restarts it."""
        with self._lock:
            if self._running.get(job_id) == fence:
                del self._running[job_id]
            self._handed_back.add((job_id, fence))

    def beat(self) -> None:
        """Renew this worker's leases, then restart the jobs of lapsed ones."""
        with self._lock:
            running = dict(self._running)
        lost = self._book.renew(sorted(running))
        if lost:
            logger.warning("lost the leases of jobs %s; stopping them", sorted(lost))
        for job_id in lost:
            self._stop_lost(job_id, running[job_id])
        self._reaper.reap()

    def _stop_lost(self, job_id: str, fence: int) -> None:
        """Stop the attempt that lost its lease, unless a new attempt of the job has taken its
        place on this worker meanwhile: that one must go on (the stale one stops at its next
        write, which the log refuses). Under the lock, so no new attempt starts in between."""
        with self._lock:
            if self._on_lost is not None and self._running.get(job_id) == fence:
                self._on_lost(job_id)

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            survive("leases", self.beat)
