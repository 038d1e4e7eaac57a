"""Operations endpoints: liveness and readiness."""
from __future__ import annotations

import redis
from flask import Blueprint
from kombu.exceptions import OperationalError

from api.services import services

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    """Report that the process is alive."""
    return {"status": "ok"}


@bp.get("/readyz")
def readyz():
    """Report ready when Redis and the broker answer and a worker serves the default model."""
    svc = services()
    checks = {"redis": _redis_ok(svc.redis), "broker": _broker_ok(svc.celery)}
    default = svc.registry.default.name
    live = svc.workers.live(svc.registry.default.served_by) if checks["redis"] else []
    checks["workers"] = bool(live)
    body = {"status": "ready" if all(checks.values()) else "not_ready", "checks": checks,
            "default_model": default, "live_workers": len(live)}
    return body, 200 if body["status"] == "ready" else 503


def _redis_ok(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def _broker_ok(celery) -> bool:
    try:
        with celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
        return True
    except (OperationalError, OSError):
        return False
