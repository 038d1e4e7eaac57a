"""Usage per key and model, and daily token budgets, counted in Redis.

Each UTC day has a hash `dawet:usage:<day number>` and all time one, `dawet:usage:total`,
with fields `<key name>|<model>|<count>` (requests, prompt_tokens, completion_tokens). A
request is counted when it is admitted; then its cost (prompt + max new tokens) is *held*
against the key's budget (field `<key name>|held` of its day) until its job ends, when the
job log's own append script (tasks/jobs/log.py) swaps the hold for the tokens the `done`
event records, in the same step as that event: the counts add up to the job logs, and a
retried or stale write cannot count twice. Several jobs in flight cannot overspend a budget.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import redis

from tasks.jobs.contract import Charge

DAY_SECONDS = 86_400
DAY_KEY_PREFIX = "dawet:usage:"  # then the day's number
TOTAL_KEY = "dawet:usage:total"
COUNTS = ("requests", "prompt_tokens", "completion_tokens")


def day_key(day: int) -> str:
    return f"{DAY_KEY_PREFIX}{day}"


def today() -> int:
    return int(time.time() // DAY_SECONDS)


# KEYS day hash, total hash; ARGV key name, model, cost, budget (0: none), TTL. Refuses (0)
# when the day's spent and held tokens plus the cost would pass the budget.
_ADMIT = """
local spent = tonumber(redis.call('HGET', KEYS[1], ARGV[1] .. '|spent') or '0')
local held = tonumber(redis.call('HGET', KEYS[1], ARGV[1] .. '|held') or '0')
local budget = tonumber(ARGV[4])
if budget > 0 and spent + held + tonumber(ARGV[3]) > budget then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[1] .. '|held', ARGV[3])
for _, key in ipairs(KEYS) do
  redis.call('HINCRBY', key, ARGV[1] .. '|' .. ARGV[2] .. '|requests', 1)
end
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""
# KEYS the same; ARGV key name, model, cost: a request that was counted but not queued.
_REFUND = """
redis.call('HINCRBY', KEYS[1], ARGV[1] .. '|held', -tonumber(ARGV[3]))
for _, key in ipairs(KEYS) do
  redis.call('HINCRBY', key, ARGV[1] .. '|' .. ARGV[2] .. '|requests', -1)
end
"""
# A Lua function for the job log's append script: at a job's terminal event (ARGV[1], JSON),
# swap its hold for what its `done` event used (an error uses nothing). The job hash
# (KEYS[1]) says whose, which model and which day. Its keys are not declared: one Redis
# (or a Sentinel group) holds everything, as the leases' scripts already assume.
SETTLE_LUA = """
local function settle_usage()
  local owner, model, day, held = unpack(redis.call('HMGET', KEYS[1], 'owner', 'model',
                                                    'usage_day', 'held'))
  if not day then return end
  local usage = cjson.decode(ARGV[1])['usage']
  local prompt, completion = 0, 0
  if type(usage) == 'table' then
    prompt, completion = usage['prompt_tokens'], usage['completion_tokens']
  end
  local today = '""" + DAY_KEY_PREFIX + """' .. day
  redis.call('HINCRBY', today, owner .. '|held', -tonumber(held))
  redis.call('HINCRBY', today, owner .. '|spent', prompt + completion)
  for _, key in ipairs({today, '""" + TOTAL_KEY + """'}) do
    redis.call('HINCRBY', key, owner .. '|' .. model .. '|prompt_tokens', prompt)
    redis.call('HINCRBY', key, owner .. '|' .. model .. '|completion_tokens', completion)
  end
end
"""


class BudgetExceeded(Exception):
    """The key's daily token budget cannot cover this request."""


@dataclass(frozen=True)
class UsageRow:
    key: str
    model: str
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def to_dict(self) -> dict[str, object]:
        return {"key": self.key, "model": self.model, "requests": self.requests,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class UsageBook:
    """Counts admissions, holds budgets and reads the counts back."""

    def __init__(self, client: redis.Redis, retention_days: int):
        self.redis = client
        self.ttl = (retention_days + 1) * DAY_SECONDS
        self._admit = client.register_script(_ADMIT)
        self._refund = client.register_script(_REFUND)

    def admit(self, owner: str, model: str, cost: int, budget: int) -> Charge:
        """Count a request and hold its cost, or raise BudgetExceeded."""
        day = today()
        if not self._admit(keys=[day_key(day), TOTAL_KEY],
                           args=[owner, model, cost, budget, self.ttl]):
            raise BudgetExceeded
        return Charge(day=day, held=cost)

    def hold_in(self, pipe: redis.client.Pipeline, owner: str, model: str,
                charge: Charge) -> None:
        """Count a request and hold its cost as `admit` does for a key without a budget (nothing
        refuses it), on the caller's pipeline: the MULTI that records its job (api/broker.py).
        By the script's text, not its digest: one Redis lost would fail the hold alone."""
        pipe.eval(_ADMIT, 2, day_key(charge.day), TOTAL_KEY, owner, model, charge.held, 0,
                  self.ttl)

    def refund(self, owner: str, model: str, charge: Charge) -> None:
        """Undo `admit` for a request that was not queued after all."""
        self._refund(keys=[day_key(charge.day), TOTAL_KEY], args=[owner, model, charge.held])

    def spent(self, owner: str) -> tuple[int, int]:
        """(tokens used, tokens held by jobs in flight) of a key today."""
        spent, held = self.redis.hmget(day_key(today()), f"{owner}|spent", f"{owner}|held")
        return int(spent or 0), int(held or 0)

    def days(self, first: int, last: int) -> dict[int, list[UsageRow]]:
        """Every key's rows of each day from `first` to `last`, in one round trip."""
        with self.redis.pipeline(transaction=False) as pipe:
            for day in range(first, last + 1):
                pipe.hgetall(day_key(day))
            return dict(zip(range(first, last + 1), map(rows, pipe.execute())))

    def total(self) -> list[UsageRow]:
        return rows(self.redis.hgetall(TOTAL_KEY))


def rows(fields: dict[bytes, bytes]) -> list[UsageRow]:
    """A usage hash's `<key>|<model>|<count>` fields as one row per key and model."""
    found: dict[tuple[str, str], dict[str, int]] = {}
    for field, value in fields.items():
        name = field.decode()
        owner, _, rest = name.partition("|")
        model, _, count = rest.rpartition("|")
        if count in COUNTS and model:
            found.setdefault((owner, model), {})[count] = int(value)
    return [UsageRow(owner, model, **counts) for (owner, model), counts in sorted(found.items())]
