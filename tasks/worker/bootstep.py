"""Per-process worker resources: the engine and its model, loaded once when the worker starts.

A Celery bootstep does it, because the threads pool (which we use, so that many jobs share
one model) sends no worker_process_init. The step starts before the consumer, so no task
arrives before the model is ready. By default the engine and the model live in a child
process (tasks/engine/process.py) and this process never imports torch. Use the threads or
solo pool: prefork would fork one process per job slot, each wanting a model.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from dataclasses import dataclass

from celery import bootsteps
from celery.signals import worker_shutdown

from dawet.cpus import pin_process
from dawet.heap import freeze_startup_heap
from dawet.redis_client import redis_client, replica_wait_seconds
from dawet.settings import get_settings, pin_gpu
from model_store.registry import ModelSpec, load_registry
from model_store.tokenizer import ChatTokenizer
from tasks.worker.brokerfix import tolerate_detached_channels
from tasks.engine.factory import EngineInfo, engine_options, start_engine
from tasks.engine.process import GIL_SWITCH_SECONDS
from tasks.worker.guard import build_guard
from tasks.worker.metrics import (heartbeat_marked, mark_worker_down, report_engine_stats,
                                  start_worker_metrics)
from tasks.jobs.log import CancelListener, JobStore
from tasks.jobs.workers import Heartbeat, WorkerRegistry

logger = logging.getLogger(__name__)

EXIT_ENGINE_LOST = 70  # EX_SOFTWARE: the worker exits with it when its engine process dies
EXIT_ENGINE_STALLED = 75  # EX_TEMPFAIL: ... when its engine holds work and makes no progress
WATCHDOG_SECONDS = 1.0  # how often the watchdog looks at the engine


@dataclass
class WorkerRuntime:
    spec: ModelSpec
    runner: object  # tasks.worker.runner.JobRunner
    engine: object  # tasks.engine.interface.Engine
    started_at: float
    guard: object = None  # tasks.worker.guard.JobGuard: leases and deadlines around the runner


_runtime: WorkerRuntime | None = None


def current_runtime() -> WorkerRuntime:
    """The runtime of this worker process; tasks fail clearly if the model is not loaded."""
    if _runtime is None:
        raise RuntimeError("this worker has no model loaded (start it with `dawet worker`)")
    return _runtime


class ModelStep(bootsteps.StartStopStep):
    """Loads the worker's model at start, consumes its queue, and keeps a heartbeat."""

    requires = {"celery.worker.components:Pool"}

    def __init__(self, worker, model: str | None = None, gpu: str | None = None, **options):
        super().__init__(worker, **options)
        pin_gpu(gpu)  # before anything imports torch
        tolerate_detached_channels()
        settings = get_settings()
        registry = load_registry(settings.models_file, settings.default_model)
        self.spec = registry.serving(model)  # an adapter's base serves it, and the base's others
        if self.spec is None:
            raise SystemExit(f"unknown model {model!r}; the registry has {sorted(registry.models)}")
        worker.app.amqp.queues.select([self.spec.queue])
        self.heartbeat: Heartbeat | None = None

    def start(self, worker) -> None:
        global _runtime
        settings = get_settings()
        client = redis_client(settings)
        store = JobStore(client, settings.job_ttl_seconds, settings.redis_retry_seconds,
                         replica_wait_seconds(settings))
        runner, engine, info = _build_runner(self.spec, store, worker.hostname)
        guard = build_guard(settings, worker.app, store, runner, worker.hostname)
        _runtime = WorkerRuntime(self.spec, runner, engine, time.time(), guard)
        record = _record_fn(self.spec, worker.hostname, info)
        record = heartbeat_marked(self.spec.name, worker.hostname, record)
        self.heartbeat = Heartbeat(WorkerRegistry(client, settings.heartbeat_seconds), record)
        self.heartbeat.start()
        start_worker_metrics(settings.worker_metrics_host, settings.worker_metrics_port,
                             self.spec.name, worker.hostname, info)
        if hasattr(engine, "stalled_for"):  # an engine process (not one on this process's threads)
            threading.Thread(target=self._watch_engine, args=(engine, worker.hostname),
                             name="dawet-engine-watchdog", daemon=True).start()
        freeze_startup_heap()
        logger.info("worker %s serves %s from queue %s", worker.hostname, self.spec.name,
                    self.spec.queue)

    def _watch_engine(self, engine, worker_name: str) -> None:
        """Exit when the engine holds work and has made no progress for engine_stall_seconds
        (a hang, not a crash): the leases lapse and the jobs run again on another worker."""
        limit, checked = get_settings().engine_stall_seconds, time.monotonic()
        while True:
            time.sleep(WATCHDOG_SECONDS)
            if time.monotonic() - checked > 2 * WATCHDOG_SECONDS:
                engine.restart_stall_clock()  # this process was frozen: so was its view
            checked = time.monotonic()
            stalled = engine.stalled_for()
            if stalled > limit:
                logger.critical("the engine made no progress for %.0f s with work in hand; "
                                "exiting so that its jobs are re-run", stalled)
                mark_worker_down(self.spec.name, worker_name)
                if self.heartbeat is not None:
                    self.heartbeat.stop()  # the API sees it gone at once
                os._exit(EXIT_ENGINE_STALLED)

    def stop(self, worker) -> None:
        # Steps stop before the pool drains its running tasks, so the engine must stay up here
        # (a SIGTERM lets running jobs finish): _close_engine runs after the drain.
        if self.heartbeat is not None:
            self.heartbeat.stop()


@worker_shutdown.connect
def _close_engine(**_) -> None:
    """Stop the engine's threads once the worker has stopped and its pool has drained."""
    if _runtime is not None:
        _runtime.engine.close()


def _build_runner(spec: ModelSpec, store: JobStore, worker_name: str):
    """Start the engine (it loads the model) and wire cancel listener and runner."""
    from tasks.worker.runner import JobRunner

    settings = get_settings()
    sys.setswitchinterval(GIL_SWITCH_SECONDS)
    split = settings.engine_cpu_split() if settings.engine_process else None
    options = engine_options(settings, spec, split[0] if split else frozenset())
    engine, info = start_engine(spec, options, settings.engine_process, on_lost=_exit_with_engine)
    if split:
        pin_process(split[1])  # the engine process has its CPUs; this one keeps off them
    report_engine_stats(engine.stats)
    cancels = CancelListener(redis_client(settings), store,
                             settings.cancel_poll_seconds)
    cancels.start()
    runner = JobRunner(store, engine, ChatTokenizer(spec.path), worker_name,
                       settings.stream_chunk_seconds, cancels)
    return runner, engine, info


def _exit_with_engine() -> None:
    """The engine process died: exit at once, before a running job is failed, so the jobs'
    leases lapse and they run again on another worker (as if this worker had been killed)."""
    logger.critical("the engine process died; exiting so that running jobs are re-run")
    os._exit(EXIT_ENGINE_LOST)


def _record_fn(spec: ModelSpec, worker_name: str, info: EngineInfo):
    """A function producing this worker's liveness record for each heartbeat."""
    started_at = time.time()

    def record() -> dict:
        return {"worker": worker_name, "model": spec.name, "pid": os.getpid(),
                "device": info.device, "model_loads": info.model_loads,
                "load_seconds": round(info.load_seconds, 3), "started_at": started_at,
                "heartbeat_at": time.time()}

    return record
