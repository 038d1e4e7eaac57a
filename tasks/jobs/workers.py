"""Worker liveness, in one place: which workers serve which model, and since when.

Each model has one Redis hash, `dawet:workers:{model}`: a field per worker, holding its record
and the Redis server time at which the record lapses. A worker's heartbeat refreshes its field;
reading the live workers drops lapsed fields in the same script. Every reader (the OpenAI
routes, /v1/models, /readyz, /metrics) pays O(workers of the model), whatever else Redis holds,
and every expiry is measured on Redis's clock, so the hosts' clocks need not agree.
"""
from __future__ import annotations

import json
import logging
import threading
from typing import Any

import redis

from tasks.jobs.background import survive

logger = logging.getLogger(__name__)

BEATS_BEFORE_EXPIRY = 3  # a record outlives two missed heartbeats

# KEYS[1] the model's hash; ARGV[1] the worker, ARGV[2] its record, ARGV[3] its TTL in ms
_BEAT = """
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
redis.call('HSET', KEYS[1], ARGV[1], (now_ms + tonumber(ARGV[3])) .. ' ' .. ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
"""
# KEYS[1] the model's hash: the records that have not lapsed, dropping those that have
_LIVE = """
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
local live, entries = {}, redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  local value = entries[i + 1]
  local space = string.find(value, ' ')
  if tonumber(string.sub(value, 1, space - 1)) > now_ms then
    table.insert(live, string.sub(value, space + 1))
  else
    redis.call('HDEL', KEYS[1], entries[i])
  end
end
return live
"""


def _models_key(model: str) -> str:
    return f"dawet:workers:{model}"


class WorkerRegistry:
    """Heartbeat records that lapse by themselves, so a dead worker disappears."""

    def __init__(self, client: redis.Redis, heartbeat_seconds: float):
        self.redis = client
        self.heartbeat_seconds = heartbeat_seconds
        self._beat = client.register_script(_BEAT)
        self._live = client.register_script(_LIVE)

    def beat(self, record: dict[str, Any]) -> None:
        """Write or refresh a worker's record (needs `model` and `worker`)."""
        ttl_ms = int(self.heartbeat_seconds * BEATS_BEFORE_EXPIRY * 1000)
        self._beat(keys=[_models_key(record["model"])],
                   args=[record["worker"], json.dumps(record), ttl_ms])

    def remove(self, model: str, worker_id: str) -> None:
        self.redis.hdel(_models_key(model), worker_id)

    def live(self, model: str) -> list[dict[str, Any]]:
        """Records of the workers serving `model` whose heartbeat has not lapsed."""
        return [json.loads(value) for value in self._live(keys=[_models_key(model)])]

    def serves(self, model: str) -> bool:
        """Whether a live worker serves `model`."""
        return bool(self.live(model))


class Heartbeat:
    """A daemon thread that refreshes one worker's record until stopped."""

    def __init__(self, registry: WorkerRegistry, record_fn):
        self._registry, self._record_fn = registry, record_fn
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dawet-heartbeat", daemon=True)

    def start(self) -> None:
        self._registry.beat(self._record_fn())
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        record = self._record_fn()
        self._registry.remove(record["model"], record["worker"])

    def _run(self) -> None:
        while not self._stopped.wait(self._registry.heartbeat_seconds):
            survive("heartbeat", lambda: self._registry.beat(self._record_fn()))
