"""Fault injection with real processes: two workers for the demo model; one is killed or stopped
mid-generation, and the job still ends exactly once with the complete reply."""
from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest
import redis
import websocket
from openai import OpenAI

from conftest import (DEMO_BASE, DEMO_MODEL, MODELS_FILE, engine_process_of, fresh_log_dir,
                      stream_events, submit, token_text, wait_until)
from dawet.processes import Stack, free_port
from dawet.settings import Settings
from tasks.worker.app import GENERATE_TASK, create_celery
from tasks.jobs.leases import LEASES_KEY
from tasks.jobs.log import OWNERS_KEY
from test_chat_page import PHONE, REPLY, _send, _settings, _wait_reply, browser  # noqa: F401
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
    while len(WorkerRegistry(pair_redis, 1.0).live(DEMO_BASE)) < 2:
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


def _long_job_running(pair: Stack, api: httpx.Client, pair_redis: redis.Redis):
    """With two live workers, a LONG job that has streamed its first token: (job, its open
    stream, the events so far, the worker Child running it)."""
    _two_live_workers(pair, pair_redis)
    job = submit(api, **LONG)
    ws, events = _start_and_watch(job)
    return job, ws, events, _runner_of(pair, events)


def _runner_of(pair: Stack, events: list[dict]):
    """The worker Child named in the job's `started` event."""
    worker = next(e["worker"] for e in events if e.get("state") == "started")
    return pair.child(worker.split("-", 1)[0])


@pytest.fixture(scope="module")
def uninterrupted(pair: Stack) -> str:
    """LONG's reply when no worker dies (greedy: the same every time)."""
    with httpx.Client(base_url=pair.api_url, timeout=120) as api:
        return token_text(stream_events(submit(api, **LONG)["stream_url"], timeout=120))


def _assert_one_continued_reply(events: list[dict], reference: str) -> None:
    """The reply went on at the restart: nothing repeated or lost, every token counted once."""
    restarted = next(e for e in events if e.get("state") == "restarted")
    assert restarted["resumes_after"] == restarted["seq"] - 1
    assert token_text(events) == reference
    assert events[-1]["usage"]["completion_tokens"] == LONG["max_new_tokens"]


def test_a_killed_workers_job_is_restarted_on_the_other_and_completes_once(pair, api,
                                                                           pair_redis,
                                                                           uninterrupted):
    job, ws, events, victim = _long_job_running(pair, api, pair_redis)
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
    _assert_one_continued_reply(events, uninterrupted)
    view = api.get(f"/v1/jobs/{job['id']}").json()
    assert view["state"] == "succeeded" and view["text"] == uninterrupted
    assert view["usage"]["completion_tokens"] == 500
    assert pair_redis.zscore(LEASES_KEY, job["id"]) is None


def test_a_redelivered_job_runs_neither_beside_its_live_worker_nor_after_its_end(pair, api,
                                                                                pair_redis):
    _two_live_workers(pair, pair_redis)
    job = submit(api, **LONG)
    ws, events = _start_and_watch(job)
    data = json.loads(pair_redis.hget(f"dawet:job:{{{job['id']}}}", "job"))
    celery = create_celery(pair.settings)
    send = lambda: celery.send_task(GENERATE_TASK, args=[data], queue=f"dawet.{DEMO_BASE}",  # noqa: E731
                                    task_id=job["id"])
    send()  # as the broker would after the visibility timeout, while the job runs
    events = _read_to_end(ws, events)
    send()  # and after it ended
    time.sleep(2)
    assert stream_events(job["stream_url"]) == events
    assert [e.get("state") for e in events].count("started") == 1
    assert events[-1]["type"] == "done" and events[-1]["usage"]["completion_tokens"] == 500


def test_sigterm_drains_the_running_job_before_the_worker_exits(pair, api, pair_redis):
    job, ws, events, worker = _long_job_running(pair, api, pair_redis)
    worker.process.send_signal(signal.SIGTERM)
    events = _read_to_end(ws, events)
    assert worker.process.wait(30) == 0
    assert [e.get("state") for e in events if e["type"] == "status"] == ["queued", "started"]
    assert events[-1]["type"] == "done" and events[-1]["usage"]["completion_tokens"] == 500


def test_a_frozen_worker_that_wakes_after_its_job_moved_writes_nothing(pair, api, pair_redis,
                                                                       uninterrupted):
    job, ws, events, frozen = _long_job_running(pair, api, pair_redis)
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
    _assert_one_continued_reply(events, uninterrupted)
    view = api.get(f"/v1/jobs/{job['id']}").json()
    assert view["text"] == uninterrupted and view["usage"]["completion_tokens"] == 500


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


def test_a_worker_whose_engine_hangs_exits_and_its_job_runs_on_the_other(pair, api, pair_redis,
                                                                          uninterrupted):
    job, ws, events, worker = _long_job_running(pair, api, pair_redis)
    engine = engine_process_of(worker.process.pid)
    engine.suspend()  # a hang, not a crash: the process lives and sends nothing
    assert worker.process.wait(30) == 75  # the watchdog's exit, after engine_stall_seconds
    events = _read_to_end(ws, events)
    assert [e.get("state") for e in events if e["type"] == "status"] == \
        ["queued", "started", "restarted", "started"]
    assert events[-1]["type"] == "done"
    _assert_one_continued_reply(events, uninterrupted)
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


