"""Tenancy on a real stack: one key's jobs and conversations are its own, keys are created and
revoked live with `dawet keys`, usage adds up to the job logs, budgets refuse what would pass
them, and no request path walks the keyspace."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid

import httpx
import pytest
import redis
import websocket
from openai import OpenAI

from conftest import DEMO_MODEL, MODELS_FILE, ROOT, stream_events, wait_until
from metrics_helpers import scrape, value
from model_store.registry import load_registry
from model_store.tokenizer import ChatTokenizer

ALICE, BOB, ROOT_KEY = (f"sk-{name}-{uuid.uuid4().hex}" for name in ("alice", "bob", "root"))
SHORT = {"model": DEMO_MODEL, "prompt": "Halo", "max_new_tokens": 4, "temperature": 0}
IDLE_MODEL = "dawet-bench-4m"  # served by no worker in the session stack
SPEC = load_registry(MODELS_FILE, DEMO_MODEL).get(DEMO_MODEL)


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture(scope="module")
def keyed_url(stack) -> str:
    """A second API process on the session stack's Redis, with alice, bob and an admin."""
    return stack.add_api(api_keys=f"alice={_digest(ALICE)},bob={_digest(BOB)}",
                         admin_api_keys=f"root={_digest(ROOT_KEY)}")


