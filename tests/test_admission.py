"""Who gets in and when: queue and rate limits (429 + Retry-After), model-scoped keys (403),
Idempotency-Key replays, start deadlines, CORS, WebSocket message size and log hygiene."""
from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid

import pytest
import redis
import websocket
from pydantic import ValidationError

from api import create_app
from conftest import ARTIFACTS, DEMO_BASE, DEMO_MODEL, MODELS_FILE, stream_events, submit
from api.keys import Principal, configured_keys
from dawet.settings import Settings
from tasks.worker.app import create_celery, send_job
from tasks.jobs.contract import Job, JobState, SamplingParams, StatusEvent
from tasks.jobs.log import JobStore

IDLE_MODEL = "dawet-bench-4m"  # in the registry, but the session stack runs no worker for it
IDLE_QUEUE = f"dawet.{IDLE_MODEL}"
SHORT = {"model": IDLE_MODEL, "prompt": "Halo", "max_new_tokens": 8}


@pytest.fixture()
def make_client(stack, redis_client):
    """In-process API clients on the session stack's Redis; the idle queue is emptied after."""
    redis_client.delete(IDLE_QUEUE)

    def make(**config):
        return create_app({"models_file": MODELS_FILE, "redis_url": stack.settings.redis_url,
                           **config}).test_client()

    yield make
    redis_client.delete(IDLE_QUEUE)


def _key() -> tuple[str, str]:
    """A fresh API key and its digest, so no two tests share rate counters."""
    key = f"sk-{uuid.uuid4().hex}"
    return key, hashlib.sha256(key.encode()).hexdigest()


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _not_near_a_minute_boundary() -> None:
    """Rate windows are calendar minutes; keep a test's requests inside one."""
    if 60 - time.time() % 60 < 5:
        time.sleep(6)


def _assert_429(response, code: str) -> None:
    assert response.status_code == 429, response.json
    assert response.json["error"]["code"] == code
    assert 1 <= int(response.headers["Retry-After"]) <= 60


def test_a_full_queue_refuses_with_429_and_retry_after(make_client):
    client = make_client(max_queued_jobs=2)
    for _ in range(2):
        assert client.post("/v1/generate", json=SHORT).status_code == 202
    _assert_429(client.post("/v1/generate", json=SHORT), "queue_full")
    assert make_client(max_queued_jobs=3).post("/v1/generate", json=SHORT).status_code == 202


def test_requests_per_minute_are_limited_per_key(make_client):
    (key_a, digest_a), (key_b, digest_b) = _key(), _key()
    client = make_client(api_keys=f"{digest_a},{digest_b}", rate_limit_requests_per_minute=2)
    _not_near_a_minute_boundary()
    for _ in range(2):
        assert client.post("/v1/generate", json=SHORT, headers=_bearer(key_a)).status_code == 202
    _assert_429(client.post("/v1/generate", json=SHORT, headers=_bearer(key_a)),
                "rate_limit_exceeded")
    assert client.post("/v1/generate", json=SHORT, headers=_bearer(key_b)).status_code == 202


def test_tokens_per_minute_count_prompt_and_max_new_tokens(make_client):
    key, digest = _key()
    client = make_client(api_keys=digest, rate_limit_tokens_per_minute=300)
    _not_near_a_minute_boundary()
    body = {**SHORT, "max_new_tokens": 200}
    assert client.post("/v1/generate", json=body, headers=_bearer(key)).status_code == 202
    _assert_429(client.post("/v1/generate", json=body, headers=_bearer(key)),
                "rate_limit_exceeded")
    small = {**SHORT, "max_new_tokens": 8}
    assert client.post("/v1/generate", json=small, headers=_bearer(key)).status_code == 202


def test_a_key_scoped_to_other_models_gets_403(make_client):
    key, digest = _key()
    client = make_client(api_keys=f"{digest}:{IDLE_MODEL}")
    refused = client.post("/v1/generate", json={**SHORT, "model": DEMO_MODEL},
                          headers=_bearer(key))
    assert refused.status_code == 403
    assert refused.json["error"]["code"] == "model_not_allowed"
    assert refused.json["error"]["param"] == "model"
    assert client.post("/v1/generate", json=SHORT, headers=_bearer(key)).status_code == 202