# The same request through each transport: greedy, LONG's length forced.
FORCED = {"max_tokens": 300, "temperature": 0.0, "extra_body": {"min_tokens": 300}}
CHAT = {"model": DEMO_MODEL, "messages": [{"role": "user", "content": "Ceritakan sebuah dongeng."}],
        **FORCED}
TEXT = {"model": DEMO_MODEL, "prompt": "Once upon a time", **FORCED}


def _sdk(pair: Stack) -> OpenAI:
    return OpenAI(base_url=f"{pair.api_url}/v1", api_key="unused", max_retries=0, timeout=120)


def _kill_the_runner_once_it_writes(pair: Stack, api: httpx.Client, job_id: str) -> None:
    """SIGKILL the worker running the job, once the job has delivered a token."""
    wait_until(lambda: api.get(f"/v1/jobs/{job_id}").json()["text"], 60,
               "the job's first token", interval=0.05)
    worker = api.get(f"/v1/jobs/{job_id}").json()["worker"]
    pair.child(worker.split("-", 1)[0]).process.send_signal(signal.SIGKILL)


@pytest.mark.parametrize("kind", ["chat", "text"])
def test_an_sse_client_gets_one_reply_across_a_workers_death(pair, api, pair_redis, kind):
    _two_live_workers(pair, pair_redis)
    sdk = _sdk(pair)
    create, body = ((sdk.chat.completions, CHAT) if kind == "chat" else (sdk.completions, TEXT))
    reference = create.create(**body)
    with create.with_streaming_response.create(**body, stream=True,
                                               stream_options={"include_usage": True}) as reply:
        job_id = reply.headers["X-Dawet-Job-Id"]
        killer = threading.Thread(target=_kill_the_runner_once_it_writes,
                                  args=(pair, api, job_id))
        killer.start()
        chunks = list(reply.parse())
        killer.join()
    pieces = [c.choices[0].delta.content if kind == "chat" else c.choices[0].text
              for c in chunks if c.choices]
    expected = (reference.choices[0].message.content if kind == "chat"
                else reference.choices[0].text)
    assert "".join(p or "" for p in pieces) == expected
    assert chunks[-1].usage.completion_tokens == 300
    assert "restarted" in _states(pair, job_id), "the kill landed after the job ended"


def test_a_waiting_chat_completion_gets_one_reply_across_a_workers_death(pair, api, pair_redis):
    _two_live_workers(pair, pair_redis)
    sdk = _sdk(pair)
    reference = sdk.chat.completions.create(**CHAT).choices[0].message.content
    before = set(pair_redis.hkeys(OWNERS_KEY))
    replies: list = []
    waiter = threading.Thread(target=lambda: replies.append(
        sdk.chat.completions.with_raw_response.create(**CHAT)))
    waiter.start()
    wait_until(lambda: set(pair_redis.hkeys(OWNERS_KEY)) - before, 60, "the job's lease")
    (job_id,) = set(pair_redis.hkeys(OWNERS_KEY)) - before
    _kill_the_runner_once_it_writes(pair, api, job_id)
    waiter.join(180)
    (raw,) = replies
    completion = raw.parse()
    assert raw.headers["X-Dawet-Job-Id"] == job_id
    assert completion.choices[0].message.content == reference
    assert completion.usage.completion_tokens == 300
    assert "restarted" in _states(pair, job_id), "the kill landed after the job ended"


def _states(pair: Stack, job_id: str) -> list[str]:
    events = stream_events(f"{pair.api_url.replace('http', 'ws', 1)}/v1/jobs/{job_id}/stream")
    return [e["state"] for e in events if e["type"] == "status"]


@pytest.fixture()
def pair_page(browser, pair):
    """The chat page, served by the pair's API."""
    context = browser.new_context(viewport=PHONE, base_url=pair.api_url)
    context.set_default_timeout(120_000)
    opened = context.new_page()
    opened.goto("/")
    opened.wait_for_selector("body[data-ready=true]")
    yield opened
    context.close()


def test_the_chat_page_shows_one_reply_across_a_workers_death(pair, api, pair_redis, pair_page):
    _two_live_workers(pair, pair_redis)
    _settings(pair_page, max_new_tokens=300, min_new_tokens=300)
    _send(pair_page, "Ceritakan sebuah dongeng.")
    pair_page.wait_for_selector(f"{REPLY}[data-job-id]")
    job_id = pair_page.locator(REPLY).first.get_attribute("data-job-id")
    _kill_the_runner_once_it_writes(pair, api, job_id)
    text = _wait_reply(pair_page, 0)
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert "restarted" in _states(pair, job_id), "the kill landed after the job ended"
    assert text == job["text"] and job["usage"]["completion_tokens"] == 300
    conversation = pair_page.evaluate("new URL(location.href).searchParams.get('c')")
    saved = api.get(f"/v1/conversations/{conversation}").json()["turns"][0]
    assert saved["assistant"] == text
    uninterrupted = _sdk(pair).chat.completions.create(
        messages=[{"role": "user", "content": "Ceritakan sebuah dongeng."}],
        model=DEMO_MODEL, **FORCED).choices[0].message.content
    assert text == uninterrupted
