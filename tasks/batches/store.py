"""Batches in Redis: their records, their lines' results, the lines in flight, and the leases
that let exactly one dispatcher drive a batch at a time.

Keys, for a batch id B:
- `dawet:batch:{B}`: the record, a hash of OpenAI's fields, plus `cursor` (the next line to
  dispatch: lines run in order) and `fence`, the number of the current dispatcher's hold;
- `dawet:batch:{B}:lease`: the holding dispatcher, expiring with its lease;
- `dawet:batch:{B}:running`: line index -> model, for lines whose job is queued or running;
- `dawet:batch:{B}:results`: line index -> its output or error line (JSON), until the output
  and error files are written;
- `dawet:batch-lines:<model>`: every batch's lines in flight for the model ("B/index"; score:
  when its job was sent, 0 until then), whose size DAWET_BATCH_MAX_IN_FLIGHT bounds;
- `dawet:batches:active` (ids of batches that have not ended), `dawet:batches:ended` and
  `dawet:batch-lines:done` (counts for /metrics), and the lists of tasks/batches/listing.py.

Every write of a dispatcher carries its fence, checked in the same script as the write, so one
that was paused past its lease and wakes after another took the batch over writes nothing.
A line's result is set once (HSETNX) and counted with it; a status moves only from the
statuses a transition names, so the output and error files are published once.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from tasks.batches.contract import (COMPLETION_WINDOW, ENDED, TIMESTAMPS, BatchStatus)
from tasks.batches.listing import Listing
from tasks.jobs.log import as_text

BATCH_ID = re.compile(r"batch_[0-9a-f]{1,64}")
ACTIVE_KEY = "dawet:batches:active"
ENDED_KEY = "dawet:batches:ended"  # status -> batches that ended in it
DONE_KEY = "dawet:batch-lines:done"  # outcome (completed, failed) -> lines settled
LINES_PREFIX = "dawet:batch-lines:"  # then the model
WAKE_CHANNEL = "dawet:batches:wake"  # a batch was created or cancelled
FENCED, STALE = -2, -3  # script answers: another dispatcher holds the batch; the state moved

_ENDED_LUA = "local ENDED = {" + ", ".join(f"{s.value} = true" for s in ENDED) + "}\n"
_GUARD = "if redis.call('HGET', KEYS[1], 'fence') ~= ARGV[1] then return -2 end\n"

# KEYS batch, lease; ARGV holder, lease ms: the new hold's fence, or 0
_CLAIM = _ENDED_LUA + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status or ENDED[status] then return 0 end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return redis.call('HINCRBY', KEYS[1], 'fence', 1)
"""
# KEYS batch, lease; ARGV fence, holder, lease ms
_RENEW = _GUARD + """
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return 0 end
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 1
"""
# KEYS lease; ARGV holder
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
"""
# KEYS batch, running, the model's lines; ARGV fence, index, member, limit, model: a slot for
# line `index`, which must be the next to dispatch; 0 when the model has none free
_RESERVE = _GUARD + """
if redis.call('HGET', KEYS[1], 'status') ~= 'in_progress'
   or tonumber(redis.call('HGET', KEYS[1], 'cursor')) ~= tonumber(ARGV[2]) then return -3 end
if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[4]) then return 0 end
redis.call('ZADD', KEYS[3], 0, ARGV[3])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[5])
redis.call('HSET', KEYS[1], 'cursor', tonumber(ARGV[2]) + 1)
return 1
"""
# KEYS batch, results, running, the model's lines, done counts; ARGV fence, index, line JSON,
# outcome, member, "1" when the line never took a slot (it must be the next to dispatch)
_SETTLE = _GUARD + """
if ARGV[6] == '1' then
  if tonumber(redis.call('HGET', KEYS[1], 'cursor')) ~= tonumber(ARGV[2]) then return -3 end
  redis.call('HSET', KEYS[1], 'cursor', tonumber(ARGV[2]) + 1)
end
if redis.call('HSETNX', KEYS[2], ARGV[2], ARGV[3]) == 1 then
  redis.call('HINCRBY', KEYS[1], ARGV[4], 1)
  redis.call('HINCRBY', KEYS[5], ARGV[4], 1)
