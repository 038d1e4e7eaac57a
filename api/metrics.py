"""Prometheus metrics of the API: requests, job admissions, open streams, and queue depth.

Under gunicorn each worker process writes its samples to files in PROMETHEUS_MULTIPROC_DIR
(dawet/gunicorn_conf.py exports it) and /metrics adds them up. Without that directory (an app
built in-process) /metrics serves this process's own registry.
"""
from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import redis
from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client import (CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge,
                               Histogram, generate_latest, multiprocess)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import ValidationError

from api.errors import APIError, from_validation_error
from dawet.redis_client import broker_client

if TYPE_CHECKING:  # api.services imports this module
    from api.services import Services

logger = logging.getLogger(__name__)
bp = Blueprint("metrics", __name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

REQUESTS = Counter("dawet_http_requests_total", "HTTP requests answered, by route and status.",
                   ["route", "method", "status"])
REQUEST_SECONDS = Histogram("dawet_http_request_duration_seconds",
                            "Time to answer an HTTP request (a WebSocket: until it closes).",
                            ["route", "method"], buckets=LATENCY_BUCKETS)
JOBS_ADMITTED = Counter("dawet_jobs_admitted_total", "Jobs accepted and queued, by model.",
                        ["model"])
JOBS_REJECTED = Counter("dawet_jobs_rejected_total", "Job submissions refused, by error code.",
                        ["code"])
OPEN_STREAMS = Gauge("dawet_open_streams", "Event streams open to clients.", ["transport"],
                     multiprocess_mode="livesum")


def init_app(app: Flask) -> None:
    """Time every request and serve /metrics (call after the app's Services exist)."""
    app.extensions["dawet_backlog"] = BacklogCollector(app.extensions["dawet"])
    app.extensions["dawet_usage"] = UsageCollector(app.extensions["dawet"])
    from api.batches import BatchCollector  # api.batches imports api.services, which imports this

    app.extensions["dawet_batches"] = BatchCollector(app.extensions["dawet"])
    app.before_request(_start_timer)
    app.after_request(_count_request)
    app.register_blueprint(bp)


def note_admitted(model: str) -> None:
    """Count a job that was queued (Services.enqueue calls this)."""
    JOBS_ADMITTED.labels(model).inc()
    g.dawet_job_admitted = True


def count_admission(view):
    """Count a submission view's refusal by error code; a failure after queueing is no refusal."""

    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        try:
            return view(*args, **kwargs)
        except Exception as exc:
            if not g.get("dawet_job_admitted"):
                JOBS_REJECTED.labels(rejection_code(exc)).inc()
            raise

    return wrapper


def counted_stream(frames: Iterator[str], transport: str) -> Iterator[str]:
    """Pass a streamed response's frames through, counted as an open stream meanwhile."""
    with OPEN_STREAMS.labels(transport).track_inprogress():
        yield from frames


def rejection_code(exc: Exception) -> str:
    """The envelope code the client will see for `exc`."""
    if isinstance(exc, APIError):
        return exc.body.code
    if isinstance(exc, ValidationError):
        return from_validation_error(exc).body.code
    if isinstance(exc, redis.RedisError):
        return "service_unavailable"
    return "internal_error"


@bp.get("/metrics")
def metrics():
    """Expose every API process's metrics plus queue depth and live workers, read now."""
    registry = _process_registry()
    registry.register(current_app.extensions["dawet_backlog"])
    registry.register(current_app.extensions["dawet_usage"])
    registry.register(current_app.extensions["dawet_batches"])
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)


def _process_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    try:
        multiprocess.MultiProcessCollector(registry)
    except ValueError:  # no PROMETHEUS_MULTIPROC_DIR: a single process
        registry.register(REGISTRY)
    return registry


def _start_timer() -> None:
    g.dawet_request_started = time.perf_counter()


def _count_request(response: Response) -> Response:
    route = request.url_rule.rule if request.url_rule else "unmatched"
    REQUESTS.labels(route, request.method, str(response.status_code)).inc()
    started = g.get("dawet_request_started")
    if started is not None:
        REQUEST_SECONDS.labels(route, request.method).observe(time.perf_counter() - started)
    return response


class BacklogCollector:
    """Per model, at scrape time: jobs waiting in the broker queue and workers with a heartbeat.

    Queue depth is the LLEN of the Celery queue `dawet.<model>` on a Redis broker. Other
    brokers (RabbitMQ) report their own queues (its Prometheus plugin), so it is absent there.
    """

    def __init__(self, svc: "Services"):
        self._svc = svc
        self._broker = broker_client(svc.settings, socket_timeout=2)

    def collect(self):
        depth = GaugeMetricFamily("dawet_queue_depth", "Jobs waiting in the model's broker queue.",
                                  labels=["model"])
        live = GaugeMetricFamily("dawet_workers_live",
                                 "Workers serving the model whose heartbeat is fresh.",
                                 labels=["model"])
        try:
            for spec in self._svc.registry.entries:  # an adapter's jobs wait in its base's queue
                live.add_metric([spec.name], len(self._svc.workers.live(spec.name)))
                if self._broker is not None:
                    depth.add_metric([spec.name], self._broker.llen(spec.queue))
        except redis.RedisError:
            logger.warning("metrics: Redis unreachable; no queue depth or live workers this scrape")
            return
        yield from (depth, live)


class UsageCollector:
    """Requests and tokens per API key name and model since the service began, read from
    Redis at scrape time (one hash of keys x models, whatever the history)."""

    def __init__(self, svc: "Services"):
        self._svc = svc

    def collect(self):
        requests = CounterMetricFamily("dawet_usage_requests", "Requests admitted, by API key "
                                       "name and model.", labels=["key", "model"])
        tokens = CounterMetricFamily("dawet_usage_tokens", "Tokens used, by API key name, "
                                     "model and kind (prompt, completion).",
                                     labels=["key", "model", "kind"])
        try:
            rows = self._svc.usage.total()
        except redis.RedisError:
            logger.warning("metrics: Redis unreachable; no usage this scrape")
            return
        for row in rows:
            requests.add_metric([row.key, row.model], row.requests)
            tokens.add_metric([row.key, row.model, "prompt"], row.prompt_tokens)
            tokens.add_metric([row.key, row.model, "completion"], row.completion_tokens)
        yield from (requests, tokens)
