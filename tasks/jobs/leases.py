"""Job leases: a running job holds a lease that its worker renews; a lapsed lease means its
worker died, and the job runs again on another worker after a `restarted` event.

`dawet:leases` is a sorted set (member: job id, score: expiry in Redis-clock milliseconds) and
`dawet:lease-owners` a hash (job id -> owning worker). Scripts read the time from Redis, so
workers' clocks need not agree. Each worker's LeaseKeeper thread renews all its jobs' leases
with one script call per beat and reaps lapsed leases; the reap script removes each lapsed
lease atomically, so exactly one worker restarts a given job.

A worker cut off from Redis for longer than a lease may see its jobs restarted elsewhere when
Redis returns; with the embedded (in-memory) Redis the jobs are gone by then anyway.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import redis

from tasks.jobs.contract import Job, JobState, StatusEvent, is_terminal
from tasks.jobs.log import JobStore, as_text

logger = logging.getLogger(__name__)

LEASES_KEY = "dawet:leases"
OWNERS_KEY = "dawet:lease-owners"
REAP_BATCH = 100

_NOW = "local t = redis.call('TIME'); local now = t[1] * 1000 + math.floor(t[2] / 1000)\n"

_CLAIM = _NOW + """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) > now then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
"""

_RENEW = _NOW + """
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

_RELEASE = """
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"""

_REAP = _NOW + """
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, job in ipairs(lapsed) do
  redis.call('ZREM', KEYS[1], job)
  redis.call('HDEL', KEYS[2], job)
end
return lapsed
"""

_LAPSE = """
redis.call('ZADD', KEYS[1], 0, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], 'reaper')
return 1
"""


class LeaseBook:
    """The lease records in Redis, for one owner (a worker)."""

    def __init__(self, client: redis.Redis, owner: str, lease_seconds: float):
        self.owner = owner
        self._lease_ms = int(lease_seconds * 1000)
        keys = [LEASES_KEY, OWNERS_KEY]
        scripts = {name: client.register_script(src) for name, src in
                   [("claim", _CLAIM), ("renew", _RENEW), ("release", _RELEASE),
                    ("reap", _REAP), ("lapse", _LAPSE)]}
        self._call = lambda name, *args: scripts[name](keys=keys, args=list(args))

    def claim(self, job_id: str) -> bool:
        """Take the job's lease unless another worker holds a live one."""
        return bool(self._call("claim", job_id, self.owner, self._lease_ms))

    def renew(self, job_ids: list[str]) -> set[str]:
        """Extend these jobs' leases; returns the ones this owner no longer holds."""
        if not job_ids:
            return set()
        return {as_text(j) for j in self._call("renew", self.owner, self._lease_ms, *job_ids)}

    def release(self, job_id: str) -> None:
        """Give the lease up (the job ended, or was handed back)."""
        self._call("release", job_id, self.owner)

    def reap(self) -> list[str]:
        """Remove lapsed leases and return their jobs; each lapsed job goes to one caller."""
        return [as_text(j) for j in self._call("reap", REAP_BATCH)]

    def lapse(self, job_id: str) -> None:
        """Mark a job's lease lapsed, so the next reap takes it again."""
        self._call("lapse", job_id)


class Reaper:
    """Restarts the jobs of lapsed leases: a `restarted` event, then back to the model's queue."""

    def __init__(self, book: LeaseBook, store: JobStore, send: Callable[[Job], None]):
        self._book, self._store, self._send = book, store, send

    def reap(self) -> list[str]:
        """Restart every job whose lease lapsed; returns their ids."""
        restarted = []
        for job_id in self._book.reap():
            if self._restart(job_id):
                restarted.append(job_id)
        return restarted

    def _restart(self, job_id: str) -> bool:
        job = self._store.load(job_id)
        last = self._store.last_event(job_id)
        if job is None or (last is not None and is_terminal(last)):
            return False  # expired, or it ended just before its worker died
        self._store.append(job_id, StatusEvent(JobState.RESTARTED))
        try:
            self._send(job)
        except Exception:  # the broker is down: try again on a later beat
            logger.exception("could not re-send job %s; will retry", job_id)
            self._book.lapse(job_id)
            return False
        logger.warning("job %s lost its worker; restarted it", job_id)
        return True


class LeaseKeeper:
    """A worker's lease thread: renews its running jobs' leases and reaps lapsed ones."""

    def __init__(self, book: LeaseBook, reaper: Reaper, interval: float):
        self._book, self._reaper, self._interval = book, reaper, interval
        self._running: set[str] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dawet-leases", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    @contextmanager
    def hold(self, job_id: str) -> Iterator[bool]:
        """Hold the job's lease while the block runs; yields False if another worker has it."""
        if not self._book.claim(job_id):
            yield False
            return
        with self._lock:
            self._running.add(job_id)
        try:
            yield True
        finally:
            with self._lock:
                self._running.discard(job_id)
            self._book.release(job_id)

    def beat(self) -> None:
        """Renew this worker's leases, then restart the jobs of lapsed ones."""
        with self._lock:
            running = sorted(self._running)
        lost = self._book.renew(running)
        if lost:
            logger.warning("lost the leases of jobs %s", sorted(lost))
        self._reaper.reap()

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            try:
                self.beat()
            except redis.RedisError:  # the next beat retries
                logger.warning("lease beat failed: Redis unreachable")
