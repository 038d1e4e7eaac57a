"""API keys: who a request is. Keys come from the environment (DAWET_API_KEYS,
DAWET_ADMIN_API_KEYS) and from Redis, where `dawet keys create` adds them at run time.

Only a key's SHA-256 digest is ever stored. Redis holds `dawet:keys` (digest -> the key's
record as JSON) and `dawet:key-names` (name -> digest), changed together by one script, so
a name names one key. An API process remembers a Redis lookup for KEY_CACHE_SECONDS: a
revoked key is refused within that long, and a request costs no round trip to find its key.
"""
from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from dataclasses import asdict, dataclass

import redis

from dawet.settings import API_KEY_ENTRY, Settings

KEYS_KEY, NAMES_KEY = "dawet:keys", "dawet:key-names"
KEY_CACHE_SECONDS = 2.0
KEY_PREFIX = "dwt-"
ANONYMOUS = "anonymous"  # the owner of what is created while authentication is off

_CREATE = """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
return 1
"""
_REVOKE = """
local digest = redis.call('HGET', KEYS[2], ARGV[1])
if not digest then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[1], digest)
return 1
"""


@dataclass(frozen=True)
class Principal:
    """The holder of an accepted key (or everyone, while authentication is off)."""

    name: str
    models: frozenset[str] | None = None  # None: every model
    admin: bool = False
    daily_tokens: int | None = None  # None: the service's default budget; 0: none

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models

    def budget(self, default: int) -> int:
        """Tokens this key may use per UTC day (0: no budget); `default` unless it has its own."""
        return default if self.daily_tokens is None else self.daily_tokens

    def may_see(self, owner: str | None) -> bool:
        """Whether a resource created by `owner` exists for this principal."""
        return self.admin or owner == self.name

    def to_json(self) -> str:
        fields = {**asdict(self), "models": sorted(self.models) if self.models else None}
        return json.dumps(fields)

    @classmethod
    def from_json(cls, raw: bytes | str) -> "Principal":
        fields = json.loads(raw)
        models = fields.pop("models")
        return cls(models=frozenset(models) if models else None, **fields)


EVERYONE = Principal(ANONYMOUS, admin=True)  # auth off: every request sees everything


def digest_of(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random key, shown once to whoever creates it."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def configured_keys(settings: Settings) -> dict[str, Principal]:
    """The environment's keys by digest; a key without a name is called key-<digest[:8]>."""
    keys = {}
    for raw, admin in ((settings.api_keys, False), (settings.admin_api_keys, True)):
        for entry in filter(None, raw.split(",")):
            match = API_KEY_ENTRY.fullmatch(entry)
            digest, models = match["digest"], match["models"]
            keys[digest] = Principal(match["name"] or f"key-{digest[:8]}",
                                     frozenset(models.split("|")) if models else None, admin)
    return keys


class KeyStore:
    """Keys created at run time, in Redis."""

    def __init__(self, client: redis.Redis):
        self.redis = client
        self._create = client.register_script(_CREATE)
        self._revoke = client.register_script(_REVOKE)

    def create(self, principal: Principal) -> str | None:
        """Store a new key for `principal`; the key, or None when the name is taken."""
        key = new_key()
        created = self._create(keys=[KEYS_KEY, NAMES_KEY],
                               args=[principal.name, digest_of(key), principal.to_json()])
        return key if created else None

    def revoke(self, name: str) -> bool:
        """Forget the named key; whether there was one."""
        return bool(self._revoke(keys=[KEYS_KEY, NAMES_KEY], args=[name]))

    def find(self, digest: str) -> Principal | None:
        raw = self.redis.hget(KEYS_KEY, digest)
        return Principal.from_json(raw) if raw else None

    def all(self) -> list[Principal]:
        return sorted((Principal.from_json(raw) for raw in self.redis.hvals(KEYS_KEY)),
                      key=lambda principal: principal.name)


class KeyRing:
    """Every accepted key: the environment's, then Redis's (each lookup kept a moment)."""

    def __init__(self, settings: Settings, store: KeyStore):
        self.enabled = settings.auth_enabled()
        self._configured = configured_keys(settings)
        self._store = store
        self._cache: dict[str, tuple[Principal | None, float]] = {}
        self._lock = threading.Lock()

    def principal(self, digest: str | None) -> Principal | None:
        """Who holds the key with this digest; None when no such key is accepted."""
        if digest is None:
            return None
        if digest in self._configured:
            return self._configured[digest]
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(digest)
        if cached is not None and now - cached[1] < KEY_CACHE_SECONDS:
            return cached[0]
        found = self._store.find(digest)
        with self._lock:
            self._cache[digest] = (found, now)
            self._forget_stale(now)
        return found

    def _forget_stale(self, now: float) -> None:
        """Drop expired lookups so that random wrong keys cannot grow the cache for long."""
        if len(self._cache) > 10_000:
            self._cache = {d: c for d, c in self._cache.items()
                           if now - c[1] < KEY_CACHE_SECONDS}
