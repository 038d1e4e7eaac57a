"""End to end: REST job → Celery worker → Redis event log → WebSocket, on the demo model."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import websocket

from conftest import DEMO_BASE, DEMO_MODEL, stream_events, submit, token_text
from tasks.jobs.workers import WorkerRegistry
from tasks.worker.app import create_celery, send_job
from tasks.jobs.contract import Job, JobState, SamplingParams, StatusEvent
from tasks.jobs.log import JobStore

CHAT = [{"role": "user", "content": "Hello, what should I cook today?"}]
GREEDY = {"temperature": 0.0, "min_new_tokens": 0}


def _assert_well_formed(events: list[dict]) -> None:
    """Sequence numbers 1..n, queued then started, exactly one terminal event, last."""
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert [e.get("state") for e in events[:2]] == ["queued", "started"]
    assert [e["type"] for e in events].count("done") + [e["type"] for e in events].count("error") == 1
    assert events[-1]["type"] in ("done", "error")


def test_tokens_arrive_in_order_and_join_to_the_final_text(api):
    job = submit(api, messages=CHAT, max_new_tokens=24, **GREEDY)
    events = stream_events(job["stream_url"])
    _assert_well_formed(events)
    done = events[-1]
    assert done["type"] == "done" and done["finish_reason"] in ("stop", "length")
    final = api.get(f"/v1/jobs/{job['id']}").json()
    assert final["state"] == "succeeded"
    assert final["text"] == token_text(events) != ""
    assert final["usage"]["completion_tokens"] == done["usage"]["completion_tokens"] <= 24
    usage = final["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert (usage["completion_tokens"] == 24) == (done["finish_reason"] == "length")


def test_a_client_that_connects_after_the_end_gets_the_full_replay(api):
    job = submit(api, prompt="The weather today is", max_new_tokens=16, **GREEDY)
    first = stream_events(job["stream_url"])
    assert api.get(f"/v1/jobs/{job['id']}").json()["state"] == "succeeded"
    assert stream_events(job["stream_url"]) == first


def test_after_resumes_with_no_duplicates_and_no_gaps(api):
    job = submit(api, messages=CHAT, max_new_tokens=32, **GREEDY)
    full = stream_events(job["stream_url"])
    for after in (1, 2, len(full) // 2, len(full) - 1):
        assert stream_events(f"{job['stream_url']}?after={after}") == full[after:]
    assert stream_events(f"{job['stream_url']}?after={len(full)}") == []


def test_a_reconnect_mid_generation_resumes_where_it_left_off(api):
    job = submit(api, messages=CHAT, max_new_tokens=64, **GREEDY)
    ws = websocket.create_connection(job["stream_url"], timeout=60)
    head = [json.loads(ws.recv()) for _ in range(4)]
    ws.close()
    tail = stream_events(f"{job['stream_url']}?after={head[-1]['seq']}")
    events = head + tail
    _assert_well_formed(events)
    assert token_text(events) == api.get(f"/v1/jobs/{job['id']}").json()["text"]


def test_concurrent_jobs_never_mix_their_streams(api):
    prompts = ["I like to eat", "Saya suka makan", "The train to the city", "Berapa harga"]
    jobs = [submit(api, prompt=p, max_new_tokens=24, seed=i, temperature=0.9)
            for i, p in enumerate(prompts)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        streams = list(pool.map(lambda j: stream_events(j["stream_url"]), jobs))
    for job, events in zip(jobs, streams):
        _assert_well_formed(events)
        assert token_text(events) == api.get(f"/v1/jobs/{job['id']}").json()["text"]


def test_a_greedy_job_gets_the_same_text_alone_and_among_concurrent_jobs(api):
    body = {"messages": CHAT, "max_new_tokens": 32, **GREEDY}
    alone = token_text(stream_events(submit(api, **body)["stream_url"]))
    others = [{"prompt": f"Cerita nomor {i}", "max_new_tokens": 48, "temperature": 0.8, "seed": i}
              for i in range(6)]
    jobs = [submit(api, **b) for b in [*others[:3], body, *others[3:], body]]
    with ThreadPoolExecutor(len(jobs)) as pool:
        streams = list(pool.map(lambda j: stream_events(j["stream_url"]), jobs))
    assert token_text(streams[3]) == token_text(streams[-1]) == alone != ""


def test_the_model_is_loaded_once_per_worker_process(api, stack, redis_client):
    before = _worker_records(redis_client)
    jobs = [submit(api, prompt=f"Number {i} is", max_new_tokens=8) for i in range(6)]
    for job in jobs:
        assert stream_events(job["stream_url"])[-1]["type"] == "done"
    after = _worker_records(redis_client)
    assert len(after) == 1 and after[0]["pid"] == before[0]["pid"]
    assert after[0]["model_loads"] == 1


def test_a_failing_generation_ends_with_an_error_and_the_worker_goes_on(api, stack, redis_client):
    bad = Job(model=DEMO_MODEL, prompt_token_ids=[10**7], params=SamplingParams(
        max_new_tokens=4, temperature=0.0, top_p=1.0))
    store = JobStore(redis_client, 3600)
    store.create(bad)
    store.append(bad.id, StatusEvent(JobState.QUEUED))
    send_job(create_celery(stack.settings), bad, f"dawet.{DEMO_BASE}")
    events = stream_events(f"{stack.api_url.replace('http', 'ws', 1)}/v1/jobs/{bad.id}/stream")
    assert events[-1]["type"] == "error"
    assert events[-1]["error"]["code"] == "invalid_prompt_tokens"
    good = submit(api, prompt="Still there?", max_new_tokens=4)
    assert stream_events(good["stream_url"])[-1]["type"] == "done"


def test_a_stop_sequence_ends_the_text_before_it(api):
    free = stream_events(submit(api, messages=CHAT, max_new_tokens=40, **GREEDY)["stream_url"])
    text = token_text(free)
    stop = text[len(text) // 2:len(text) // 2 + 3]
    stopped = stream_events(submit(api, messages=CHAT, max_new_tokens=40, stop=stop, **GREEDY)
                            ["stream_url"])
    assert token_text(stopped) == text[:text.index(stop)]
    assert stopped[-1]["finish_reason"] == "stop_sequence"


def test_delete_cancels_a_running_job(api):
    job = submit(api, messages=CHAT, max_new_tokens=400, min_new_tokens=400)
    ws = websocket.create_connection(job["stream_url"], timeout=60)
    while json.loads(ws.recv())["type"] != "token":
        pass
    assert api.delete(f"/v1/jobs/{job['id']}").status_code == 202
    ws.close()
    events = stream_events(job["stream_url"])
    assert events[-1]["type"] == "done" and events[-1]["finish_reason"] == "cancelled"
    assert events[-1]["usage"]["completion_tokens"] < 400
    assert api.get(f"/v1/jobs/{job['id']}").json()["state"] == "cancelled"


def test_health_and_readiness(api):
    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"redis": True, "broker": True, "workers": True}


def _worker_records(redis_client) -> list[dict]:
    return sorted(WorkerRegistry(redis_client, 1.0).live(DEMO_BASE), key=lambda r: r["worker"])
