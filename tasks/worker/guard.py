"""What a worker checks around each job: its lease, its start deadline, and prompt logging."""
from __future__ import annotations

import logging
import time

import redis
from celery import Celery
from celery.exceptions import Reject

from dawet.settings import Settings
from model_store.registry import load_registry
from tasks.jobs.contract import DEADLINE_EXCEEDED, ErrorBody, ErrorEvent, Job
from tasks.jobs.log import EventWriteFailed, JobStore
from tasks.jobs.leases import LeaseBook, LeaseKeeper, Reaper

logger = logging.getLogger(__name__)

DEADLINE_ERROR = ErrorBody("the job did not start before its deadline", "timeout_error",
                           DEADLINE_EXCEEDED)


class JobGuard:
    """Runs a job through the runner only when this worker holds its lease and it is in time."""

    def __init__(self, store: JobStore, keeper: LeaseKeeper, runner, log_prompts: bool):
        self._store, self.keeper, self._runner = store, keeper, runner
        self._log_prompts = log_prompts

    def run(self, job: Job) -> None:
        """Run the job unless another worker runs it or its deadline passed. If Redis cannot
        even grant or return its lease, or confirm its end, the job's message goes back to the
        broker's queue."""
        try:
            self._run_held(job)
        except redis.RedisError as exc:
            logger.warning("job %s: Redis lost its lease or its end (%s); requeueing its "
                           "message", job.id, exc)
            raise Reject(exc, requeue=True) from exc
        if self._log_prompts:
            self._log_output(job.id)

    def _run_held(self, job: Job) -> None:
        fence = 0
        try:
            with self.keeper.hold(job.id) as fence:
                if not fence:
                    logger.info("job %s runs on another worker; skipping the redelivery", job.id)
                    return
                ran = self._run_attempt(job, fence)
            if ran:  # once the lease is given up: a slow WAIT must not look like a lost lease
                self._store.confirm(job.id, fence)
        finally:
            self._store.forget(job.id, fence)  # the attempt is over, however it ended

    def _run_attempt(self, job: Job, fence: int) -> bool:
        """Run (or expire) the job as attempt `fence`; False if it was handed back."""
        try:
            if not self._expire_if_late(job, fence):
                self._runner.run(job, fence)
            return True
        except (redis.RedisError, EventWriteFailed):
            logger.exception("job %s: Redis lost its start, tokens or end even after "
                             "retries; handing it back to run again", job.id)
            self.keeper.hand_back(job.id, fence)
            return False

    def _expire_if_late(self, job: Job, fence: int) -> bool:
        """End a job that never started and whose deadline passed with deadline_exceeded."""
        if not job.expired(time.time()):
            return False  # the common case costs no round trip
        last = self._store.last_event(job.id)
        if not (last and last.get("state") == "queued"):
            return False
        self._store.append(job.id, ErrorEvent(DEADLINE_ERROR), fence)
        logger.info("job %s expired before it started", job.id)
        return True

    def _log_output(self, job_id: str) -> None:
        text = "".join(e["text"] for e in self._store.read(job_id) if e["type"] == "token")
        logger.info("job %s output: %r", job_id, text)


def build_guard(settings: Settings, app: Celery, store: JobStore, runner,
                worker_name: str) -> JobGuard:
    """Wire leases, reaper and guard for one worker, on the runner's store, and start its
    lease thread."""
    from tasks.worker.app import send_job  # tasks.worker.app imports this module
    from tasks.worker.metrics import count_restart

    queues = {name: spec.queue for name, spec in
              load_registry(settings.models_file, settings.default_model).models.items()}
    book = LeaseBook(store.redis, worker_name, settings.lease_seconds)

    def send(job: Job) -> None:  # an adapter's job (one added at run time too): its base's queue
        send_job(app, job, queues[job.params.lora.base if job.params.lora else job.model])

    reaper = Reaper(book, store, send, settings.max_attempts, count_restart)
    keeper = LeaseKeeper(book, reaper, settings.lease_refresh_seconds, on_lost=runner.interrupt)
    keeper.start()
    return JobGuard(store, keeper, runner, settings.log_prompts)