def test_api_key_entries_may_name_keys_and_models_and_bad_entries_are_rejected():
    digest = "ab" * 32
    settings = Settings(api_keys=f"ci-bot={digest.upper()}:{IDLE_MODEL}|{DEMO_MODEL}, {'cd' * 32}",
                        admin_api_keys=f"ops={'ef' * 32}")
    assert configured_keys(settings) == {
        digest: Principal("ci-bot", frozenset({IDLE_MODEL, DEMO_MODEL})),
        "cd" * 32: Principal("key-cdcdcdcd"), "ef" * 32: Principal("ops", admin=True)}
    for bad in (f"{digest}:", f"{digest}:a||b", f"{digest}:a:b", "ab" * 31, f"a b={digest}",
                f"={digest}"):
        with pytest.raises(ValidationError, match="api_keys"):
            Settings(api_keys=bad)


def test_the_same_idempotency_key_returns_the_same_job(api):
    body = {"model": DEMO_MODEL, "prompt": "Halo", "max_new_tokens": 6}
    first = api.post("/v1/generate", json=body, headers={"Idempotency-Key": "order-1"})
    again = api.post("/v1/generate", json=body, headers={"Idempotency-Key": "order-1"})
    other = api.post("/v1/generate", json=body, headers={"Idempotency-Key": "order-2"})
    assert first.status_code == again.status_code == other.status_code == 202
    assert first.json()["id"] == again.json()["id"] != other.json()["id"]
    events = stream_events(first.json()["stream_url"])
    assert [e.get("state") for e in events].count("started") == 1
    chat = {"model": DEMO_MODEL, "messages": [{"role": "user", "content": "Halo"}],
            "max_tokens": 4}
    replies = [api.post("/v1/chat/completions", json=chat, headers={"Idempotency-Key": "chat-1"})
               for _ in range(2)]
    assert replies[0].json() == replies[1].json()
    assert replies[0].headers["X-Dawet-Job-Id"] == replies[1].headers["X-Dawet-Job-Id"]


def test_a_refused_submission_does_not_use_up_its_idempotency_key(api):
    headers = {"Idempotency-Key": f"retry-{uuid.uuid4().hex}"}
    bad = api.post("/v1/generate", json={"model": DEMO_MODEL, "prompt": "x", "top_p": 5},
                   headers=headers)
    assert bad.status_code == 400
    good = api.post("/v1/generate", json={"model": DEMO_MODEL, "prompt": "x",
                                          "max_new_tokens": 2}, headers=headers)
    assert good.status_code == 202
    assert api.post("/v1/generate", json={}, headers={"Idempotency-Key": "k" * 256}) \
        .status_code == 400


def test_an_idempotency_key_is_confirmed_in_the_multi_that_queues_its_job(make_client, stack):
    """No moment exists where the job is queued while its key is still a short claim: an API
    process that died there would let a retry, once the claim lapsed, queue the job twice."""
    monitor_client = redis.Redis.from_url(stack.settings.redis_url, decode_responses=True,
                                          socket_timeout=10)  # a missing EXEC fails, not hangs
    with monitor_client.monitor() as monitor:
        reply = make_client().post("/v1/generate", json=SHORT,
                                   headers={"Idempotency-Key": f"multi-{uuid.uuid4().hex}"})
        assert reply.status_code == 202
        record = f"dawet:job:{{{reply.json['id']}}}"
        transactions: dict[tuple, list[str]] = {}  # a client's commands since its MULTI
        while True:
            command = monitor.next_command()
            client = (command["client_address"], command["client_port"])
            words = command["command"]
            if words.upper() == "MULTI":
                transactions[client] = []
            elif words.upper() == "EXEC" and any(record in w for w in transactions.get(client, [])):
                break
            elif client in transactions:
                transactions[client].append(words)
    queued = transactions[client]
    assert any(w.startswith(f"HSET {record}") for w in queued)
    assert any(w.startswith("LPUSH dawet.") for w in queued)
    assert any(w.startswith("SET dawet:idempotency:") and '"created": true' in w
               for w in queued), queued


