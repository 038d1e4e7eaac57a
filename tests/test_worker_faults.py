"""Fault injection with real processes: two workers for the demo model; one is killed or stopped
mid-generation, and the job still ends exactly once with the complete reply."""
from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator

import httpx
import pytest
import redis
import websocket

from conftest import ARTIFACTS, DEMO_MODEL, MODELS_FILE, stream_events, submit, token_text
from dawet.processes import Stack, free_port
from dawet.settings import Settings
from tasks.worker.app import GENERATE_TASK, create_celery
from tasks.jobs.leases import LEASES_KEY
from tasks.jobs.workers import WorkerRegistry

LONG = {"prompt": "Once upon a time", "min_new_tokens": 500, "max_new_tokens": 500,
        "temperature": 0.0}
RESTART_WITHIN_SECONDS = 15


@pytest.fixture(scope="module")
def pair() -> Iterator[Stack]:
    """Redis, two workers for the demo model and the API, with short leases."""
    settings = Settings(models_file=MODELS_FILE, default_model=DEMO_MODEL, api_port=free_port(),
                        api_workers=1, worker_concurrency=2, heartbeat_seconds=0.5,
                        lease_seconds=2.0, lease_refresh_seconds=0.3)
    log_dir = ARTIFACTS / "logs-faults"
    log_dir.mkdir(parents=True, exist_ok=True)
    for old in log_dir.glob("*.log"):
        old.unlink()
    running = Stack(settings, models=[DEMO_MODEL, DEMO_MODEL], log_dir=log_dir).start()
    yield running
    running.stop()


@pytest.fixture()
def api(pair: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=pair.api_url, timeout=30) as client:
        yield client


@pytest.fixture()
def pair_redis(pair: Stack) -> redis.Redis:
    return redis.Redis.from_url(pair.settings.redis_url, decode_responses=True)


def _two_live_workers(pair: Stack, pair_redis: redis.Redis) -> None:
    """Top the stack up to two workers, and wait until both beat."""
    while sum(c.name.startswith("worker") and c.alive() for c in pair.children) < 2:
        pair.add_worker(DEMO_MODEL)
    deadline = time.monotonic() + 120
    while len(WorkerRegistry(pair_redis, 1.0).live(DEMO_MODEL)) < 2:
        assert time.monotonic() < deadline, "the replacement worker did not come up"
        time.sleep(0.2)


def _start_and_watch(job: dict) -> tuple[websocket.WebSocket, list[dict]]:
    """Open the job's stream and read until its first token."""
    ws = websocket.create_connection(job["stream_url"], timeout=60)
    events = [json.loads(ws.recv())]
    while events[-1]["type"] != "token":
        events.append(json.loads(ws.recv()))
    return ws, events


def _read_to_end(ws: websocket.WebSocket, events: list[dict]) -> list[dict]:
    while events[-1]["type"] not in ("done", "error"):
        events.append(json.loads(ws.recv()))
    ws.close()
    return events


def _runner_of(pair: Stack, events: list[dict]):
    """The worker Child named in the job's `started` event."""
    worker = next(e["worker"] for e in events if e.get("state") == "started")
    return pair.child(worker.split("-", 1)[0])


def test_a_killed_workers_job_is_restarted_on_the_other_and_completes_once(pair, api,
                                                                           pair_redis):
    _two_live_workers(pair, pair_redis)
    job = submit(api, **LONG)
    ws, events = _start_and_watch(job)
    victim = _runner_of(pair, events)
    victim.process.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    while events[-1].get("state") != "restarted":
        events.append(json.loads(ws.recv()))
    assert time.monotonic() - killed_at < RESTART_WITHIN_SECONDS
    assert events[-2]["type"] == "token", "the kill landed mid-generation"
    events = _read_to_end(ws, events)

    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    states = [e["state"] for e in events if e["type"] == "status"]
    assert states == ["queued", "started", "restarted", "started"]
    survivor = [e["worker"] for e in events if e.get("state") == "started"][-1]
    assert not survivor.startswith(victim.name + "-")
    assert [e["type"] for e in events].count("done") == 1 and events[-1]["type"] == "done"
    after_restart = token_text(events[[e.get("state") for e in events].index("restarted"):])
    view = api.get(f"/v1/jobs/{job['id']}").json()
    assert view["state"] == "succeeded" and view["text"] == after_restart
    assert view["usage"]["completion_tokens"] == 500
    assert pair_redis.zscore(LEASES_KEY, job["id"]) is None


def test_a_redelivered_job_runs_neither_beside_its_live_worker_nor_after_its_end(pair, api,
                                                                                pair_redis):
    _two_live_workers(pair, pair_redis)
    job = submit(api, **LONG)
    ws, events = _start_and_watch(job)
    data = json.loads(pair_redis.hget(f"dawet:job:{{{job['id']}}}", "job"))
    celery = create_celery(pair.settings)
    send = lambda: celery.send_task(GENERATE_TASK, args=[data], queue=f"dawet.{DEMO_MODEL}",  # noqa: E731
                                    task_id=job["id"])
    send()  # as the broker would after the visibility timeout, while the job runs
    events = _read_to_end(ws, events)
    send()  # and after it ended
    time.sleep(2)
    assert stream_events(job["stream_url"]) == events
    assert [e.get("state") for e in events].count("started") == 1
    assert events[-1]["type"] == "done" and events[-1]["usage"]["completion_tokens"] == 500


def test_sigterm_drains_the_running_job_before_the_worker_exits(pair, api, pair_redis):
    _two_live_workers(pair, pair_redis)
    job = submit(api, **LONG)
    ws, events = _start_and_watch(job)
    worker = _runner_of(pair, events)
    worker.process.send_signal(signal.SIGTERM)
    events = _read_to_end(ws, events)
    assert worker.process.wait(30) == 0
    assert [e.get("state") for e in events if e["type"] == "status"] == ["queued", "started"]
    assert events[-1]["type"] == "done" and events[-1]["usage"]["completion_tokens"] == 500