def client(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {key}"})


@pytest.fixture(scope="module")
def alice(keyed_url):
    with client(keyed_url, ALICE) as api:
        yield api


@pytest.fixture(scope="module")
def bob(keyed_url):
    with client(keyed_url, BOB) as api:
        yield api


@pytest.fixture(scope="module")
def admin(keyed_url):
    with client(keyed_url, ROOT_KEY) as api:
        yield api


def dawet_keys(stack, *args: str) -> subprocess.CompletedProcess:
    """Run the real `dawet keys` command against the stack's Redis."""
    env = {**os.environ, "DAWET_REDIS_URL": stack.settings.redis_url}
    return subprocess.run([sys.executable, "-m", "dawet.cli", "keys", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def new_key(stack, *options: str) -> tuple[str, str]:
    """Create a key with a fresh name; (name, key)."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    created = dawet_keys(stack, "create", name, *options)
    assert created.returncode == 0, created.stderr
    return name, created.stdout.strip()


def ws_url(base: str, path: str, key: str) -> str:
    return f"{base.replace('http', 'ws', 1)}{path}?access_token={key}"


def generate(api: httpx.Client, **body) -> dict:
    response = api.post("/v1/generate", json={**SHORT, **body})
    assert response.status_code == 202, response.text
    return response.json()


def finished(api: httpx.Client, job_id: str) -> dict:
    wait_until(lambda: api.get(f"/v1/jobs/{job_id}").json()["state"] not in
               ("queued", "started"), 120, f"job {job_id} to end", interval=0.1)
    return api.get(f"/v1/jobs/{job_id}").json()


def assert_not_found(response: httpx.Response, code: str) -> None:
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == code


def test_another_keys_job_does_not_exist_for_it(alice, bob, admin, keyed_url):
    job = generate(alice, max_new_tokens=24, min_new_tokens=24)
    assert_not_found(bob.get(f"/v1/jobs/{uuid.uuid4().hex}"), "job_not_found")  # the same
    for response in (bob.get(f"/v1/jobs/{job['id']}"), bob.delete(f"/v1/jobs/{job['id']}")):
        assert_not_found(response, "job_not_found")
    (frame,) = stream_events(ws_url(keyed_url, f"/v1/jobs/{job['id']}/stream", BOB))
    assert frame["type"] == "error" and frame["error"]["code"] == "job_not_found"
    assert finished(alice, job["id"])["state"] == "succeeded"  # bob's cancel did nothing
    assert admin.get(f"/v1/jobs/{job['id']}").json()["state"] == "succeeded"
    events = stream_events(ws_url(keyed_url, f"/v1/jobs/{job['id']}/stream", ALICE))
    assert events[-1]["type"] == "done"


def test_an_openai_completions_job_belongs_to_its_key(keyed_url, alice, bob):
    sdk = OpenAI(base_url=f"{keyed_url}/v1", api_key=ALICE, max_retries=0)
    reply = sdk.chat.completions.with_raw_response.create(
        model=DEMO_MODEL, messages=[{"role": "user", "content": "Halo"}], max_tokens=3)
    job_id = reply.headers["X-Dawet-Job-Id"]
    assert alice.get(f"/v1/jobs/{job_id}").status_code == 200
    assert_not_found(bob.get(f"/v1/jobs/{job_id}"), "job_not_found")


def _chat(url: str, key: str):
    return websocket.create_connection(ws_url(url, "/v1/chat", key), timeout=60)


def _chat_frame(ws, **frame) -> dict:
    """Send a frame; the first answer (a `turn`, or an error)."""
    ws.send(json.dumps(frame))
    return json.loads(ws.recv())


def _until_terminal(ws) -> None:
    while json.loads(ws.recv())["type"] not in ("done", "error"):
        pass


def test_another_keys_conversation_does_not_exist_for_it(keyed_url, alice, bob, admin):
    with_alice = _chat(keyed_url, ALICE)
    turn = _chat_frame(with_alice, type="message", content="Halo!", max_new_tokens=4)
    _until_terminal(with_alice)
    conversation, job_id = turn["conversation_id"], turn["job_id"]
    for response in (bob.get(f"/v1/conversations/{conversation}"),
                     bob.delete(f"/v1/conversations/{conversation}")):
        assert_not_found(response, "conversation_not_found")
    with_bob = _chat(keyed_url, BOB)
    for frame in ({"type": "message", "conversation_id": conversation, "content": "mine?"},
                  {"type": "regenerate", "conversation_id": conversation}):
        refused = _chat_frame(with_bob, **frame)
        assert refused["type"] == "error", refused
        assert refused["error"]["code"] == "conversation_not_found"
    resumed = _chat_frame(with_bob, type="resume", job_id=job_id)
    assert resumed["error"]["code"] == "job_not_found"
    with_bob.close()
    assert len(alice.get(f"/v1/conversations/{conversation}").json()["turns"]) == 1
    assert admin.get(f"/v1/conversations/{conversation}").status_code == 200
    assert admin.delete(f"/v1/conversations/{conversation}").status_code == 200
    with_alice.close()


def test_a_key_sees_only_the_models_it_may_use(stack, keyed_url):
    _, key = new_key(stack, "--models", IDLE_MODEL)
    with client(keyed_url, key) as scoped:
        assert [m["id"] for m in scoped.get("/v1/models").json()["data"]] == [IDLE_MODEL]
        assert_not_found(scoped.get(f"/v1/models/{DEMO_MODEL}"), "model_not_found")
        assert scoped.get(f"/v1/models/{IDLE_MODEL}").status_code == 200
        names = [m["name"] for m in scoped.get("/v1/chat/models").json()["models"]]
        assert names == [IDLE_MODEL]
        assert scoped.post("/v1/generate", json=SHORT).json()["error"]["code"] == \
            "model_not_allowed"


def test_a_key_created_live_works_and_is_refused_within_seconds_of_its_revocation(
        stack, keyed_url):
    name, key = new_key(stack)
    assert key.startswith("dwt-") and key not in dawet_keys(stack, "list").stdout
    assert name in dawet_keys(stack, "list").stdout
    again = dawet_keys(stack, "create", name)
    assert again.returncode == 2 and "exists already" in again.stderr
    with client(keyed_url, key) as api:
        assert api.get("/v1/models").status_code == 200
        assert dawet_keys(stack, "revoke", name).returncode == 0
        wait_until(lambda: api.get("/v1/models").status_code == 401, 5,
                   "the revoked key to be refused", interval=0.2)
    assert dawet_keys(stack, "revoke", name).returncode == 2


def _done_usage(api: httpx.Client, job_ids: list[str]) -> tuple[int, int]:
    """(prompt, completion) tokens that the jobs' own logs record."""
    usages = [finished(api, job_id)["usage"] for job_id in job_ids]
    return (sum(u["prompt_tokens"] for u in usages),
            sum(u["completion_tokens"] for u in usages))


def test_usage_per_key_adds_up_to_the_job_logs(stack, keyed_url, admin, alice):
    name, key = new_key(stack)
    with client(keyed_url, key) as api:
        sdk = OpenAI(base_url=f"{keyed_url}/v1", api_key=key, max_retries=0)
        chat = sdk.chat.completions.with_raw_response.create(
            model=DEMO_MODEL, messages=[{"role": "user", "content": "Halo"}], max_tokens=5)
        jobs = [generate(api)["id"], generate(api, max_new_tokens=9)["id"],
                chat.headers["X-Dawet-Job-Id"]]
        prompt, completion = _done_usage(api, jobs)
        (row,) = api.get("/v1/usage").json()["data"]
        assert (row["key"], row["model"], row["requests"]) == (name, DEMO_MODEL, 3)
        assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt, completion)
        assert api.get("/v1/usage").json()["budget"]["held"] == 0  # every hold settled
        assert api.get("/v1/usage", params={"key": "bob"}).status_code == 403
    assert row in admin.get("/v1/usage").json()["data"]
    assert all(r["key"] == "alice" for r in alice.get("/v1/usage").json()["data"])
    samples = scrape(f"{keyed_url}/metrics")
    assert value(samples, "dawet_usage_tokens_total", key=name, model=DEMO_MODEL,
                 kind="completion") == completion
    assert value(samples, "dawet_usage_requests_total", key=name, model=DEMO_MODEL) == 3


def test_a_daily_budget_refuses_the_request_that_would_pass_it(stack, keyed_url):
    cost = len(ChatTokenizer(SPEC.path).encode_prompt("Halo")) + 8  # 8 forced new tokens
    _, key = new_key(stack, "--daily-tokens", str(2 * cost + 5))
    forced = {"max_new_tokens": 8, "min_new_tokens": 8}
    with client(keyed_url, key) as api:
        first = generate(api, **forced)
        assert finished(api, first["id"])["usage"]["total_tokens"] == cost
        second = generate(api, **forced)  # held while it runs: the third cannot count on it
        refused = api.post("/v1/generate", json={**SHORT, **forced})
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "budget_exceeded"
        assert int(refused.headers["Retry-After"]) <= 86_400
        finished(api, second["id"])
        assert generate(api, max_new_tokens=1)["id"]  # 5 tokens fit in what is left
        budget = api.get("/v1/usage").json()["budget"]
        assert budget["daily_tokens"] == 2 * cost + 5 and budget["spent_today"] == 2 * cost


def test_an_idempotency_key_is_bound_to_its_request_and_its_api_key(alice, bob):
    headers = {"Idempotency-Key": f"order-{uuid.uuid4().hex}"}
    first = alice.post("/v1/generate", json=SHORT, headers=headers)
    assert alice.post("/v1/generate", json=SHORT, headers=headers).json()["id"] == \
        first.json()["id"]
    for reused in (alice.post("/v1/generate", json={**SHORT, "prompt": "Hai"}, headers=headers),
                   alice.post("/v1/completions", headers=headers,
                              json={"model": DEMO_MODEL, "prompt": "Halo", "max_tokens": 4})):
        assert reused.status_code == 422
        assert reused.json()["error"]["code"] == "idempotency_key_reused"
    other = bob.post("/v1/generate", json=SHORT, headers=headers)  # bob's own key space
    assert other.status_code == 202 and other.json()["id"] != first.json()["id"]


def test_a_claim_left_by_a_dead_api_process_lapses_within_a_minute(stack, alice, redis_client):
    """An API process that claimed a key and died before queueing its job leaves the claim
    it wrote; the claim lapses in IDEMPOTENCY_CLAIM_SECONDS, not the job TTL."""
    from api.admission import IDEMPOTENCY_CLAIM_SECONDS

    headers = {"Idempotency-Key": f"crash-{uuid.uuid4().hex}"}
    body = json.dumps(SHORT).encode()
    digest = hashlib.sha256(b"POST /v1/generate\n" + body).hexdigest()
    key = (f"dawet:idempotency:key:alice:"
           f"{hashlib.sha256(headers['Idempotency-Key'].encode()).hexdigest()}")
    claim = {"request": digest, "job": uuid.uuid4().hex, "created": False}
    redis_client.set(key, json.dumps(claim), ex=IDEMPOTENCY_CLAIM_SECONDS)  # what it left
    post = lambda: alice.post("/v1/generate", content=body,  # noqa: E731
                              headers={**headers, "Content-Type": "application/json"})
    assert post().json()["error"]["code"] == "idempotency_key_in_use"
    assert 0 < redis_client.ttl(key) <= IDEMPOTENCY_CLAIM_SECONDS
    redis_client.pexpire(key, 1)  # the minute passes
    wait_until(lambda: not redis_client.exists(key), 5, "the claim to lapse")
    admitted = post()
    assert admitted.status_code == 202 and admitted.json()["id"] != claim["job"]
    assert redis_client.ttl(key) > IDEMPOTENCY_CLAIM_SECONDS  # now it names the job


def test_the_api_refuses_to_start_without_keys_when_they_are_required():
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAWET_")}
    env["DAWET_REQUIRE_API_KEYS"] = "true"
    refused = subprocess.run([sys.executable, "-m", "dawet.cli", "api"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert "refusing to start the API without API keys" in refused.stderr


def _scans(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("scan", "keys"))


def test_no_request_path_walks_the_keyspace(stack, keyed_url, admin, redis_client):
    filler = [f"history:{uuid.uuid4().hex}:{i}" for i in range(20_000)]
    for start in range(0, len(filler), 5_000):
        redis_client.mset({key: "x" for key in filler[start:start + 5_000]})
    try:
        before = _scans(redis_client)
        job = generate(admin)
        finished(admin, job["id"])
        stream_events(ws_url(keyed_url, f"/v1/jobs/{job['id']}/stream", ROOT_KEY))
        sdk = OpenAI(base_url=f"{keyed_url}/v1", api_key=ROOT_KEY, max_retries=0)
        sdk.chat.completions.create(model=DEMO_MODEL, max_tokens=2,
                                    messages=[{"role": "user", "content": "Halo"}])
        for path in ("/v1/models", f"/v1/models/{DEMO_MODEL}", "/v1/chat/models", "/v1/usage",
                     "/readyz", "/healthz", "/metrics"):
            assert admin.get(path).status_code == 200, path
        assert _scans(redis_client) == before
    finally:
        for start in range(0, len(filler), 5_000):
            redis_client.delete(*filler[start:start + 5_000])


def test_only_an_admin_key_adds_or_removes_an_adapter(alice, admin):
    body = {"lora_name": f"kopi-{uuid.uuid4().hex[:8]}",
            "lora_path": load_registry(MODELS_FILE).get("dawet-kopi").lora}
    refused = alice.post("/v1/load_lora_adapter", json=body)
    assert (refused.status_code, refused.json()["error"]["code"]) == (403, "admin_required")
    assert admin.post("/v1/load_lora_adapter", json=body).status_code == 200
    unload = {"lora_name": body["lora_name"]}
    assert alice.post("/v1/unload_lora_adapter", json=unload).status_code == 403
    assert admin.post("/v1/unload_lora_adapter", json=unload).status_code == 200
