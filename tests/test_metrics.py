"""Prometheus metrics of the running stack: the API's /metrics (all gunicorn workers) and a worker's."""
from __future__ import annotations

import json
import time

import pytest
import torch
import websocket

from conftest import DEMO_BASE, DEMO_MODEL, stream_events, submit
from metrics_helpers import scrape, value, wait_for_idle_worker, worker_metrics_url

pytestmark = pytest.mark.e2e

HISTOGRAMS = ("dawet_job_queue_wait_seconds", "dawet_job_time_to_first_token_seconds",
              "dawet_job_time_per_output_token_seconds", "dawet_job_e2e_latency_seconds")


def _run_job(api, **body) -> dict:
    """Submit a job, read its stream to the end and return the done event."""
    events = stream_events(submit(api, **body)["stream_url"])
    assert events[-1]["type"] == "done", events[-1]
    return events[-1]


def test_a_finished_job_moves_the_worker_counters_by_its_usage(api, stack):
    before = wait_for_idle_worker(stack, DEMO_BASE)
    done = _run_job(api, prompt="Saya suka makan", max_new_tokens=12, min_new_tokens=12)
    after = scrape(worker_metrics_url(stack))
    usage, model = done["usage"], {"model": DEMO_MODEL}

    def delta(name, **labels):
        return value(after, name, **model, **labels) - value(before, name, **model, **labels)

    assert delta("dawet_generation_tokens_total") == usage["completion_tokens"] == 12
    assert delta("dawet_prompt_tokens_total") == usage["prompt_tokens"]
    assert delta("dawet_jobs_total", outcome=done["finish_reason"]) == 1
    for histogram in HISTOGRAMS:
        assert delta(f"{histogram}_count") == 1, histogram
    ttft = delta("dawet_job_time_to_first_token_seconds_sum")
    assert ttft == pytest.approx(done["timings"]["time_to_first_token_seconds"], abs=1e-3)


def test_the_worker_reports_liveness_build_and_load_time(stack):
    samples = wait_for_idle_worker(stack, DEMO_BASE)
    worker = next(dict(labels)["worker"] for name, labels in samples
                  if name == "dawet_worker_up")
    ids = {"model": DEMO_BASE, "worker": worker}  # the entry it serves: the base
    assert value(samples, "dawet_worker_up", **ids) == 1
    heartbeat = value(samples, "dawet_worker_last_heartbeat_timestamp_seconds", **ids)
    assert time.time() - heartbeat < 3 * stack.settings.heartbeat_seconds + 1
    assert value(samples, "dawet_model_load_seconds", model=DEMO_BASE) > 0
    build = [dict(labels) for name, labels in samples if name == "dawet_build_info"]
    assert build and build[0]["backend"] == "transformers" and build[0]["device"] == "cpu"
    assert value(samples, "dawet_jobs_running", model=DEMO_BASE) == 0
    assert value(samples, "dawet_batch_size", model=DEMO_BASE) == 0
    gpu = [name for name, _ in samples if name == "dawet_gpu_memory_allocated_bytes"]
    assert bool(gpu) == torch.cuda.is_available()


def test_a_decoding_job_shows_as_running_with_batch_size_one(api, stack):
    job = submit(api, prompt="The train to the city", max_new_tokens=400, min_new_tokens=400)
    ws = websocket.create_connection(job["stream_url"], timeout=60)
    while json.loads(ws.recv())["type"] != "token":
        pass
    samples = scrape(worker_metrics_url(stack))
    api.delete(f"/v1/jobs/{job['id']}")
    ws.close()
    assert value(samples, "dawet_jobs_running", model=DEMO_BASE) == 1
    assert value(samples, "dawet_batch_size", model=DEMO_BASE) == 1
    assert stream_events(job["stream_url"])[-1]["finish_reason"] == "cancelled"


def test_the_api_counts_requests_of_every_gunicorn_worker(api, stack):
    before = scrape(f"{stack.api_url}/metrics")
    for _ in range(6):  # gunicorn spreads them over its worker processes
        assert api.post("/v1/generate", content=b"{not json").status_code == 400
    job = submit(api, prompt="Halo", max_new_tokens=4)
    after = scrape(f"{stack.api_url}/metrics")

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    route = {"route": "/v1/generate", "method": "POST"}
    assert delta("dawet_http_requests_total", **route, status="400") == 6
    assert delta("dawet_http_requests_total", **route, status="202") == 1
    assert delta("dawet_http_request_duration_seconds_count", **route) == 7
    assert delta("dawet_jobs_rejected_total", code="invalid_json") == 6
    assert delta("dawet_jobs_admitted_total", model=DEMO_MODEL) == 1
    assert stream_events(job["stream_url"])[-1]["type"] == "done"


