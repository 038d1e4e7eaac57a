"""Bad input gets a 4xx with the error envelope (or an error frame), never a 500."""
from __future__ import annotations

import pytest

from conftest import DEMO_MODEL, stream_events

USER = [{"role": "user", "content": "hi"}]

# (id, body, status, code, param); body is a dict sent as JSON, or raw bytes.
GENERATE_CASES = [
    ("malformed-json", b'{"prompt": "hi"', 400, "invalid_json", None),
    ("not-an-object", b"[]", 400, "invalid_request_error", None),
    ("empty-body", b"", 400, "invalid_json", None),
    ("unknown-field", {"prompt": "hi", "temprature": 0.5}, 400, "invalid_request_error", "temprature"),
    ("prompt-wrong-type", {"prompt": 5}, 400, "invalid_request_error", "prompt"),
    ("number-as-string", {"prompt": "hi", "max_new_tokens": "5"}, 400, "invalid_request_error",
     "max_new_tokens"),
    ("bool-as-number", {"prompt": "hi", "temperature": True}, 400, "invalid_request_error",
     "temperature"),
    ("empty-messages", {"messages": []}, 400, "invalid_request_error", "messages"),
    ("empty-prompt", {"prompt": ""}, 400, "invalid_request_error", "prompt"),
    ("unknown-role", {"messages": [{"role": "robot", "content": "x"}]}, 400,
     "invalid_request_error", "messages.0.role"),
    ("message-without-content", {"messages": [{"role": "user"}]}, 400, "invalid_request_error",
     "messages.0.content"),
    ("neither-prompt-nor-messages", {"max_new_tokens": 5}, 400, "invalid_request_error", None),
    ("both-prompt-and-messages", {"prompt": "hi", "messages": USER}, 400,
     "invalid_request_error", None),
    ("unknown-model", {"model": "no-such-model", "prompt": "hi"}, 404, "model_not_found", "model"),
    ("max-new-tokens-zero", {"prompt": "hi", "max_new_tokens": 0}, 400, "invalid_request_error",
     "max_new_tokens"),
    ("max-new-tokens-negative", {"prompt": "hi", "max_new_tokens": -3}, 400,
     "invalid_request_error", "max_new_tokens"),
    ("max-new-tokens-above-limit", {"prompt": "hi", "max_new_tokens": 513}, 400,
     "invalid_request_error", "max_new_tokens"),
    ("temperature-too-high", {"prompt": "hi", "temperature": 2.5}, 400, "invalid_request_error",
     "temperature"),
    ("temperature-negative", {"prompt": "hi", "temperature": -0.1}, 400, "invalid_request_error",
     "temperature"),
    ("top-p-zero", {"prompt": "hi", "top_p": 0}, 400, "invalid_request_error", "top_p"),
    ("top-p-above-one", {"prompt": "hi", "top_p": 1.5}, 400, "invalid_request_error", "top_p"),
    ("top-k-negative", {"prompt": "hi", "top_k": -1}, 400, "invalid_request_error", "top_k"),
    ("repetition-penalty-zero", {"prompt": "hi", "repetition_penalty": 0}, 400,
     "invalid_request_error", "repetition_penalty"),
    ("too-many-stops", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400,
     "invalid_request_error", "stop"),
    ("stop-wrong-type", {"prompt": "hi", "stop": 7}, 400, "invalid_request_error", "stop"),
    ("empty-stop", {"prompt": "hi", "stop": ""}, 400, "invalid_request_error", "stop.0"),
    ("system-prompt-without-messages", {"prompt": "hi", "system_prompt": "x"}, 400,
     "invalid_request_error", None),
    ("prompt-longer-than-context", {"prompt": "makan nasi goreng " * 1200}, 400,
     "context_length_exceeded", "prompt"),
    ("messages-longer-than-context", {"messages": [{"role": "user", "content": "saya " * 2100}]},
     400, "context_length_exceeded", "messages"),
]


def _post(api, body):
    if isinstance(body, bytes):
        return api.post("/v1/generate", content=body, headers={"Content-Type": "application/json"})
    return api.post("/v1/generate", json=body if "model" in body else {"model": DEMO_MODEL, **body})


@pytest.mark.parametrize("body,status,code,param",
                         [c[1:] for c in GENERATE_CASES], ids=[c[0] for c in GENERATE_CASES])
def test_bad_generate_requests_get_the_error_envelope(api, body, status, code, param):
    response = _post(api, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["param"] == param
    assert error["message"]


@pytest.mark.parametrize("method,path,status,code", [
    ("GET", "/v1/jobs/no-such-job", 404, "job_not_found"),
    ("DELETE", "/v1/jobs/no-such-job", 404, "job_not_found"),
    ("PUT", "/v1/generate", 405, "method_not_allowed"),
    ("GET", "/v1/nowhere", 404, "not_found"),
])
def test_bad_routes_get_the_error_envelope(api, method, path, status, code):
    response = api.request(method, path)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code


def test_an_oversized_body_gets_413(api):
    response = api.post("/v1/generate", content=b"x" * 2_000_000,
                        headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_entity_too_large"


@pytest.mark.parametrize("suffix,code", [
    ("/v1/jobs/no-such-job/stream", "job_not_found"),
    ("/v1/jobs/no-such-job/stream?after=-1", "invalid_request_error"),
    ("/v1/jobs/no-such-job/stream?after=abc", "invalid_request_error"),
])
def test_bad_streams_get_one_error_frame_then_close(stack, suffix, code):
    events = stream_events(stack.api_url.replace("http", "ws", 1) + suffix, timeout=10)
    assert len(events) == 1
    assert events[0]["type"] == "error" and events[0]["error"]["code"] == code


def test_the_api_keeps_serving_after_bad_input(api):
    for _, body, *_ in GENERATE_CASES:
        _post(api, body)
    assert api.get("/healthz").status_code == 200
    assert _post(api, {"prompt": "hi", "max_new_tokens": 2}).status_code == 202
