"""Who may submit a job, and when: model scopes of API keys, per-key rate limits, the per-model
queue limit, and Idempotency-Key replays. Counters live in Redis, shared by every API process.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from dataclasses import dataclass

import redis
from celery import Celery
from flask import g, request
from kombu.exceptions import ChannelError

from api.broker import KOMBU_REDIS_PRIORITY_SUFFIXES, broker_is_job_store
from api.errors import APIError
from api.keys import EVERYONE, Principal
from dawet.redis_client import broker_client
from dawet.settings import Settings
from model_store.registry import ModelSpec

logger = logging.getLogger(__name__)

IDEMPOTENCY_HEADER = "Idempotency-Key"
MAX_IDEMPOTENCY_KEY_LENGTH = 255
# How long a claimed Idempotency-Key waits for its job: an API process that dies in between
# blocks the key this long, not for the job TTL.
IDEMPOTENCY_CLAIM_SECONDS = 60
RATE_WINDOW_SECONDS = 60
QUEUE_FULL_RETRY_AFTER_SECONDS = 5
QUEUE_ESTIMATE_SECONDS = 1.0  # how long a queue count may be reused, far from the limit

# Fixed one-minute windows: refuse (1: requests, 2: tokens) or count the request and its tokens.
_RATE = """
local requests = tonumber(redis.call('GET', KEYS[1]) or '0')
local tokens = tonumber(redis.call('GET', KEYS[2]) or '0')
local rpm, tpm, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if rpm > 0 and requests + 1 > rpm then return 1 end
if tpm > 0 and tokens + cost > tpm then return 2 end
redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('INCRBY', KEYS[2], cost)
redis.call('EXPIRE', KEYS[2], ARGV[4])
return 0
"""


def client_identity() -> str:
    """Who a request counts against: its API key's name, or the client's address while
    authentication is off."""
    who = g.get("principal")
    if who is None or who is EVERYONE:
        return f"addr:{request.remote_addr}"
    return f"key:{who.name}"


def too_many(message: str, code: str, retry_after: float,
             type: str = "rate_limit_error") -> APIError:
    """A 429 with a Retry-After header in whole seconds."""
    return APIError(429, message, code, type,
                    headers={"Retry-After": str(max(1, math.ceil(retry_after)))})


def _broker_redis(settings: Settings, client: redis.Redis) -> redis.Redis | None:
    """A client for the broker when it is Redis (the job store's own when they are one)."""
    return client if broker_is_job_store(settings) else broker_client(settings)


class Admission:
    """The checks a submission passes before its job is queued."""

    def __init__(self, settings: Settings, client: redis.Redis, celery: Celery):
        self.settings, self._redis, self._celery = settings, client, celery
        self._rate = client.register_script(_RATE)
        self._queue_estimates: dict[str, tuple[int, float]] = {}  # queue -> (jobs, read at)
        self._lock = threading.Lock()
        self._broker_redis = _broker_redis(settings, client)

    def check_model_access(self, who: Principal, spec: ModelSpec) -> None:
        """A 403 when the request's API key is scoped to other models."""
        if not who.may_use(spec.name):
            raise APIError(403, f"this API key may not use model {spec.name!r}",
                           "model_not_allowed", "permission_error", param="model")

    def check_rate(self, tokens: int) -> None:
        """Count the request and its tokens against the client's per-minute limits, or 429."""
        rpm = self.settings.rate_limit_requests_per_minute
        tpm = self.settings.rate_limit_tokens_per_minute
        if not (rpm or tpm):
            return
        now = time.time()
        window = f"dawet:rate:{client_identity()}:{int(now // RATE_WINDOW_SECONDS)}"
        refused = self._rate(keys=[window + ":requests", window + ":tokens"],
                             args=[rpm, tpm, tokens, RATE_WINDOW_SECONDS * 2])
        if refused:
            what = f"{rpm} requests" if refused == 1 else f"{tpm} tokens (prompt + max tokens)"
            raise too_many(f"rate limit of {what} per minute exceeded", "rate_limit_exceeded",
                           RATE_WINDOW_SECONDS - now % RATE_WINDOW_SECONDS)

    def check_queue(self, spec: ModelSpec) -> None:
        """A 429 when the model's queue already holds DAWET_MAX_QUEUED_JOBS waiting jobs.

        The broker is asked at most once a second while this process's estimate (the last
        count plus the jobs it admitted since) stays under half the limit: asking costs two
        round trips on every submission's path, and far from the limit the answer is "yes".
        """
        limit = self.settings.max_queued_jobs
        if not limit:
            return
        with self._lock:
            jobs, read_at = self._queue_estimates.get(spec.queue, (limit, 0.0))
            fresh = time.monotonic() - read_at < QUEUE_ESTIMATE_SECONDS and jobs < limit // 2
        if not fresh:
            jobs, read_at = self.waiting_jobs(spec.queue), time.monotonic()
        if jobs >= limit:
            raise too_many(f"model {spec.name} has {limit} jobs waiting; retry later",
                           "queue_full", QUEUE_FULL_RETRY_AFTER_SECONDS)
        with self._lock:
            self._queue_estimates[spec.queue] = (jobs + 1, read_at)  # counting this job

    def waiting_jobs(self, queue: str) -> int:
        """Messages waiting in a broker queue (not those a worker holds).

        A Redis broker is asked directly, in one round trip: going through kombu (a pooled
        connection, a channel, a passive declare) took over 100 ms under load."""
        if self._broker_redis is not None:
            with self._broker_redis.pipeline(transaction=False) as pipe:
                for suffix in KOMBU_REDIS_PRIORITY_SUFFIXES:
                    pipe.llen(queue + suffix)
                return sum(pipe.execute())
        with self._celery.pool.acquire(block=True, timeout=5) as connection:
            try:
                return connection.default_channel.queue_declare(
                    queue=queue, passive=True).message_count
            except ChannelError:  # no such queue yet (an empty Redis list does not exist)
                return 0

    def claim_idempotency_key(self, key: IdempotencyKey | None, job_id: str) -> str | None:
        """Bind the submission's Idempotency-Key (None: it has none) to its request and
        `job_id` for a while; the job id it already names, if any. A 422 when the key was used
        for another request, a 409 while the request that claimed it is still being admitted."""
        if key is None:
            return None
        claim = {"request": key.request, "job": job_id, "created": False}
        if self._redis.set(key.claim, json.dumps(claim), nx=True, ex=IDEMPOTENCY_CLAIM_SECONDS):
            return None
        existing = self._redis.get(key.claim)
        if existing is None:  # it expired just now: claim it again
            return self.claim_idempotency_key(key, job_id)
        return _replay(json.loads(existing), key.request)

    def confirm_idempotency_key(self, key: IdempotencyKey | None, job_id: str,
                                pipe: redis.client.Pipeline | None = None) -> None:
        """The job is queued: the key names it for as long as the job lives. On `pipe`, the
        MULTI that records and queues the job (api/broker.py): then no moment exists where the
        job is queued and its key could lapse, to let a retry queue it twice."""
        if key is not None:
            claim = {"request": key.request, "job": job_id, "created": True}
            (pipe or self._redis).set(key.claim, json.dumps(claim),
                                      ex=self.settings.job_ttl_seconds)

    def release_idempotency_key(self, key: IdempotencyKey | None) -> None:
        """Forget the key of a submission that was refused, so its retry is admitted afresh."""
        if key is not None:
            self._redis.delete(key.claim)


@dataclass(frozen=True)
class IdempotencyKey:
    """A submission's Idempotency-Key: the Redis key of its claim, and the request it is bound
    to (a digest of the route and the exact body)."""

    claim: str
    request: str


def idempotency_key(raw: str | None, route: str, body: bytes) -> IdempotencyKey | None:
    """Key `raw` (None: no key) of a request to `route` with `body`, for the request's client;
    a 400 when it is empty or too long."""
    if raw is None:
        return None
    if not 0 < len(raw) <= MAX_IDEMPOTENCY_KEY_LENGTH:
        raise APIError(400, f"{IDEMPOTENCY_HEADER} must be 1 to "
                       f"{MAX_IDEMPOTENCY_KEY_LENGTH} characters", "invalid_request_error",
                       param=IDEMPOTENCY_HEADER)
    digest = hashlib.sha256(raw.encode()).hexdigest()
    bound_to = hashlib.sha256(f"{route}\n".encode())
    bound_to.update(body)
    return IdempotencyKey(f"dawet:idempotency:{client_identity()}:{digest}",
                          bound_to.hexdigest())


def request_idempotency_key() -> IdempotencyKey | None:
    """The HTTP request's Idempotency-Key header, bound to its method, path and body."""
    return idempotency_key(request.headers.get(IDEMPOTENCY_HEADER),
                           f"{request.method} {request.path}", request.get_data())


def _replay(claim: dict, request_digest: str) -> str:
    """The job id of an earlier request with this Idempotency-Key, if it was this request."""
    if claim["request"] != request_digest:
        raise APIError(422, f"this {IDEMPOTENCY_HEADER} was used for a different request; "
                       "use a new key for a new request", "idempotency_key_reused",
                       param=IDEMPOTENCY_HEADER)
    if not claim["created"]:
        raise APIError(409, f"a request with this {IDEMPOTENCY_HEADER} is still being "
                       "admitted; retry shortly", "idempotency_key_in_use")
    return claim["job"]
