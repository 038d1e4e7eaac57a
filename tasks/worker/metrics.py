"""Prometheus metrics of a worker process, served by its own HTTP server.

A worker is one process (threads or solo pool), so the default registry holds everything and
`prometheus_client.start_http_server` serves it on DAWET_WORKER_METRICS_PORT. Job timings
come from the runner's Clock, through the job's terminal event, so they are computed once.

Engine hook: the worker calls `report_engine_stats(engine.stats)` once; `stats() -> EngineStats`
gives batch size, waiting requests, KV-cache use and, from an engine process, its GPU memory.
Without the hook the batch size is the number of jobs decoding and KV-cache use is absent.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata

from prometheus_client import Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily

from tasks.engine.interface import EngineStats, PrefixCacheStats, cuda_memory_allocated
from tasks.jobs.contract import DoneEvent, ErrorEvent, Job

logger = logging.getLogger(__name__)

SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
TOKEN_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

QUEUE_WAIT = Histogram("dawet_job_queue_wait_seconds", "From submission to a worker starting it.",
                       ["model"], buckets=SECONDS_BUCKETS)
TIME_TO_FIRST_TOKEN = Histogram("dawet_job_time_to_first_token_seconds",
                                "From submission to the first token.", ["model"],
                                buckets=SECONDS_BUCKETS)
TIME_PER_OUTPUT_TOKEN = Histogram("dawet_job_time_per_output_token_seconds",
                                  "Mean time between a job's tokens after the first.", ["model"],
                                  buckets=TOKEN_SECONDS_BUCKETS)
E2E_LATENCY = Histogram("dawet_job_e2e_latency_seconds", "From submission to the job's end.",
                        ["model"], buckets=SECONDS_BUCKETS)
JOBS = Counter("dawet_jobs_total", "Jobs ended, by outcome: a finish reason, or error.",
               ["model", "outcome"])
PROMPT_TOKENS = Counter("dawet_prompt_tokens_total", "Prompt tokens of ended jobs.", ["model"])
GENERATION_TOKENS = Counter("dawet_generation_tokens_total", "Tokens generated.", ["model"])
RESTARTS = Counter("dawet_job_restarts_total",
                   "Jobs this worker's reaper restarted after their worker was lost.", ["model"])
MODEL_LOAD_SECONDS = Gauge("dawet_model_load_seconds", "Time this worker took to load its model.",
                           ["model"])
WORKER_UP = Gauge("dawet_worker_up", "1 while the worker serves its model.", ["model", "worker"])
LAST_HEARTBEAT = Gauge("dawet_worker_last_heartbeat_timestamp_seconds",
                       "Unix time of the worker's latest liveness record.", ["model", "worker"])
BUILD = Info("dawet_build", "Dawet version, inference backend and device of this worker.")


class InFlight:
    """Jobs inside the runner: waiting (no token yet) or running (decoding). All are the
    worker's entry's: its own, or one of the adapters it serves."""

    def __init__(self):
        self._clocks: dict[int, object] = {}
        self._lock = threading.Lock()

    @contextmanager
    def track(self, clock) -> Iterator[None]:
        """Count the job as in flight for the duration of the block."""
        with self._lock:
            self._clocks[id(clock)] = clock
        try:
            yield
        finally:
            with self._lock:
                self._clocks.pop(id(clock), None)

    def counts(self) -> tuple[int, int]:
        """(running, waiting); a job runs once it has a first token."""
        with self._lock:
            clocks = list(self._clocks.values())
        running = sum(clock.first_token is not None for clock in clocks)
        return running, len(clocks) - running


IN_FLIGHT = InFlight()
_engine_stats: Callable[[], EngineStats] | None = None


def report_engine_stats(stats_fn: Callable[[], EngineStats]) -> None:
    """Let the engine report batch size and KV-cache use at each scrape (the engine hook)."""
    global _engine_stats
    _engine_stats = stats_fn


def in_flight(clock):
    """Context manager: the runner holds a job whose marks are on `clock`."""
    return IN_FLIGHT.track(clock)


def observe_job(job: Job, outcome: DoneEvent | ErrorEvent, resumed_tokens: int = 0) -> None:
    """Record an ended job: outcome, tokens (not those an earlier attempt generated) and the
    timings its Clock computed."""
    if isinstance(outcome, ErrorEvent):
        JOBS.labels(job.model, "error").inc()
        return
    JOBS.labels(job.model, outcome.finish_reason.value).inc()
    PROMPT_TOKENS.labels(job.model).inc(outcome.usage.prompt_tokens)
    GENERATION_TOKENS.labels(job.model).inc(outcome.usage.completion_tokens - resumed_tokens)
    timings = outcome.timings
    QUEUE_WAIT.labels(job.model).observe(timings["queued_seconds"])
    E2E_LATENCY.labels(job.model).observe(timings["total_seconds"])
    if outcome.usage.completion_tokens:
        TIME_TO_FIRST_TOKEN.labels(job.model).observe(timings["time_to_first_token_seconds"])
    if outcome.usage.completion_tokens > 1:
        decode = timings["total_seconds"] - timings["time_to_first_token_seconds"]
        TIME_PER_OUTPUT_TOKEN.labels(job.model).observe(
            max(decode, 0.0) / (outcome.usage.completion_tokens - 1))


def mark_worker_down(model: str, worker: str) -> None:
    """The worker stops serving (its engine stalled): dawet_worker_up goes to 0."""
    WORKER_UP.labels(model, worker).set(0)


def count_restart(job: Job) -> None:
    """Count a job that the reaper restarted."""
    RESTARTS.labels(job.model).inc()


def heartbeat_marked(model: str, worker: str, record_fn: Callable[[], dict]) -> Callable[[], dict]:
    """Wrap a heartbeat record function so each beat also sets the last-heartbeat gauge."""

    def record() -> dict:
        LAST_HEARTBEAT.labels(model, worker).set(time.time())
        return record_fn()

    return record


class RuntimeCollector:
    """At scrape time: running and waiting jobs, batch size, KV-cache use and GPU memory."""

    def __init__(self, model: str):
        self._model = model

    def collect(self):
        running, waiting = IN_FLIGHT.counts()
        stats = _engine_stats() if _engine_stats is not None else None
        if stats is not None and stats.waiting is not None:
            waiting = stats.waiting
        yield _gauge("dawet_jobs_running", "Jobs decoding in this worker.", self._model, running)
        yield _gauge("dawet_jobs_waiting", "Jobs in this worker waiting for their first token.",
                     self._model, waiting)
        yield _gauge("dawet_batch_size", "Sequences in the engine's current decode batch.",
                     self._model, stats.batch_size if stats else running)
        if stats is not None and stats.kv_cache_usage is not None:
            yield _gauge("dawet_kv_cache_usage_ratio", "Fraction of the KV cache in use.",
                         self._model, stats.kv_cache_usage)
        if stats is not None and stats.prefix_cache is not None:
            yield from _prefix_cache(self._model, stats.prefix_cache)
        if stats is not None and stats.adapters_loaded is not None:
            yield _gauge("dawet_lora_adapters_loaded", "LoRA adapters the engine holds now "
                         "(at most DAWET_MAX_LOADED_ADAPTERS beyond those running).", self._model,
                         stats.adapters_loaded)
        yield from gpu_memory(stats.gpu_memory_bytes if stats is not None else None)


def _gauge(name: str, documentation: str, model: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=["model"])
    family.add_metric([model], value)
    return family


def _prefix_cache(model: str, stats: PrefixCacheStats) -> Iterator:
    """The engine's prefix cache (tasks.engine.interface.PrefixCacheStats): its hit rate is
    rate(hit tokens) / rate(queried tokens)."""
    yield _gauge("dawet_prefix_cache_tokens", "Tokens whose KV the prefix cache keeps.", model,
                 stats.tokens)
    for name, what, value in (("queried", "Prompt tokens looked up in", stats.queried_tokens),
                              ("hit", "Prompt tokens found in", stats.hit_tokens)):
        family = CounterMetricFamily(f"dawet_prefix_cache_{name}_tokens",
                                     f"{what} the prefix cache.", labels=["model"])
        family.add_metric([model], value)
        yield family


def gpu_memory(allocated: tuple[int, ...] | None = None) -> Iterator[GaugeMetricFamily]:
    """GPU memory held by the worker's tensors: as the engine reported it, else this process's."""
    allocated = cuda_memory_allocated() if allocated is None else allocated
    if not allocated:
        return
    family = GaugeMetricFamily("dawet_gpu_memory_allocated_bytes",
                               "GPU memory held by tensors of this worker.", labels=["device"])
    for index, size in enumerate(allocated):
        family.add_metric([str(index)], size)
    yield family


def start_worker_metrics(host: str, port: int, model: str, worker: str, info) -> None:
    """Publish this worker's static facts and serve /metrics on host:port (port 0: not at all).

    `info` is the engine's EngineInfo: backend, device and load time."""
    if port == 0:
        return
    BUILD.info({"version": _version(), "backend": info.backend, "device": info.device,
                "model": model})
    MODEL_LOAD_SECONDS.labels(model).set(info.load_seconds)
    WORKER_UP.labels(model, worker).set(1)
    REGISTRY.register(RuntimeCollector(model))
    try:
        start_http_server(port, addr=host)
    except OSError as exc:
        raise SystemExit(f"cannot serve worker metrics on {host}:{port} ({exc}); set "
                         "DAWET_WORKER_METRICS_PORT to a free port, or 0 to turn them off") from exc
    logger.info("worker metrics on http://%s:%d/metrics", host, port)


def _version() -> str:
    try:
        return metadata.version("dawet")
    except metadata.PackageNotFoundError:  # running from a source tree
        return "unknown"
