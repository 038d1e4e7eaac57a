"""Where every Redis client and the Celery broker address are made from settings.

Without sentinels, a client for DAWET_REDIS_URL. With DAWET_REDIS_SENTINELS, a client that asks
the sentinels for the primary of DAWET_REDIS_SENTINEL_MASTER each time it connects: after a
failover its next connection reaches the new primary, and a demoted primary that answers
READONLY counts as a lost connection (redis-py's sentinel pool). What was in flight when the
primary died fails as a connection error, which the callers retry: a job's writes for
DAWET_REDIS_RETRY_SECONDS (tasks/jobs/log.py), streams from their last sequence number
(api/services.py), background threads at their next beat.
"""
from __future__ import annotations

from urllib.parse import quote

import redis
from redis.sentinel import Sentinel

from dawet.settings import Settings

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
# A sentinel that does not answer within this is skipped for the next one.
SENTINEL_TIMEOUTS = {"socket_timeout": 1.0, "socket_connect_timeout": 1.0}


def redis_client(settings: Settings, **options) -> redis.Redis:
    """A client for Dawet's Redis (its current primary, with sentinels); `options` are
    redis-py's (timeouts, decode_responses). Give each listener thread a client of its own."""
    if not settings.redis_sentinels:
        return redis.Redis.from_url(settings.redis_url_or_fallback(), **options)
    sentinels = Sentinel(settings.redis_sentinel_addresses(), sentinel_kwargs=SENTINEL_TIMEOUTS)
    return sentinels.master_for(settings.redis_sentinel_master,
                                password=settings.redis_sentinel_password, **options)


def broker_client(settings: Settings, **options) -> redis.Redis | None:
    """A client for the Celery broker's Redis, to read queue lengths; None when the broker is
    no Redis (RabbitMQ) or only kombu reaches it (a sentinel:// broker_url)."""
    if settings.broker_url is None:
        return redis_client(settings, **options)
    if settings.broker_url.startswith(REDIS_SCHEMES):
        return redis.Redis.from_url(settings.broker_url, **options)
    return None


def celery_broker(settings: Settings) -> tuple[str, dict]:
    """The Celery broker URL, and the transport options it needs besides Dawet's own: with
    sentinels (and no broker_url), kombu's sentinel transport on the same primary."""
    if settings.broker_url or not settings.redis_sentinels:
        return settings.broker_url_or_redis(), {}
    password = settings.redis_sentinel_password
    auth = f":{quote(password, safe='')}@" if password else ""
    url = ";".join(f"sentinel://{auth}{host}:{port}/0"
                   for host, port in settings.redis_sentinel_addresses())
    return url, {"master_name": settings.redis_sentinel_master,
                 "sentinel_kwargs": SENTINEL_TIMEOUTS}


def failover_seconds(settings: Settings) -> float:
    """How long a reader waits for Redis to come back before it gives up: with sentinels a
    replica takes over with the data, so it is worth waiting for; without, Redis coming back
    is a restart that may have lost the log, and the reader is told at once."""
    return settings.redis_retry_seconds if settings.redis_sentinels else 0.0


def replica_wait_seconds(settings: Settings) -> float:
    """How long a job's milestones wait for a replica to hold them (JobStore.replicate); only
    with sentinels, where a replica may become the primary."""
    return settings.redis_replica_wait_seconds if settings.redis_sentinels else 0.0
