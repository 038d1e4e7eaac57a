"""Liveness records of running workers in Redis: which worker serves which model, and since when."""
from __future__ import annotations

import json
import logging
import threading
from typing import Any

import redis

logger = logging.getLogger(__name__)

BEATS_BEFORE_EXPIRY = 3  # a record outlives two missed heartbeats


def _record_key(model: str, worker_id: str) -> str:
    return f"dawet:worker:{model}:{worker_id}"


class WorkerRegistry:
    """Heartbeat records with a TTL, so a dead worker disappears by itself."""

    def __init__(self, client: redis.Redis, heartbeat_seconds: float):
        self.redis = client
        self.heartbeat_seconds = heartbeat_seconds

    def beat(self, record: dict[str, Any]) -> None:
        """Write or refresh a worker's record (needs `model` and `worker`)."""
        ttl_ms = int(self.heartbeat_seconds * BEATS_BEFORE_EXPIRY * 1000)
        self.redis.set(_record_key(record["model"], record["worker"]), json.dumps(record), px=ttl_ms)

    def remove(self, model: str, worker_id: str) -> None:
        self.redis.delete(_record_key(model, worker_id))

    def live(self, model: str) -> list[dict[str, Any]]:
        """Records of the workers serving `model` whose heartbeat has not expired."""
        keys = list(self.redis.scan_iter(match=_record_key(model, "*"), count=500))
        values = self.redis.mget(keys) if keys else []
        return [json.loads(value) for value in values if value]


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
            try:
                self._registry.beat(self._record_fn())
            except redis.RedisError:  # the next beat retries; the record may lapse meanwhile
                logger.warning("heartbeat failed: Redis unreachable")