end
redis.call('HDEL', KEYS[3], ARGV[2])
redis.call('ZREM', KEYS[4], ARGV[5])
return 1
"""
# KEYS batch, running, results, lease, active, ended counts; ARGV fence, the statuses it may
# move from (comma-separated), the new status, now, then field/value pairs to set. A batch
# that ends gives back its lines' slots and drops its results, lease and place among the active.
_TRANSITION = _ENDED_LUA + _GUARD + """
local status = redis.call('HGET', KEYS[1], 'status')
if not string.find(',' .. ARGV[2] .. ',', ',' .. status .. ',', 1, true) then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[3], ARGV[3] .. '_at', ARGV[4])
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if ENDED[ARGV[3]] then
  local id = redis.call('HGET', KEYS[1], 'id')
  local running = redis.call('HGETALL', KEYS[2])
  for i = 1, #running, 2 do
    redis.call('ZREM', '""" + LINES_PREFIX + """' .. running[i + 1], id .. '/' .. running[i])
  end
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
  redis.call('SREM', KEYS[5], id)
  redis.call('HINCRBY', KEYS[6], ARGV[3], 1)
end
return 1
"""
# KEYS batch; ARGV now: 1 if the batch is (now) cancelling or cancelled, else 0
_CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'validating' or status == 'in_progress' then
  redis.call('HSET', KEYS[1], 'status', 'cancelling', 'cancelling_at', ARGV[1])
  return 1
end
if status == 'cancelling' or status == 'cancelled' then return 1 end
return 0
"""


class Fenced(RuntimeError):
    """Another dispatcher holds the batch now: this one must write nothing more."""


def _key(batch_id: str, part: str = "") -> str:
    return f"dawet:batch:{{{batch_id}}}{part}"


def lines_key(model: str) -> str:
    return LINES_PREFIX + model


def line_member(batch_id: str, index: int) -> str:
    return f"{batch_id}/{index}"


@dataclass
class BatchRecord:
    """A batch as Redis holds it."""

    id: str
    owner: str
    principal: str  # the creating key's Principal (api/keys.py) as JSON: whom its lines run as
    endpoint: str
    input_file_id: str
    total: int
    created_at: int
    expires_at: int
    metadata: dict[str, str] | None = None
    status: BatchStatus = BatchStatus.VALIDATING
    completed: int = 0
    failed: int = 0
    cursor: int = 0
    times: dict[str, int] = field(default_factory=dict)  # in_progress_at ... cancelled_at
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, Any]] | None = None  # why the batch failed, OpenAI's BatchError

    def to_api(self) -> dict[str, Any]:
        """OpenAI's batch object."""
        times = {**self.times, "created_at": self.created_at, "expires_at": self.expires_at}
        return {
            "id": self.id, "object": "batch", "endpoint": self.endpoint,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id, "completion_window": COMPLETION_WINDOW,
            "status": self.status.value, "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id, **{name: times.get(name) for name in TIMESTAMPS},
            "request_counts": {"total": self.total, "completed": self.completed,
                               "failed": self.failed},
            "metadata": self.metadata}

    def to_redis(self) -> dict[str, str | int]:
        return {"id": self.id, "owner": self.owner, "principal": self.principal,
                "endpoint": self.endpoint, "input_file_id": self.input_file_id,
                "total": self.total, "created_at": self.created_at,
                "expires_at": self.expires_at, "metadata": json.dumps(self.metadata),
                "status": self.status.value, "completed": 0, "failed": 0, "cursor": 0,
                "fence": 0}

    @classmethod
    def from_redis(cls, raw: dict) -> "BatchRecord":
        data = {as_text(k): as_text(v) for k, v in raw.items()}
        number = lambda name: int(data[name])  # noqa: E731
        return cls(
            id=data["id"], owner=data["owner"], principal=data["principal"],
            endpoint=data["endpoint"], input_file_id=data["input_file_id"],
            total=number("total"), created_at=number("created_at"),
            expires_at=number("expires_at"), metadata=json.loads(data["metadata"]),
            status=BatchStatus(data["status"]), completed=number("completed"),
            failed=number("failed"), cursor=number("cursor"),
            times={name: int(data[name]) for name in TIMESTAMPS if name in data},
            output_file_id=data.get("output_file_id") or None,
            error_file_id=data.get("error_file_id") or None,
            errors=json.loads(data["errors"]) if data.get("errors") else None)


