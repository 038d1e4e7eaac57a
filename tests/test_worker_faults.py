"""Fault injection with real processes: two workers for the demo model; one is killed or stopped
mid-generation, and the job still ends exactly once with the complete reply."""
from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest
import redis
import websocket

from conftest import (DEMO_MODEL, MODELS_FILE, engine_process_of, fresh_log_dir, stream_events,
                      submit, token_text)
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
                        lease_seconds=2.0, lease_refresh_seconds=0.3, engine_stall_seconds=3.0)
    log_dir = fresh_log_dir("logs-faults")
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


def test_a_frozen_worker_that_wakes_after_its_job_moved_writes_nothing(pair, api, pair_redis):
    _two_live_workers(pair, pair_redis)
    job = submit(api, **LONG)
    ws, events = _start_and_watch(job)
    frozen = _runner_of(pair, events)
    group = [psutil.Process(frozen.process.pid)]
    group += group[0].children(recursive=True)  # its engine process too
    for process in group:
        process.suspend()  # SIGSTOP, past the lease: the other worker takes the job over
    try:
        events = _read_to_end(ws, events)
    finally:
        for process in group:
            process.resume()
    time.sleep(3)  # the stale attempt's engine and runner go on, and try to write
    assert stream_events(job["stream_url"]) == events
    assert [e.get("state") for e in events if e["type"] == "status"] == \
        ["queued", "started", "restarted", "started"]
    assert [e["type"] for e in events].count("done") == 1
    survivor = [e["worker"] for e in events if e.get("state") == "started"][-1]
    assert not survivor.startswith(frozen.name + "-") and frozen.alive()
    after_restart = token_text(events[[e.get("state") for e in events].index("restarted"):])
    view = api.get(f"/v1/jobs/{job['id']}").json()
    assert view["text"] == after_restart and view["usage"]["completion_tokens"] == 500


def test_a_job_that_kills_its_engine_every_time_ends_with_worker_lost(pair, api, pair_redis):
    _two_live_workers(pair, pair_redis)
    job = submit(api, **LONG)
    ws = websocket.create_connection(job["stream_url"], timeout=120)
    events: list[dict] = []
    for attempt in range(1, pair.settings.max_attempts + 1):
        while [e.get("state") for e in events].count("started") < attempt:
            events.append(json.loads(ws.recv()))
        victim = _runner_of(pair, events[-1:])
        engine_process_of(victim.process.pid).kill()
        victim.process.wait(30)
        pair.add_worker(DEMO_MODEL)
    events = _read_to_end(ws, events)
    assert [e.get("state") for e in events if e["type"] == "status"] == \
        ["queued"] + ["started", "restarted"] * 2 + ["started"]
    assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "worker_lost"
    assert pair_redis.zscore(LEASES_KEY, job["id"]) is None


def test_a_worker_whose_engine_hangs_exits_and_its_job_runs_on_the_other(pair, api, pair_redis):
    _two_live_workers(pair, pair_redis)
    job = submit(api, **LONG)
    ws, events = _start_and_watch(job)
    worker = _runner_of(pair, events)
    engine = engine_process_of(worker.process.pid)
    engine.suspend()  # a hang, not a crash: the process lives and sends nothing
    assert worker.process.wait(30) == 75  # the watchdog's exit, after engine_stall_seconds
    events = _read_to_end(ws, events)
    assert [e.get("state") for e in events if e["type"] == "status"] == \
        ["queued", "started", "restarted", "started"]
    assert events[-1]["type"] == "done" and events[-1]["usage"]["completion_tokens"] == 500
    assert not engine.is_running() or engine.status() == psutil.STATUS_ZOMBIE


def test_a_redis_pause_longer_than_the_lease_restarts_no_job_and_loses_nothing(pair, api,
                                                                             pair_redis):
    """Redis stalls (CLIENT PAUSE) for longer than a lease and than the clients' socket
    timeout while jobs stream: the workers' writes wait and retry, no lease is reaped, and
    every job ends once and whole (a stream that broke resumes from the log)."""
    _two_live_workers(pair, pair_redis)
    jobs = [submit(api, **LONG) for _ in range(4)]
    for job in jobs:
        ws, _ = _start_and_watch(job)
        ws.close()
    pause_ms = int(pair.settings.lease_seconds * 4000)  # 4 leases, past the 5 s socket timeout
    pair_redis.execute_command("CLIENT", "PAUSE", pause_ms, "ALL")
    time.sleep(pause_ms / 1000)
    texts = set()
    for job in jobs:
        events = stream_events(job["stream_url"], timeout=120)
        assert [e.get("state") for e in events if e["type"] == "status"] == ["queued", "started"]
        assert [e["type"] for e in events].count("done") == 1
        assert events[-1]["type"] == "done" and events[-1]["usage"]["completion_tokens"] == 500
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        texts.add(token_text(events))
    assert len(texts) == 1  # greedy, one prompt: a lost or doubled event would show
