"""Background threads that must outlive any one failure (heartbeat, leases, cancels).

A thread that died on an unexpected exception used to leave its worker looking alive while
its jobs' leases lapsed, or its cancels went unheard. Each loop runs its iterations through
`survive`, which logs and counts every failure and lets the next iteration try again.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import redis
from prometheus_client import Counter

logger = logging.getLogger(__name__)

BACKGROUND_ERRORS = Counter("dawet_background_errors_total",
                            "Failures a background thread survived, by thread.", ["thread"])


def survive(thread: str, iteration: Callable[[], None]) -> bool:
    """Run one iteration of a background loop; log and count a failure instead of dying.
    Returns whether the iteration succeeded."""
    try:
        iteration()
        return True
    except redis.RedisError as exc:  # the usual one: the next iteration retries
        logger.warning("%s: Redis unreachable (%s); retrying", thread, exc)
    except Exception:  # noqa: BLE001 - anything else too: the thread must go on
        logger.exception("%s: an iteration failed; going on", thread)
    BACKGROUND_ERRORS.labels(thread).inc()
    return False