@pytest.mark.parametrize("path,body", [
    ("/v1/generate", {"prompt": "Halo", "max_new_tokens": 4}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Halo"}], "max_tokens": 4}),
    ("/v1/completions", {"prompt": "Halo", "max_tokens": 4}),
])
def test_every_submission_route_counts_admissions_and_refusals(api, stack, path, body):
    before = scrape(f"{stack.api_url}/metrics")
    assert api.post(path, json={**body, "model": DEMO_MODEL}).status_code in (200, 202)
    assert api.post(path, json={**body, "model": "no-such-model"}).status_code == 404
    after = scrape(f"{stack.api_url}/metrics")
    assert (value(after, "dawet_jobs_admitted_total", model=DEMO_MODEL)
            - value(before, "dawet_jobs_admitted_total", model=DEMO_MODEL)) == 1
    assert (value(after, "dawet_jobs_rejected_total", code="model_not_found")
            - value(before, "dawet_jobs_rejected_total", code="model_not_found")) == 1


def _wait_for_open_streams(stack, transport: str, expected: int, timeout: float = 10) -> None:
    """Scrape the API until it counts `expected` open streams of `transport`."""
    deadline = time.monotonic() + timeout
    while value(scrape(f"{stack.api_url}/metrics"), "dawet_open_streams",
                transport=transport) != expected:
        assert time.monotonic() < deadline, f"{transport} streams never counted {expected}"
        time.sleep(0.1)


def test_open_streams_counts_a_websocket_while_it_is_open(api, stack):
    job = submit(api, prompt="Berapa harga", max_new_tokens=400, min_new_tokens=400)
    ws = websocket.create_connection(job["stream_url"], timeout=60)
    ws.recv()
    _wait_for_open_streams(stack, "websocket", 1)
    api.delete(f"/v1/jobs/{job['id']}")
    ws.close()
    _wait_for_open_streams(stack, "websocket", 0)


def test_open_streams_counts_an_sse_completion_while_it_streams(api, stack):
    body = {"model": DEMO_MODEL, "prompt": "Halo", "max_tokens": 400, "min_tokens": 400,
            "stream": True}
    with api.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()  # held: a dropped iterator closes the stream
        next(lines)
        _wait_for_open_streams(stack, "sse", 1)
        api.delete(f"/v1/jobs/{response.headers['X-Dawet-Job-Id']}")
    _wait_for_open_streams(stack, "sse", 0)


def test_queue_depth_and_live_workers_are_read_from_redis(api, stack, redis_client):
    idle = "dawet-bench-4m"  # in the registry, but the test stack runs no worker for it
    try:
        submit(api, model=idle, prompt="nobody serves this", max_new_tokens=4)
        samples = scrape(f"{stack.api_url}/metrics")
        assert value(samples, "dawet_queue_depth", model=idle) == 1
        assert value(samples, "dawet_workers_live", model=idle) == 0
        assert value(samples, "dawet_workers_live", model=DEMO_BASE) == 1
        assert value(samples, "dawet_queue_depth", model=DEMO_BASE) >= 0
    finally:
        redis_client.delete(f"dawet.{idle}")


def test_the_prefix_cache_counts_the_prompt_tokens_it_found(api, stack):
    before = wait_for_idle_worker(stack, DEMO_BASE)
    prompt = "Saya suka makan nasi goreng di pasar pagi bersama keluarga. " * 4
    first = _run_job(api, prompt=prompt, max_new_tokens=4, min_new_tokens=4)
    _run_job(api, prompt=prompt, max_new_tokens=4, min_new_tokens=4)  # the same start again
    after = wait_for_idle_worker(stack, DEMO_BASE)
    model = {"model": DEMO_BASE}  # the engine's: it serves the base and its adapters

    def delta(name):
        return value(after, name, **model) - value(before, name, **model)

    prompt_tokens = first["usage"]["prompt_tokens"]
    assert delta("dawet_prefix_cache_queried_tokens_total") == 2 * prompt_tokens
    assert prompt_tokens - 16 <= delta("dawet_prefix_cache_hit_tokens_total") < prompt_tokens
    assert value(after, "dawet_prefix_cache_tokens", **model) >= prompt_tokens - 16
