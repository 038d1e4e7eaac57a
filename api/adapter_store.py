"""The LoRA adapters added at run time (api/adapters.py), in Redis for every API process."""
from __future__ import annotations

import json

import redis

from api.errors import invalid
from model_store.registry import AdapterEntry, ModelSpec, Registry

KEY = "dawet:lora-adapters"  # hash: adapter name -> {"path", "base_model"}


class AdapterStore:
    """The run-time adapters' records, and their specs derived from the registry."""

    def __init__(self, client: redis.Redis, registry: Registry):
        self._redis, self._registry = client, registry

    def spec(self, name: str) -> ModelSpec | None:
        raw = self._redis.hget(KEY, name)
        return None if raw is None else self._derive(name, json.loads(raw))

    def specs(self) -> list[ModelSpec]:
        records = self._redis.hgetall(KEY)
        specs = (self._derive(name.decode(), json.loads(raw)) for name, raw in records.items())
        return sorted((spec for spec in specs if spec is not None), key=lambda spec: spec.name)

    def add(self, name: str, path: str, base: ModelSpec) -> ModelSpec:
        """Record the adapter, or answer 400 when the name is taken."""
        spec = base.adapter_spec(AdapterEntry(name=name, path=path))
        if not self._redis.hsetnx(KEY, name, json.dumps({"path": path, "base_model": base.name})):
            raise invalid(f"the LoRA adapter {name!r} has already been loaded",
                          param="lora_name", code="adapter_exists")
        return spec

    def remove(self, name: str) -> bool:
        return bool(self._redis.hdel(KEY, name))

    def _derive(self, name: str, record: dict) -> ModelSpec | None:
        base = self._registry.get(record["base_model"])  # None: the registry dropped its base
        return None if base is None else base.adapter_spec(
            AdapterEntry(name=name, path=record["path"]))
