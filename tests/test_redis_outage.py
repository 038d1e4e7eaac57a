"""Redis goes away and comes back: the API answers 503 in the envelope (never 500, never hangs),
open streams end with an error event, and the API and worker recover by themselves."""
from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator

import httpx
import pytest
import websocket

from conftest import DEMO_MODEL, MODELS_FILE, fresh_log_dir, stream_events, submit
from dawet.processes import Child, Stack, find_redis_server, free_port, redis_argv, wait_until
from dawet.settings import Settings

FAIL_FAST_SECONDS = 10  # a request while Redis is down must be answered within this
CHAT = {"model": DEMO_MODEL, "messages": [{"role": "user", "content": "Halo"}], "max_tokens": 4}


class OwnRedis:
    """A redis-server on a fixed port that the test stops and starts again."""

    def __init__(self, log_dir):
        self.port = free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="dawet-outage-")
        self._log = log_dir / "redis.log"
        self.child: Child | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = redis_argv(find_redis_server(), self.port, self._dir.name)
        self.child = Child("redis", argv, {}, self._log)
        self.child.start()
        wait_until(lambda: _answers(self.port), 10, "redis-server", [self.child])

    def stop(self) -> None:
        self.child.stop()


def _answers(port: int) -> bool:
    import redis
    try:
        return redis.Redis(port=port, socket_connect_timeout=0.5).ping()
    except redis.RedisError:
        return False


@pytest.fixture(scope="module")
def outage() -> Iterator[tuple[Stack, OwnRedis]]:
    log_dir = fresh_log_dir("logs-outage")
    own = OwnRedis(log_dir)
    own.start()
    settings = Settings(redis_url=own.url, models_file=MODELS_FILE, default_model=DEMO_MODEL,
                        api_port=free_port(), api_workers=1, heartbeat_seconds=0.5,
                        lease_seconds=2.0, lease_refresh_seconds=0.3,
                        stream_idle_timeout_seconds=10)
    stack = Stack(settings, log_dir=log_dir).start()
    yield stack, own
    stack.stop()
    own.stop()


def _timed(call):
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


def test_redis_down_gives_503s_and_both_sides_recover(outage):
    stack, own = outage
    with httpx.Client(base_url=stack.api_url, timeout=30) as api:
        job = submit(api, prompt="Once upon a time", min_new_tokens=500, max_new_tokens=500)
        ws = websocket.create_connection(job["stream_url"], timeout=30)
        while json.loads(ws.recv())["type"] != "token":
            pass
        own.stop()

        last = json.loads(ws.recv())
        while last["type"] == "token":
            last = json.loads(ws.recv())
        assert last["type"] == "error" and last["error"]["code"] == "service_unavailable"
        ws.close()
        for call in (lambda: api.post("/v1/generate", json={"prompt": "hi"}),
                     lambda: api.post("/v1/chat/completions", json=CHAT),
                     lambda: api.get(f"/v1/jobs/{job['id']}"),
                     lambda: api.delete(f"/v1/jobs/{job['id']}"),
                     lambda: api.get("/readyz")):
            response, seconds = _timed(call)
            assert response.status_code == 503, response.text
            assert response.json().get("error", {}).get("code", "service_unavailable") \
                == "service_unavailable" and seconds < FAIL_FAST_SECONDS
        assert api.get("/readyz").json()["checks"]["redis"] is False

        own.start()  # empty: the embedded Redis keeps nothing across a restart
        wait_until(lambda: api.get("/readyz").status_code == 200, 90, "recovery", stack.children)
        again = submit(api, prompt="Still there?", max_new_tokens=8)
        assert stream_events(again["stream_url"])[-1]["type"] == "done"
