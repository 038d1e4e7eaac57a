"""Queue a job for its workers: its record and its broker message in one round trip.

Celery's send_task costs a round trip of its own once the job's record is written, and about
half a millisecond of the API's loop per call (kombu builds a Redis client for every publish,
and copies and declares the queue). When the broker is the job store's own Redis (Dawet's
default), the API instead writes the message that kombu's Redis transport would write, Celery's
task message in kombu's JSON envelope pushed onto the queue's list for its priority, in the
same MULTI as the job's record (and a usage hold that nothing refuses, and the confirmation of
its Idempotency-Key), after it: the job is recorded before it is queued, all in one round trip.
Other brokers (RabbitMQ, a Redis of their own) get the message from send_task, after the
record. tests/test_broker.py holds the message to kombu's own. Celery's publish signals do not
fire for it; Dawet connects none.
"""
from __future__ import annotations

import base64
import uuid
from collections.abc import Callable

import redis
from celery import Celery
from kombu.entity import PERSISTENT_DELIVERY_MODE
from kombu.serialization import dumps as serialize
from kombu.utils.json import dumps as json_dumps

from dawet.settings import Settings
from tasks.jobs.contract import Job, JobState, StatusEvent
from tasks.jobs.log import JobStore
from tasks.worker.app import GENERATE_TASK, LANE_PRIORITY, send_job

WithJob = Callable[[redis.client.Pipeline], None]  # commands written with a job (its usage hold)
# kombu's Redis transport keeps a queue as one list per priority step (0, 3, 6, 9), named
# <queue><sep><step> but for step 0, and pops 0's before 9's.
KOMBU_REDIS_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")


def in_order(*commands: WithJob | None) -> WithJob | None:
    """Commands to write with a job, these in turn (None: none)."""
    present = [command for command in commands if command is not None]
    if not present:
        return None

    def write(pipe: redis.client.Pipeline) -> None:
        for command in present:
            command(pipe)

    return write


def broker_is_job_store(settings: Settings) -> bool:
    """Whether the Celery broker is the job store's Redis (no broker URL of its own)."""
    return settings.broker_url in (None, settings.redis_url_or_fallback())


def queue_list(queue: str, priority: int) -> str:
    """The Redis list of a broker queue's messages at one of kombu's priority steps."""
    return queue + KOMBU_REDIS_PRIORITY_SUFFIXES[priority // 3]


def task_message(celery: Celery, job: Job, queue: str) -> str:
    """The JSON that kombu's Redis transport pushes for send_job(celery, job, queue): Celery's
    task message (made by Celery), in kombu's envelope, delivered by the default exchange."""
    message = celery.amqp.create_task_message(
        job.id, GENERATE_TASK, [job.model_dump(mode="json")], {}, reply_to=celery.thread_oid,
        ignore_result=None, argsrepr=f"(job {job.id},)", kwargsrepr="{}")  # as send_job's
    content_type, encoding, body = serialize(message.body, serializer="json")
    properties = {**message.properties, "delivery_mode": PERSISTENT_DELIVERY_MODE,
                  "priority": LANE_PRIORITY[job.lane], "body_encoding": "base64",
                  "delivery_info": {"exchange": "", "routing_key": queue},
                  "delivery_tag": str(uuid.uuid4())}
    return json_dumps({"body": base64.b64encode(body.encode()).decode(),
                       "content-encoding": encoding, "content-type": content_type,
                       "headers": message.headers, "properties": properties})


class JobQueue:
    """Records jobs and queues them for their workers."""

    def __init__(self, settings: Settings, store: JobStore, celery: Celery):
        self.store, self.celery = store, celery
        # Whether put() writes the broker's message itself: then a job, its message and what
        # is written with it take one MULTI.
        self.atomic = broker_is_job_store(settings)

    def put(self, job: Job, queue: str, with_job: WithJob | None = None) -> None:
        """Record the job with its `queued` event, then queue it on `queue`. `with_job` adds
        commands to the job's MULTI, before its record: only where `atomic`."""
        queued = StatusEvent(JobState.QUEUED)
        if not self.atomic:
            assert with_job is None, "commands to write with a job need an atomic queue"
            self.store.create(job, queued)
            send_job(self.celery, job, queue)
            return
        with self.store.redis.pipeline(transaction=True) as pipe:
            if with_job is not None:
                with_job(pipe)
            self.store.create_in(pipe, job, queued)
            pipe.lpush(queue_list(queue, LANE_PRIORITY[job.lane]),
                       task_message(self.celery, job, queue))
            pipe.execute()
