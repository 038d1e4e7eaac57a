"""Fixtures: one real stack per session (its own Redis, a Celery worker, gunicorn), and clients."""
from __future__ import annotations

import faulthandler
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import redis
import websocket

from dawet.processes import Stack, free_port
from dawet.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
MODELS_FILE = ROOT / "models.toml"
ARTIFACTS = ROOT / "test-artifacts"
DEMO_MODEL = "dawet-demo"
DEMO_BASE = "dawet-tiny"  # the registry entry whose workers serve DEMO_MODEL, an adapter over it


def _require_demo_model() -> None:
    if not (ROOT / "var/models/BUILD_INFO.json").exists():
        pytest.exit("the demo model is missing: run `make demo-model` (make test does)", 2)


@pytest.fixture(scope="session")
def stack_settings(tmp_path_factory) -> Settings:
    """Settings for the test stack: a free port, never the machine's Redis or files."""
    return Settings(redis_url=None, broker_url=None, models_file=MODELS_FILE,
                    default_model=DEMO_MODEL, api_port=free_port(), api_workers=2,
                    worker_concurrency=4, heartbeat_seconds=1.0, log_level="INFO",
                    files_dir=tmp_path_factory.mktemp("files"))


@pytest.fixture(scope="session")
def stack(stack_settings: Settings) -> Iterator[Stack]:
    """Redis, one worker for the demo model and the API, as `dawet run` starts them."""
    _require_demo_model()
    log_dir = fresh_log_dir("logs")
    running = Stack(stack_settings, log_dir=log_dir).start()
    yield running
    running.stop()


@pytest.fixture(scope="session")
def redis_client(stack: Stack) -> redis.Redis:
    return redis.Redis.from_url(stack.settings.redis_url, decode_responses=True)


@pytest.fixture()
def api(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.api_url, timeout=30) as client:
        yield client


def fresh_log_dir(name: str) -> Path:
    """test-artifacts/<name>, emptied of the last run's logs."""
    log_dir = ARTIFACTS / name
    log_dir.mkdir(parents=True, exist_ok=True)
    for old in log_dir.glob("*.log"):
        old.unlink()
    return log_dir


def engine_process_of(worker_pid: int) -> psutil.Process:
    """The engine process (tasks.engine.host) that a worker started."""
    children = psutil.Process(worker_pid).children(recursive=True)
    return next(p for p in children if "tasks.engine.host" in " ".join(p.cmdline()))


def submit(api: httpx.Client, **body) -> dict:
    """POST /v1/generate and return the 202 body."""
    response = api.post("/v1/generate", json={"model": DEMO_MODEL, **body})
    assert response.status_code == 202, response.text
    return response.json()


def stream_events(url: str, timeout: float = 60) -> list[dict]:
    """Read every frame of a job stream until the server closes it."""
    ws = websocket.create_connection(url, timeout=timeout)
    events = []
    try:
        while True:
            frame = ws.recv()
            if not frame:
                break
            events.append(json.loads(frame))
    except websocket.WebSocketConnectionClosedException:
        pass
    finally:
        ws.close()
    return events


def wait_until(check, timeout: float, what: str, interval: float = 0.01) -> None:
    """Poll `check` until it is true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


def all_at_once(call, items: list) -> list:
    """`call(item)` for every item at the same time, each on a thread; the results in order."""
    results: list = [None] * len(items)

    def run(index: int) -> None:
        results[index] = call(items[index])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(items))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results


def token_text(events: list[dict]) -> str:
    return "".join(e["text"] for e in events if e["type"] == "token")


@pytest.fixture(scope="session", autouse=True)
def _offline() -> None:
    """No test may reach a model hub."""
    os.environ["HF_HUB_OFFLINE"] = "1"


EXIT_GRACE_SECONDS = 60


def pytest_sessionfinish(session, exitstatus) -> None:
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


def pytest_unconfigure(config) -> None:
    """If the interpreter has not exited a minute after the run, print every thread's stack and
    exit with the run's status: a hang at exit must not cost CI its whole time limit."""
    status = config.stash.get(_EXIT_STATUS, 1)

    def watchdog() -> None:
        time.sleep(EXIT_GRACE_SECONDS)
        print(f"pytest had not exited {EXIT_GRACE_SECONDS}s after the run; threads:",
              file=sys.__stderr__, flush=True)
        faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)
        os._exit(status)

    threading.Thread(target=watchdog, name="exit-watchdog", daemon=True).start()
    # If no Python thread can run any more, the C-level timer still dumps the stacks and exits.
    faulthandler.dump_traceback_later(EXIT_GRACE_SECONDS + 30, exit=True, file=sys.__stderr__)


_EXIT_STATUS = pytest.StashKey[int]()
