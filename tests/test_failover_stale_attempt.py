"""A restart that returns to the worker it left: killing that worker must restart it again.

Real processes, two workers for the demo model (two job slots each), short leases. The job
runs on worker X, which is frozen (SIGSTOP) past its lease, so the other worker Y reaps the
lease and re-queues the job. Y is at capacity (two filler jobs), so the restart message waits
in the queue, and X takes it when it wakes: X runs a new attempt of the job beside its own
stale one, which is still winding down. The stale attempt's end must not release the new
attempt's lease (they share the owner's name; only the fence tells them apart): once it did,
and when X was then killed nothing was left to lapse, so no reaper restarted the job and the
client's stream ended with `stream_timeout`.

What the test controls, so that it depends neither on the host's speed nor on a race:
- Y's engine is frozen while its fillers run, so Y stays at capacity however fast it generates.
- X's engine is frozen a moment before X's Celery process and resumed only once the new attempt
  has started on X, so the stale attempt (which waits for its engine) ends after the new attempt
  claimed the lease. A plain freeze and resume of both gave the same order in scratch runs, where
  the stale attempt ended about a quarter of a second after the new attempt's claim.
- X is killed as soon as its stale attempt's task has returned, while the new attempt generates.
"""
from __future__ import annotations

import json
import re
import signal
import threading
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest
import redis

from conftest import (DEMO_BASE, DEMO_MODEL, MODELS_FILE, engine_process_of, fresh_log_dir,
                      wait_until)
from dawet.processes import Child, Stack, free_port
from dawet.settings import Settings
from tasks.jobs.leases import LEASES_KEY
from tasks.jobs.log import OWNERS_KEY
from tasks.jobs.workers import WorkerRegistry

QUEUE = f"dawet.{DEMO_BASE}"
STREAM_IDLE_SECONDS = 15.0
CHAT = {"model": DEMO_MODEL, "messages": [{"role": "user", "content": "Tell me a long story"}],
        "stream": True, "max_tokens": 200, "min_tokens": 200, "temperature": 0}
# Y's engine is frozen while its fillers hold its slots, so they need not be long.
FILLER = {"model": DEMO_MODEL, "prompt": "Once upon a time", "min_new_tokens": 100,
          "max_new_tokens": 100, "temperature": 0.0}
END_WITHIN_SECONDS = 300  # the fillers, then the job, on a loaded host


@pytest.fixture(scope="module")
def pair() -> Iterator[Stack]:
    """Redis, two workers for the demo model (two job slots each) and the API, short leases.
    The engine watchdog is slow enough not to fire while the test holds an engine frozen."""
    settings = Settings(models_file=MODELS_FILE, default_model=DEMO_MODEL, api_port=free_port(),
                        api_workers=1, worker_concurrency=2, heartbeat_seconds=0.5,
                        lease_seconds=3.0, lease_refresh_seconds=0.3, engine_stall_seconds=30.0,
                        stream_idle_timeout_seconds=STREAM_IDLE_SECONDS)
    running = Stack(settings, models=[DEMO_MODEL, DEMO_MODEL],
                    log_dir=fresh_log_dir("logs-failover-repro")).start()
    yield running
    running.stop()


@pytest.fixture()
def pair_redis(pair: Stack) -> redis.Redis:
    return redis.Redis.from_url(pair.settings.redis_url, decode_responses=True)


def _events(r: redis.Redis, job_id: str) -> list[dict]:
    return [json.loads(fields["event"]) for _, fields in r.xrange(f"dawet:job:{{{job_id}}}:log")]


def _starts(r: redis.Redis, job_id: str) -> list[str]:
    return [e["worker"] for e in _events(r, job_id) if e.get("state") == "started"]


def _states(r: redis.Redis, job_id: str) -> list[str]:
    return [e["state"] for e in _events(r, job_id) if e["type"] == "status"]


def _lease_state(r: redis.Redis, job_id: str) -> dict:
    job = r.hgetall(f"dawet:job:{{{job_id}}}")
    return {"lease": r.zscore(LEASES_KEY, job_id), "owner": r.hget(OWNERS_KEY, job_id),
            **{k: job.get(k) for k in ("fence", "attempts", "ended")}}


def _broker_state(r: redis.Redis) -> dict:
    """The model's queue length and the task ids of kombu's unacknowledged deliveries."""
    unacked = [json.loads(raw)[0]["headers"]["id"] for raw in r.hvals("unacked")]
    return {"queued": r.llen(QUEUE), "unacked": unacked}


