"""The OpenAI-compatible API against the real stack: the official client, and raw SSE framing."""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from conftest import DEMO_MODEL
from tasks.jobs.contract import ErrorBody, ErrorEvent
from tasks.jobs.log import JobStore

CHAT = [{"role": "user", "content": "Hello, what should I cook today?"}]
GREEDY = {"temperature": 0.0}
LONG_RAW = {"max_tokens": 400, "min_tokens": 400}
LONG = {"max_tokens": 400, "extra_body": {"min_tokens": 400}}


@pytest.fixture()
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.api_url + "/v1", api_key="x", max_retries=0)


def _job(api: httpx.Client, job_id: str) -> dict:
    return api.get(f"/v1/jobs/{job_id}").json()


def test_chat_completion_matches_its_job(client, api):
    raw = client.chat.completions.with_raw_response.create(
        model=DEMO_MODEL, messages=CHAT, max_tokens=24, **GREEDY)
    completion, job_id = raw.parse(), raw.headers["X-Dawet-Job-Id"]
    job = _job(api, job_id)
    assert completion.id == f"chatcmpl-{job_id}" and completion.object == "chat.completion"
    assert completion.model == DEMO_MODEL and abs(completion.created - time.time()) < 60
    [choice] = completion.choices
    assert choice.index == 0 and choice.logprobs is None
    assert choice.message.role == "assistant" and choice.message.content == job["text"] != ""
    assert job["state"] == "succeeded"
    assert completion.usage.model_dump() == {**job["usage"], "completion_tokens_details": None,
                                             "prompt_tokens_details": None}
    assert choice.finish_reason == ("length" if job["finish_reason"] == "length" else "stop")


def test_max_completion_tokens_caps_the_reply(client):
    completion = client.chat.completions.create(
        model=DEMO_MODEL, messages=CHAT, max_completion_tokens=3, extra_body={"min_tokens": 3})
    assert completion.usage.completion_tokens == 3
    assert completion.choices[0].finish_reason == "length"


def test_text_parts_are_joined_like_a_string(client):
    parts = [{"type": "text", "text": "Hello, what should I cook"}, {"type": "text", "text": "today?"}]
    as_parts = client.chat.completions.create(
        model=DEMO_MODEL, messages=[{"role": "user", "content": parts}], max_tokens=12, **GREEDY)
    as_string = client.chat.completions.create(
        model=DEMO_MODEL, messages=[{"role": "user", "content": "Hello, what should I cook\ntoday?"}],
        max_tokens=12, **GREEDY)
    assert as_parts.choices[0].message.content == as_string.choices[0].message.content
    assert as_parts.usage == as_string.usage


def test_text_completion_and_a_stop_sequence(client):
    free = client.completions.create(model=DEMO_MODEL, prompt="The weather today is",
                                     max_tokens=30, **GREEDY)
    assert free.object == "text_completion" and free.id.startswith("cmpl-")
    text = free.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    stopped = client.completions.create(model=DEMO_MODEL, prompt="The weather today is",
                                        max_tokens=30, stop=[stop, "zzzz"], **GREEDY)
    assert stopped.choices[0].text == text[:text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_streamed_chat_joins_to_the_same_text_as_the_job(client, api):
    with client.chat.completions.with_streaming_response.create(
            model=DEMO_MODEL, messages=CHAT, max_tokens=24, stream=True,
            stream_options={"include_usage": True}, **GREEDY) as response:
        job_id = response.headers["X-Dawet-Job-Id"]
        chunks = list(response.parse())
    job = _job(api, job_id)
    assert {c.id for c in chunks} == {f"chatcmpl-{job_id}"}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == job["text"] != ""
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == job["usage"]["total_tokens"]


def test_the_async_client_streams_completions_side_by_side(stack):
    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=stack.api_url + "/v1", api_key="x", max_retries=0)
        async with client:
            return list(await asyncio.gather(*(_stream_text(client, p) for p in PROMPTS)))

    async def _stream_text(client, prompt: str) -> str:
        stream = await client.completions.create(model=DEMO_MODEL, prompt=prompt, max_tokens=16,
                                                 stream=True, **GREEDY)
        return "".join([chunk.choices[0].text async for chunk in stream])

    streamed = asyncio.run(run())
    whole = openai.OpenAI(base_url=stack.api_url + "/v1", api_key="x")
    for prompt, text in zip(PROMPTS, streamed):
        again = whole.completions.create(model=DEMO_MODEL, prompt=prompt, max_tokens=16, **GREEDY)
        assert text == again.choices[0].text != ""


PROMPTS = ["I like to eat", "Saya suka makan", "The train to the city"]


def _sse_payloads(response: httpx.Response) -> list[str]:
    """The `data:` payloads of an SSE body, checking the framing on the way."""
    body = response.read().decode()
    frames = body.split("\n\n")
    assert frames[-1] == ""
    assert all(f.startswith("data: ") and "\n" not in f for f in frames[:-1]), body
    return [f[len("data: "):] for f in frames[:-1]]


