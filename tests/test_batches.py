"""Files and Batches through the official openai client on real stacks: every request of a batch
gets exactly one output or error line, across a bad line, a cancel, an expired window, a
restart of the whole stack (Redis with its data on disk) and a SIGKILLed worker; bad files and
requests are refused with the envelope; another key's files and batches do not exist."""
from __future__ import annotations

import base64
import hashlib
import json
import signal
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import redis
from openai import OpenAI

from conftest import DEMO_MODEL, MODELS_FILE, fresh_log_dir, wait_until
from metrics_helpers import scrape, value
from dawet.processes import Stack, free_port
from dawet.settings import Settings
from tasks.batches.contract import line_job_id
from tasks.batches.store import lines_key
from tasks.jobs.contract import Job, Lane, SamplingParams
from tasks.jobs.log import JobStore
from tasks.worker.app import create_celery, send_job

ENDED = ("completed", "failed", "expired", "cancelled")
ALICE, BOB = (f"sk-{name}-{uuid.uuid4().hex}" for name in ("alice", "bob"))
LIMITED_FILE_BYTES = 64 * 1024
SHORT_WINDOW_SECONDS = 8


def chat_line(custom_id: str, tokens: int = 8, **body) -> dict:
    """A batch request for a chat completion of exactly `tokens` tokens."""
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": DEMO_MODEL, "max_tokens": tokens, "min_tokens": tokens,
                     "messages": [{"role": "user", "content": f"Halo, {custom_id}!"}], **body}}


def text_line(custom_id: str, tokens: int = 8) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
            "body": {"model": DEMO_MODEL, "prompt": f"Nasi goreng {custom_id}",
                     "max_tokens": tokens}}