def test_a_job_not_started_by_its_deadline_expires_without_running(stack, redis_client):
    store = JobStore(redis_client, 600)
    late = Job(model=DEMO_MODEL, prompt_token_ids=[1, 2, 3], deadline_at=time.time() - 1,
               params=SamplingParams(max_new_tokens=4, temperature=0.0, top_p=1.0))
    store.create(late)
    store.append(late.id, StatusEvent(JobState.QUEUED))
    send_job(create_celery(stack.settings), late, f"dawet.{DEMO_BASE}")
    events = stream_events(f"{stack.api_url.replace('http', 'ws', 1)}/v1/jobs/{late.id}/stream")
    assert [e["type"] for e in events] == ["status", "error"]
    assert events[-1]["error"]["code"] == "deadline_exceeded"


def test_the_api_sets_the_deadline_from_the_request_or_the_default(make_client, stack,
                                                                   redis_client):
    store = JobStore(redis_client, 600)
    started = time.time()
    own = make_client().post("/v1/generate", json={**SHORT, "deadline_seconds": 30}).json
    default = make_client(default_deadline_seconds=90).post("/v1/generate", json=SHORT).json
    none = make_client().post("/v1/generate", json=SHORT).json
    assert 29 < store.load(own["id"]).deadline_at - started < 32
    assert 89 < store.load(default["id"]).deadline_at - started < 92
    assert store.load(none["id"]).deadline_at is None
    view = make_client().get(f"/v1/jobs/{own['id']}").json
    assert view["state"] == "queued"


def test_cors_headers_only_for_configured_origins(make_client):
    preflight = {"Origin": "https://chat.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "Authorization, Idempotency-Key"}
    allowed = make_client(cors_origins="https://chat.example").options("/v1/generate",
                                                                       headers=preflight)
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://chat.example"
    assert "idempotency-key" in allowed.headers["Access-Control-Allow-Headers"].lower()
    other = make_client(cors_origins="https://chat.example").options(
        "/v1/generate", headers={**preflight, "Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers
    assert "Access-Control-Allow-Origin" not in make_client().options(
        "/v1/generate", headers=preflight).headers


def test_an_oversized_websocket_message_closes_the_stream(api):
    job = submit(api, prompt="Once upon a time", min_new_tokens=500, max_new_tokens=500)
    ws = websocket.create_connection(job["stream_url"], timeout=30)
    ws.send("x" * (64 * 1024 + 1))
    frames = []
    try:
        while frame := ws.recv():
            frames.append(json.loads(frame))
    except websocket.WebSocketConnectionClosedException:
        pass
    assert not any(f["type"] in ("done", "error") for f in frames), \
        "the server must close the stream before the job ends"
    assert api.get(f"/v1/jobs/{job['id']}").json()["state"] in ("queued", "started")
    api.delete(f"/v1/jobs/{job['id']}")


def test_prompts_and_keys_stay_out_of_logs_unless_prompt_logging_is_on(make_client, caplog):
    key, digest = _key()
    marker = f"MARKER-{uuid.uuid4().hex}"
    body = {**SHORT, "prompt": marker}
    with caplog.at_level(logging.DEBUG):
        assert make_client(api_keys=digest).post("/v1/generate", json=body,
                                                 headers=_bearer(key)).status_code == 202
    assert marker not in caplog.text and key not in caplog.text
    with caplog.at_level(logging.INFO):
        make_client(log_prompts=True).post("/v1/generate", json=body)
    assert marker in caplog.text


def test_the_running_stack_logs_no_prompt(api):
    marker = f"MARKER-{uuid.uuid4().hex}"
    job = submit(api, prompt=marker, max_new_tokens=4)
    assert stream_events(job["stream_url"])[-1]["type"] == "done"
    logs = "".join(p.read_text(errors="replace") for p in (ARTIFACTS / "logs").glob("*.log"))
    assert job["id"] in logs and marker not in logs


def test_the_openapi_document_covers_every_http_route(make_client):
    client = make_client()
    document = client.get("/openapi.json").json
    app_routes = {(rule.rule.replace("<", "{").replace(">", "}").replace("path:", ""), method)
                  for rule in client.application.url_map.iter_rules()
                  for method in rule.methods - {"HEAD", "OPTIONS"}
                  if rule.endpoint not in ("static", "docs.openapi") and not rule.websocket}
    documented = {(path, method.upper()) for path, item in document["paths"].items()
                  for method in item if method != "parameters"}
    assert documented == app_routes
    assert "deadline_seconds" in document["components"]["schemas"]["GenerateRequest"]["properties"]