@pytest.mark.parametrize("include_usage", [True, False])
def test_raw_sse_framing_of_a_chat_stream(api, include_usage):
    body = {"model": DEMO_MODEL, "messages": CHAT, "max_tokens": 8, "stream": True,
            "temperature": 0}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    with api.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        job_id = response.headers["X-Dawet-Job-Id"]
        payloads = _sse_payloads(response)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all(("usage" in c) == include_usage for c in chunks)
    with_choices = [c for c in chunks if c["choices"]]
    assert with_choices[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["finish_reason"] for c in with_choices] == \
        [None] * (len(with_choices) - 1) + ["length"]
    assert with_choices[-1]["choices"][0]["delta"] == {}
    usage = _job(api, job_id)["usage"]
    tail = chunks[len(with_choices):]
    assert tail == ([{**chunks[0], "choices": [], "usage": usage}] if include_usage else [])


def test_raw_sse_framing_of_a_text_stream(api):
    body = {"model": DEMO_MODEL, "prompt": "The weather today is", "max_tokens": 6,
            "stream": True, "temperature": 0}
    with api.stream("POST", "/v1/completions", json=body) as response:
        job_id = response.headers["X-Dawet-Job-Id"]
        payloads = _sse_payloads(response)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == _job(api, job_id)["text"]
    assert chunks[-1]["choices"][0] == {"index": 0, "text": "", "logprobs": None,
                                        "finish_reason": "length"}


def test_a_client_that_leaves_a_stream_cancels_its_job(api, stack):
    body = {"model": DEMO_MODEL, "messages": CHAT, "stream": True, "max_tokens": 400,
            "min_tokens": 400}
    with httpx.Client(base_url=stack.api_url, timeout=30) as leaving:
        with leaving.stream("POST", "/v1/chat/completions", json=body) as response:
            job_id = response.headers["X-Dawet-Job-Id"]
            _read_until_text(response.iter_lines())
    job = _wait_for_end(api, job_id)
    assert job["state"] == "cancelled" and job["finish_reason"] == "cancelled"
    assert job["usage"]["completion_tokens"] < 400


def test_a_job_error_mid_stream_becomes_an_error_frame(api, redis_client):
    body = {"model": DEMO_MODEL, "messages": CHAT, "stream": True, **LONG_RAW}
    with api.stream("POST", "/v1/chat/completions", json=body) as response:
        job_id = response.headers["X-Dawet-Job-Id"]
        lines = response.iter_lines()
        _read_until_text(lines)
        failure = ErrorBody("generation failed: RuntimeError", "server_error", "generation_failed")
        JobStore(redis_client, 600).append(job_id, ErrorEvent(failure))  # as a worker would
        payloads = [json.loads(line[len("data: "):]) for line in lines if line]
    api.delete(f"/v1/jobs/{job_id}")
    assert payloads[-1] == failure.envelope()  # and no [DONE] after it
    assert all("choices" in p for p in payloads[:-1])


def _read_until_text(lines: Iterator[str]) -> None:
    """Read SSE lines until a chunk with generated text arrives."""
    for line in lines:
        if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
            return
    raise AssertionError("the stream ended before any text")


def _wait_for_end(api: httpx.Client, job_id: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while (job := _job(api, job_id))["finish_reason"] is None and time.monotonic() < deadline:
        time.sleep(0.1)
    return job


def test_a_cancelled_job_ends_its_stream_with_stop(client, api):
    stream = client.chat.completions.create(model=DEMO_MODEL, messages=CHAT, stream=True, **LONG)
    chunks = [next(stream), next(stream)]
    job_id = stream.response.headers["X-Dawet-Job-Id"]
    assert api.delete(f"/v1/jobs/{job_id}").status_code == 202
    chunks += list(stream)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert _job(api, job_id)["state"] == "cancelled"


def test_models_list_the_registry_and_which_are_served(client):
    models = {m.id: m for m in client.models.list()}
    assert list(models) == ["dawet-tiny", "dawet-demo", "dawet-kopi", "dawet-bench-4m",
                            "dawet-tiny-vllm", "dawet-demo-vllm", "dawet-kopi-vllm"]
    # the session's one worker serves the demo's base, so both its adapters too
    assert [m.model_extra["ready"] for m in models.values()] == [True] * 3 + [False] * 4
    assert [m.model_extra["parent"] for m in models.values()] == [
        None, "dawet-tiny", "dawet-tiny", None, None, "dawet-tiny-vllm", "dawet-tiny-vllm"]
    assert client.models.retrieve("dawet-kopi").owned_by == "dawet"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    assert caught.value.code == "model_not_found"


def test_a_model_no_worker_serves_gets_503_before_queueing(client, api):
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="dawet-bench-4m", messages=CHAT, max_tokens=2)
    assert caught.value.status_code == 503 and caught.value.code == "model_unavailable"