def _tasks_returned(worker: Child, job_id: str) -> int:
    """How many of the job's Celery tasks have returned on this worker, by its log."""
    return len(re.findall(rf"dawet\.generate\[{job_id}\] succeeded", worker.log_tail(100_000)))


class ChatStream:
    """POST /v1/chat/completions with stream=true on a thread, keeping every SSE payload."""

    def __init__(self, base_url: str):
        self.job_id: str | None = None
        self.payloads: list[str] = []
        self._opened = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(base_url,), daemon=True)
        self._thread.start()
        assert self._opened.wait(30), "the chat completion did not open"

    def _run(self, base_url: str) -> None:
        with httpx.Client(base_url=base_url, timeout=END_WITHIN_SECONDS) as client:
            with client.stream("POST", "/v1/chat/completions", json=CHAT) as response:
                assert response.status_code == 200, response.read()
                self.job_id = response.headers["X-Dawet-Job-Id"]
                self._opened.set()
                for line in response.iter_lines():
                    if line:
                        self.payloads.append(line.removeprefix("data: "))

    def wait_end(self, timeout: float) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the stream neither ended nor timed out"


def test_a_job_whose_restart_returns_to_its_frozen_worker_survives_that_worker_being_killed(
        pair, pair_redis):
    r = pair_redis
    wait_until(lambda: len(WorkerRegistry(r, 1.0).live(DEMO_BASE)) == 2, 60, "two live workers",
               interval=0.2)
    stream = ChatStream(pair.api_url)
    job_id = stream.job_id
    wait_until(lambda: any(e["type"] == "token" for e in _events(r, job_id)), 30,
               "the job's first token")
    x_name = _starts(r, job_id)[0]
    x = pair.child(x_name.split("-", 1)[0])
    y = next(c for c in pair.children if c.name.startswith("worker") and c is not x)
    x_celery, x_engine = psutil.Process(x.process.pid), engine_process_of(x.process.pid)
    y_engine = engine_process_of(y.process.pid)

    # Freeze X past its lease (its engine first: then X has read all its engine sent, and its
    # stale attempt can end only once that engine answers). Y's reaper moves the job on.
    x_engine.suspend()
    time.sleep(0.3)
    x_celery.suspend()
    try:
        try:
            time.sleep(1.2)  # X's pending BRPOP (1 s) has expired: new messages go to Y only
            with httpx.Client(base_url=pair.api_url, timeout=30) as api:
                fillers = [api.post("/v1/generate", json=FILLER).json()["id"] for _ in range(2)]
            try:
                wait_until(lambda: all(_starts(r, f) for f in fillers), 15, "the fillers' start")
            finally:
                y_engine.suspend()  # Y stays at capacity, however fast it would generate
            assert all(_starts(r, f)[0].startswith(y.name + "-") for f in fillers), \
                "the fillers must run on Y, which is then at capacity"
            wait_until(lambda: "restarted" in _states(r, job_id), 15,
                       "Y's reaper to restart the job while X is frozen")
            wait_until(lambda: r.llen(QUEUE) == 1, 15,
                       "the restart message to wait in the queue (Y has no free slot)")
        finally:
            x_celery.resume()  # X takes the restart message; its stale attempt is still in hand
        wait_until(lambda: len(_starts(r, job_id)) == 2, 15, "the new attempt's start")
    finally:
        x_engine.resume()
        y_engine.resume()
    assert _starts(r, job_id) == [x_name, x_name], "the restart went back to X (the set-up)"

    # The stale attempt ends once its engine answers; kill X while the new attempt generates.
    wait_until(lambda: _tasks_returned(x, job_id) >= 1, 15, "the stale attempt's end",
               interval=0.005)
    before_kill = _lease_state(r, job_id)
    x.process.send_signal(signal.SIGKILL)  # its engine dies with it
    x.process.wait(30)
    assert before_kill["ended"] is None, "the new attempt had finished before the kill"

    stream.wait_end(END_WITHIN_SECONDS)
    events = _events(r, job_id)
    states = [(e["state"], e.get("worker")) for e in events if e["type"] == "status"]
    assert stream.payloads and stream.payloads[-1] == "[DONE]", (
        f"the stream ended with {stream.payloads[-1:]!r} instead of a reply; job statuses "
        f"{states}; the job's lease just before X was killed: {before_kill}; now: "
        f"{_lease_state(r, job_id)}; broker: {_broker_state(r)}")
    survivor = _starts(r, job_id)[-1]
    assert states[-2:] == [("restarted", None), ("started", survivor)]
    assert survivor.startswith(y.name + "-")
    assert events[-1]["type"] == "done" and [e["type"] for e in events].count("done") == 1