@dataclass(frozen=True)
class Hold:
    """A dispatcher's hold on a batch: every write it makes carries the fence."""

    batch_id: str
    holder: str
    fence: int


@dataclass(frozen=True)
class BatchStats:
    """For /metrics: batches by status (active ones now, ended ones ever) and lines."""

    active: dict[str, int]
    ended: dict[str, int]
    waiting_lines: int
    running_lines: dict[str, int]  # by model
    done_lines: dict[str, int]  # by outcome


class BatchStore:
    """Batch records, line results and dispatchers' holds in one Redis."""

    def __init__(self, client: redis.Redis):
        self.redis = client
        self.listing = Listing(client, "dawet:batches")
        self._scripts = {name: client.register_script(source) for name, source in [
            ("claim", _CLAIM), ("renew", _RENEW), ("release", _RELEASE), ("reserve", _RESERVE),
            ("settle", _SETTLE), ("transition", _TRANSITION), ("cancel", _CANCEL)]}

    # --- what the API does ---

    def create(self, record: BatchRecord) -> None:
        """Record a new batch and wake the dispatchers."""
        with self.redis.pipeline() as pipe:
            pipe.hset(_key(record.id), mapping=record.to_redis())
            self.listing.add(pipe, record.owner, record.id)
            pipe.sadd(ACTIVE_KEY, record.id)
            pipe.publish(WAKE_CHANNEL, record.id)
            pipe.execute()

    def get(self, batch_id: str) -> BatchRecord | None:
        if not BATCH_ID.fullmatch(batch_id):
            return None
        raw = self.redis.hgetall(_key(batch_id))
        return BatchRecord.from_redis(raw) if raw else None

    def many(self, batch_ids: list[str]) -> list[BatchRecord]:
        with self.redis.pipeline(transaction=False) as pipe:
            for batch_id in batch_ids:
                pipe.hgetall(_key(batch_id))
            return [BatchRecord.from_redis(raw) for raw in pipe.execute() if raw]

    def cancel(self, batch_id: str) -> bool:
        """Ask for the batch to be cancelled; False when it already ended otherwise (or is
        finalizing)."""
        cancelled = self._scripts["cancel"](keys=[_key(batch_id)], args=[int(time.time())])
        if cancelled:
            self.redis.publish(WAKE_CHANNEL, batch_id)
        return bool(cancelled)

    def stats(self, models: list[str]) -> BatchStats:
        """Counts for /metrics, in two round trips (active batches are few)."""
        active_ids = [as_text(i) for i in self.redis.smembers(ACTIVE_KEY)]
        with self.redis.pipeline(transaction=False) as pipe:
            for batch_id in active_ids:
                pipe.hmget(_key(batch_id), "status", "total", "cursor")
            pipe.hgetall(ENDED_KEY)
            pipe.hgetall(DONE_KEY)
            for model in models:
                pipe.zcard(lines_key(model))
            replies = pipe.execute()
        rows, (ended, done), running = (replies[:len(active_ids)],
                                        replies[len(active_ids):len(active_ids) + 2],
                                        replies[len(active_ids) + 2:])
        active: dict[str, int] = {}
        waiting = 0
        for status, total, cursor in filter(lambda row: row[0] is not None, rows):
            active[as_text(status)] = active.get(as_text(status), 0) + 1
            waiting += int(total) - int(cursor)
        decode = lambda counts: {as_text(k): int(v) for k, v in counts.items()}  # noqa: E731
        return BatchStats(active, decode(ended), waiting, dict(zip(models, running)),
                          decode(done))

    # --- what a dispatcher does, holding the batch ---

    def active_ids(self) -> list[str]:
        return sorted(as_text(i) for i in self.redis.smembers(ACTIVE_KEY))

    def claim(self, batch_id: str, holder: str, lease_seconds: float) -> Hold | None:
        """Hold the batch unless another dispatcher does, or it ended."""
        fence = self._scripts["claim"](keys=[_key(batch_id), _key(batch_id, ":lease")],
                                       args=[holder, int(lease_seconds * 1000)])
        return Hold(batch_id, holder, int(fence)) if fence else None

    def renew(self, hold: Hold, lease_seconds: float) -> bool:
        """Extend the hold; False when it was lost."""
        return bool(self._scripts["renew"](
            keys=[_key(hold.batch_id), _key(hold.batch_id, ":lease")],
            args=[hold.fence, hold.holder, int(lease_seconds * 1000)]))

    def release(self, hold: Hold) -> None:
        self._scripts["release"](keys=[_key(hold.batch_id, ":lease")], args=[hold.holder])

    def reserve(self, hold: Hold, index: int, model: str, limit: int) -> bool:
        """Take one of the model's `limit` slots for line `index`, the next to dispatch, and
        move the cursor past it; False when none is free."""
        answer = self._run("reserve", hold, [_key(hold.batch_id, ":running"), lines_key(model)],
                           [index, line_member(hold.batch_id, index), limit, model])
        return answer == 1

    def mark_sent(self, batch_id: str, index: int, model: str) -> None:
        """The line's job is in the broker's queue (as of now)."""
        self.redis.zadd(lines_key(model), {line_member(batch_id, index): time.time()}, xx=True)

    def running(self, batch_id: str) -> dict[int, tuple[str, float]]:
        """The lines in flight: index -> (model, when its job was sent; 0: not known sent)."""
        lines = {int(as_text(i)): as_text(m)
                 for i, m in self.redis.hgetall(_key(batch_id, ":running")).items()}
        with self.redis.pipeline(transaction=False) as pipe:
            for index, model in lines.items():
                pipe.zscore(lines_key(model), line_member(batch_id, index))
            sent = pipe.execute()
        return {index: (model, score or 0.0)
                for (index, model), score in zip(lines.items(), sent)}

    def settle(self, hold: Hold, index: int, line: dict[str, Any], ok: bool,
               model: str = "", dispatched: bool = True) -> None:
        """Record line `index`'s output (`ok`) or error line, once, and free its slot. A line
        refused before it took a slot (`dispatched` False) moves the cursor past it."""
        keys = [_key(hold.batch_id, ":results"), _key(hold.batch_id, ":running"),
                lines_key(model), DONE_KEY]
        self._run("settle", hold, keys, [index, json.dumps(line),
                                         "completed" if ok else "failed",
                                         line_member(hold.batch_id, index),
                                         "0" if dispatched else "1"])

    def results(self, batch_id: str, first: int, last: int) -> list[dict[str, Any] | None]:
        """The recorded lines of indexes first..last-1 (None for a line without one)."""
        raw = self.redis.hmget(_key(batch_id, ":results"), list(range(first, last)))
        return [json.loads(line) if line is not None else None for line in raw]

    def transition(self, hold: Hold, sources: tuple[BatchStatus, ...], target: BatchStatus,
                   **fields: Any) -> bool:
        """Move the batch from one of `sources` to `target`, stamping the time and setting
        `fields`; False when it is in another status."""
        keys = [_key(hold.batch_id, ":running"), _key(hold.batch_id, ":results"),
                _key(hold.batch_id, ":lease"), ACTIVE_KEY, ENDED_KEY]
        pairs = [part for name, value in fields.items() if value is not None
                 for part in (name, value)]
        args = [",".join(s.value for s in sources), target.value, int(time.time()), *pairs]
        return self._run("transition", hold, keys, args) == 1

    def _run(self, script: str, hold: Hold, keys: list[str], args: list) -> int:
        answer = int(self._scripts[script](keys=[_key(hold.batch_id), *keys],
                                           args=[hold.fence, *args]))
        if answer == FENCED:
            raise Fenced(hold.batch_id)
        return answer
