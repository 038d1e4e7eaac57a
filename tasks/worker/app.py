"""The Celery application: broker, reliability settings and worker options. No torch here."""
from __future__ import annotations

from celery import Celery
from click import Option

from dawet.redis_client import celery_broker
from dawet.settings import Settings, get_settings
from tasks.jobs.contract import Job, Lane

GENERATE_TASK = "dawet.generate"
PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.25,
                        "interval_max": 0.5}
# The message priority of each lane. kombu's Redis transport keeps one list per priority and
# pops 0's before 9's, so a worker takes a batch line only when no interactive job waits
# (RabbitMQ honours it only on a queue declared with x-max-priority).
LANE_PRIORITY = {Lane.INTERACTIVE: 0, Lane.BATCH: 9}


def create_celery(settings: Settings) -> Celery:
    """Build the Celery app for these settings (the API and workers each make one)."""
    broker, transport_options = celery_broker(settings)
    app = Celery("dawet", broker=broker, include=["tasks.worker.generate"])
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # results travel through the job's event log
        task_acks_late=True,  # a job is acknowledged only after it ran
        task_reject_on_worker_lost=True,  # ... and handed back if its worker dies
        worker_prefetch_multiplier=1,
        # No remote control (Dawet sends none): its pidbox queue is exclusive to the worker's
        # broker connection, so a worker cut off from RabbitMQ that reconnected before RabbitMQ
        # dropped its old connection died on RESOURCE_LOCKED (tests/test_hosts_apart.py).
        worker_enable_remote_control=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_seconds,
                                  **transport_options},
        # A submission while the broker is down fails fast (the API answers 503), not after minutes.
        task_publish_retry_policy=PUBLISH_RETRY_POLICY,
        worker_hijack_root_logger=False,
    )
    _add_worker_options(app)
    return app


def send_job(app: Celery, job: Job, queue: str) -> None:
    """Queue a job for its model's workers, at its lane's priority; the Celery task id is the
    job id.

    The repr Celery shows for the task's arguments is the job id: by default it would format
    the whole job, prompt token ids included, on every submission."""
    app.send_task(GENERATE_TASK, args=[job.model_dump(mode="json")], queue=queue, task_id=job.id,
                  priority=LANE_PRIORITY[job.lane], argsrepr=f"(job {job.id},)", kwargsrepr="{}")


def _add_worker_options(app: Celery) -> None:
    """`celery worker --model NAME --gpu N`: the model to serve and the GPU to pin."""
    from tasks.worker.bootstep import ModelStep  # loads no torch until the worker starts

    app.user_options["worker"].add(Option(
        ["--model"], default=None, help="Registry model to serve (default: DAWET_DEFAULT_MODEL)."))
    app.user_options["worker"].add(Option(
        ["--gpu"], default=None, help="GPU index to pin, set as CUDA_VISIBLE_DEVICES."))
    app.steps["worker"].add(ModelStep)


app = create_celery(get_settings())