def jsonl(lines: list[dict]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def sdk(url: str, key: str = "unused") -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def start_batch(client: OpenAI, lines: list[dict], endpoint: str = "/v1/chat/completions",
                **extra):
    upload = client.files.create(file=("requests.jsonl", jsonl(lines)), purpose="batch")
    return client.batches.create(input_file_id=upload.id, endpoint=endpoint,
                                 completion_window="24h", **extra)


def wait_for_end(client: OpenAI, batch_id: str, timeout: float = 180):
    """Poll the batch until it ends; the ended batch."""
    deadline = time.monotonic() + timeout
    while (batch := client.batches.retrieve(batch_id)).status not in ENDED:
        assert time.monotonic() < deadline, f"batch still {batch.status}: {batch}"
        time.sleep(0.3)
    return batch


def result_lines(client: OpenAI, batch) -> dict[str, dict]:
    """Every line of the output and error files by custom_id, each custom_id exactly once."""
    lines = []
    for file_id in (batch.output_file_id, batch.error_file_id):
        if file_id is not None:
            lines += [json.loads(raw) for raw in client.files.content(file_id).text.splitlines()]
    by_id = {line["custom_id"]: line for line in lines}
    assert len(by_id) == len(lines), "a custom_id appears twice"
    return by_id


def assert_one_line_each(client: OpenAI, batch, lines: list[dict]) -> dict[str, dict]:
    """Each request has one line, whose request id is its own job; the counts add up."""
    results = result_lines(client, batch)
    assert sorted(results) == sorted(line["custom_id"] for line in lines)
    for index, line in enumerate(lines):
        assert results[line["custom_id"]]["id"] == f"batch_req_{line_job_id(batch.id, index)}"
    counts = batch.request_counts
    assert (counts.total, counts.completed + counts.failed) == (len(lines), len(lines))
    assert counts.completed == sum(r["response"] is not None for r in results.values())
    return results


@pytest.fixture(scope="module")
def client(stack) -> OpenAI:
    return sdk(stack.api_url)


@pytest.mark.parametrize("endpoint,line,kind", [
    ("/v1/chat/completions", chat_line, "chat.completion"),
    ("/v1/completions", text_line, "text_completion")])
def test_every_request_gets_one_line_and_a_bad_one_an_error_line(client, endpoint, line, kind):
    lines = [line(f"req-{i}") for i in range(5)]
    lines[1]["body"]["max_tokens"] = 100_000  # over the model's limit
    lines[3]["body"]["logit_bias"] = {"1": 5}  # an option Dawet refuses
    batch = start_batch(client, lines, endpoint, metadata={"team": "data"})
    assert (batch.status, batch.request_counts.total, batch.metadata) == \
        ("validating", 5, {"team": "data"})
    batch = wait_for_end(client, batch.id)
    assert batch.status == "completed" and batch.errors is None
    assert None not in (batch.in_progress_at, batch.finalizing_at, batch.completed_at)
    results = assert_one_line_each(client, batch, lines)
    assert (batch.request_counts.completed, batch.request_counts.failed) == (3, 2)
    for custom_id in ("req-1", "req-3"):
        bad = results[custom_id]
        assert bad["response"] is None and bad["error"]["code"] in (
            "invalid_request_error", "unsupported_parameter")
    assert "max_tokens" in results["req-1"]["error"]["message"]
    for custom_id in ("req-0", "req-2", "req-4"):
        response = results[custom_id]["response"]
        assert response["status_code"] == 200 and response["body"]["object"] == kind
        assert response["body"]["usage"]["completion_tokens"] == 8
        assert response["request_id"] in response["body"]["id"]
    output = client.files.retrieve(batch.output_file_id)
    assert (output.purpose, output.bytes) == ("batch_output",
                                             len(client.files.content(output.id).content))


def test_metrics_count_batches_by_state_and_lines_by_outcome(client, stack):
    before = scrape(f"{stack.api_url}/metrics")
    batch = wait_for_end(client, start_batch(client, [chat_line("m-0", 2), chat_line(
        "m-1", 2, temperature=9.0)]).id)
    after = scrape(f"{stack.api_url}/metrics")
    assert batch.status == "completed"
    for name, labels, more in [("dawet_batches", {"state": "completed"}, 1),
                               ("dawet_batch_lines_done_total", {"outcome": "completed"}, 1),
                               ("dawet_batch_lines_done_total", {"outcome": "failed"}, 1)]:
        assert value(after, name, **labels) - value(before, name, **labels) == more, name
    assert ("dawet_batch_lines", frozenset({"state": "waiting"}.items())) in after


def test_batches_list_newest_first_a_page_at_a_time(client):
    ids = [start_batch(client, [chat_line("only", 2)]).id for _ in range(3)]
    first = client.batches.list(limit=2)
    assert [b.id for b in first.data] == ids[:0:-1] and first.has_more
    second = client.batches.list(limit=2, after=first.data[-1].id)
    assert second.data[0].id == ids[0]
    for batch_id in ids:
        assert wait_for_end(client, batch_id).status == "completed"
    with pytest.raises(openai.ConflictError) as refused:
        client.batches.cancel(ids[0])
    assert refused.value.code == "batch_not_cancellable"


def test_a_file_is_read_listed_and_deleted(client):
    content = jsonl([chat_line("a"), chat_line("b")])
    upload = client.files.create(file=("two.jsonl", content), purpose="batch")
    assert (upload.filename, upload.bytes, upload.purpose) == ("two.jsonl", len(content), "batch")
    assert client.files.content(upload.id).content == content
    assert upload.id in [f.id for f in client.files.list(purpose="batch")]
    assert client.files.delete(upload.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(upload.id)


def test_a_batch_keeps_its_input_when_the_file_is_deleted(client):
    lines = [chat_line(f"kept-{i}", 4) for i in range(3)]
    batch = start_batch(client, lines)
    client.files.delete(batch.input_file_id)
    assert_one_line_each(client, wait_for_end(client, batch.id), lines)


@pytest.mark.parametrize("content,line,words", [
    (jsonl([chat_line("a")]) + b'{"custom_id": "b", "method": "POST"\n', 2, "not valid JSON"),
    (jsonl([chat_line("a"), chat_line("a")]), 2, "custom_id 'a' is used"),
    (jsonl([{**chat_line("a"), "method": "GET"}]), 1, "method"),
    (jsonl([chat_line("a"), {**chat_line("b"), "url": "/v1/embeddings"}]), 2, "url"),
    (jsonl([{k: v for k, v in chat_line("a").items() if k != "custom_id"}]), 1, "custom_id"),
    (b"\n\n", 1, "no requests"),
], ids=["json", "duplicate", "method", "url", "custom-id", "empty"])
def test_a_malformed_file_is_refused_naming_its_line(client, content, line, words):
    with pytest.raises(openai.BadRequestError) as refused:
        client.files.create(file=("bad.jsonl", content), purpose="batch")
    assert refused.value.param == "file"
    assert f"line {line} of the file" in refused.value.message and words in refused.value.message


def test_only_batch_files_are_kept(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.files.create(file=("a.jsonl", jsonl([chat_line("a")])), purpose="fine-tune")
    assert refused.value.param == "purpose"


@pytest.mark.parametrize("create,param,words", [
    ({"endpoint": "/v1/embeddings"}, "endpoint", "/v1/chat/completions"),
    ({"completion_window": "1h"}, "completion_window", "24h"),
    ({"endpoint": "/v1/completions"}, "input_file_id", "line 2 of file"),
    ({"input_file_id": "file-nope"}, "input_file_id", "does not exist"),
])
def test_a_bad_batch_request_is_refused(client, create, param, words):
    upload = client.files.create(file=("mixed.jsonl", jsonl([text_line("a"), chat_line("b")])),
                                 purpose="batch")
    body = {"input_file_id": upload.id, "endpoint": "/v1/chat/completions",
            "completion_window": "24h", **create}
    with pytest.raises(openai.APIStatusError) as refused:
        client.batches.create(**body)
    assert refused.value.status_code == (404 if "nope" in body["input_file_id"] else 400)
    assert refused.value.param == param and words in refused.value.message


def test_a_cancelled_batch_ends_with_one_line_per_request_and_bounded_lines(client, stack):
    lines = [chat_line(f"c-{i}", 200) for i in range(24)]
    batch = start_batch(client, lines)
    counter = redis.Redis.from_url(stack.settings.redis_url)
    in_flight = []
    wait_until(lambda: in_flight.append(counter.zcard(lines_key(DEMO_MODEL)))
               or in_flight[-1] > 0, 60, "lines in flight")
    for _ in range(10):
        in_flight.append(counter.zcard(lines_key(DEMO_MODEL)))
        time.sleep(0.1)
    assert max(in_flight) <= stack.settings.batch_max_in_flight
    assert client.batches.cancel(batch.id).status == "cancelling"
    batch = wait_for_end(client, batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at is not None
    results = assert_one_line_each(client, batch, lines)
    assert any(r["error"] and r["error"]["code"] == "batch_cancelled" for r in results.values())
    assert client.batches.cancel(batch.id).status == "cancelled"  # again: nothing more to do


def test_batch_lines_wait_on_the_brokers_last_served_list(stack):
    """kombu's Redis transport pops a queue's priority-0 list before its priority-9 list."""
    queue, broker = f"dawet.lane-test-{uuid.uuid4().hex}", redis.Redis.from_url(
        stack.settings.redis_url)
    celery = create_celery(stack.settings)
    params = SamplingParams(max_new_tokens=1, temperature=0.0, top_p=1.0)
    for lane in Lane:
        send_job(celery, Job(model=DEMO_MODEL, prompt_token_ids=[1], params=params, lane=lane),
                 queue)
    lanes = {}
    for key in (queue, queue + "\x06\x169"):  # in the order a worker's BRPOP names them
        (message,) = [json.loads(raw) for raw in broker.lrange(key, 0, -1)]
        args, _, _ = json.loads(base64.b64decode(message["body"]))
        lanes[key] = args[0]["lane"]
    broker.delete(*lanes)
    assert list(lanes.values()) == ["interactive", "batch"]


# --- keys, limits and a short window: a second API process on the session stack ---

def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture(scope="module")
def limited_url(stack) -> str:
    """An API process with keys for alice and bob, small files and a short window."""
    return stack.add_api(api_keys=f"alice={_digest(ALICE)},bob={_digest(BOB)}",
                         max_file_bytes=LIMITED_FILE_BYTES,
                         batch_completion_window_seconds=SHORT_WINDOW_SECONDS)


def test_another_keys_files_and_batches_do_not_exist(limited_url):
    alice, bob = sdk(limited_url, ALICE), sdk(limited_url, BOB)
    batch = start_batch(alice, [chat_line("mine", 2)])
    for call in (lambda: bob.files.retrieve(batch.input_file_id),
                 lambda: bob.files.content(batch.input_file_id),
                 lambda: bob.files.delete(batch.input_file_id),
                 lambda: bob.batches.retrieve(batch.id),
                 lambda: bob.batches.cancel(batch.id),
                 lambda: bob.batches.create(input_file_id=batch.input_file_id,
                                            endpoint="/v1/chat/completions",
                                            completion_window="24h")):
        with pytest.raises(openai.NotFoundError):
            call()
    assert batch.id not in [b.id for b in bob.batches.list()]
    assert batch.input_file_id not in [f.id for f in bob.files.list()]
    assert alice.batches.retrieve(batch.id).id == batch.id
    ended = wait_for_end(alice, batch.id)
    if ended.output_file_id:
        with pytest.raises(openai.NotFoundError):
            bob.files.content(ended.output_file_id)


def test_an_oversize_file_is_refused_with_413(limited_url):
    big = jsonl([chat_line(f"r{i}") for i in range(600)])
    assert len(big) > LIMITED_FILE_BYTES
    response = httpx.post(f"{limited_url}/v1/files", headers={"Authorization": f"Bearer {ALICE}"},
                          files={"file": ("big.jsonl", big)}, data={"purpose": "batch"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_entity_too_large"


def test_an_expired_batch_keeps_its_finished_lines(limited_url):
    alice = sdk(limited_url, ALICE)
    lines = [chat_line(f"quick-{i}", 2) for i in range(2)]
    lines += [chat_line(f"slow-{i}", 512) for i in range(60)]
    batch = wait_for_end(alice, start_batch(alice, lines).id, SHORT_WINDOW_SECONDS + 60)
    assert batch.status == "expired" and batch.expired_at is not None
    results = assert_one_line_each(alice, batch, lines)
    assert all(results[f"quick-{i}"]["response"]["status_code"] == 200 for i in range(2))
    expired = [r for r in results.values() if r["error"]]
    assert expired and {r["error"]["code"] for r in expired} == {"batch_expired"}


# --- durability: a stack of its own, with Redis keeping an append-only file ---

@pytest.fixture(scope="module")
def durable_settings() -> Iterator[Settings]:
    with tempfile.TemporaryDirectory(prefix="dawet-batches-") as root:
        yield Settings(models_file=MODELS_FILE, default_model=DEMO_MODEL, api_port=free_port(),
                       api_workers=1, worker_concurrency=2, heartbeat_seconds=0.5,
                       lease_seconds=2.0, lease_refresh_seconds=0.3,
                       redis_data_dir=Path(root) / "redis", files_dir=Path(root) / "files",
                       batch_lease_seconds=2.0, batch_poll_seconds=0.5, batch_max_in_flight=2)


def durable_stack(settings: Settings, logs: str) -> Stack:
    """Redis (its append-only file in the settings' data dir), two workers and the API."""
    return Stack(settings, models=[DEMO_MODEL, DEMO_MODEL], log_dir=fresh_log_dir(logs),
                 persist_redis=True).start()


@pytest.fixture(scope="module")
def durable(durable_settings) -> Iterator[dict]:
    holder = {"stack": durable_stack(durable_settings, "logs-batches")}
    yield holder
    holder["stack"].stop()


def test_a_batch_survives_a_restart_of_the_whole_stack(durable, durable_settings):
    client = sdk(durable["stack"].api_url)
    lines = [chat_line(f"r-{i}", 200) for i in range(12)]
    lines[4]["body"]["temperature"] = 9.0  # out of range: an error line
    batch = start_batch(client, lines)
    wait_until(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 2, 120,
               "the batch's first results")
    before = client.batches.retrieve(batch.id)
    durable["stack"].stop()
    assert before.status == "in_progress" and before.request_counts.completed < 11
    # The same API port, files directory and Redis data: the client goes on as before.
    durable["stack"] = durable_stack(durable_settings, "logs-batches-restarted")
    batch = wait_for_end(client, batch.id)
    assert batch.status == "completed"
    results = assert_one_line_each(client, batch, lines)
    assert (batch.request_counts.completed, batch.request_counts.failed) == (11, 1)
    assert results["r-4"]["error"]["code"] == "invalid_request_error"
    store = redis.Redis.from_url(durable["stack"].settings.redis_url)
    assert int(store.hget(f"dawet:batch:{{{batch.id}}}", "fence")) >= 2, "never taken over"


def test_a_killed_worker_loses_no_line(durable):
    stack = durable["stack"]
    client = sdk(stack.api_url)
    lines = [chat_line(f"k-{i}", 96) for i in range(10)]
    batch = start_batch(client, lines)
    with httpx.Client(base_url=stack.api_url, timeout=30) as api:
        victim = _a_decoding_line(api, batch.id, len(lines))
        worker = api.get(f"/v1/jobs/{victim}").json()["worker"]
    stack.child(worker.split("-", 1)[0]).process.send_signal(signal.SIGKILL)
    batch = wait_for_end(client, batch.id)
    assert batch.status == "completed"
    results = assert_one_line_each(client, batch, lines)
    assert all(r["response"]["body"]["usage"]["completion_tokens"] == 96
               for r in results.values())
    log = JobStore(redis.Redis.from_url(stack.settings.redis_url), 60).read(victim)
    assert "restarted" in [e.get("state") for e in log], "the kill landed after the line ended"


def _a_decoding_line(api: httpx.Client, batch_id: str, lines: int) -> str:
    """The job of a line of the batch that has delivered tokens and is still running."""
    found: list[str] = []

    def look() -> bool:
        for index in range(lines):
            job = api.get(f"/v1/jobs/{line_job_id(batch_id, index)}")
            if job.status_code == 200 and job.json()["text"] and job.json()["state"] == "started":
                found.append(job.json()["id"])
                return True
        return False

    wait_until(look, 120, "a line's job delivering tokens", interval=0.05)
    return found[0]
