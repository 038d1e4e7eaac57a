"""The API's own broker message (api/broker.py) is the one kombu writes for send_job, so
workers take it as they take Celery's, in each lane's priority list."""
from __future__ import annotations

import json
import uuid

import pytest

from api.broker import queue_list, task_message
from conftest import DEMO_MODEL
from tasks.jobs.contract import Job, Lane, SamplingParams
from tasks.worker.app import LANE_PRIORITY, create_celery, send_job

PER_MESSAGE = {"delivery_tag"}  # a fresh uuid per message
# send_task also copies these options of send_job into the properties; no worker reads them there
SEND_TASK_EXTRAS = {"argsrepr", "kwargsrepr"}


def _without(data: dict, keys: set[str]) -> dict:
    return {key: value for key, value in data.items() if key not in keys}


@pytest.mark.parametrize("lane", list(Lane))
def test_the_message_is_the_one_kombu_writes(stack, redis_client, lane):
    celery = create_celery(stack.settings)
    job = Job(model=DEMO_MODEL, prompt_token_ids=[1, 2, 3], lane=lane,
              params=SamplingParams(max_new_tokens=4, temperature=0.7, top_p=0.9))
    queue = f"test-broker-{uuid.uuid4().hex}"
    send_job(celery, job, queue)
    listed = queue_list(queue, LANE_PRIORITY[lane])
    assert redis_client.llen(listed) == 1  # kombu pushed it onto the list we would
    theirs = json.loads(redis_client.lpop(listed))
    ours = json.loads(task_message(celery, job, queue))
    assert _without(theirs, {"properties"}) == _without(ours, {"properties"})
    assert (_without(theirs["properties"], PER_MESSAGE | SEND_TASK_EXTRAS)
            == _without(ours["properties"], PER_MESSAGE))
    redis_client.delete(*(f"_kombu.binding{kind}.{queue}" for kind in ("", "_permanent")))
