"""Bad input to the OpenAI-compatible routes gets OpenAI's error shape and the right status."""
from __future__ import annotations

import pytest

from conftest import DEMO_MODEL

USER = [{"role": "user", "content": "hi"}]
CHAT, TEXT = "/v1/chat/completions", "/v1/completions"
BAD, UNSUPPORTED, UNSUPPORTED_VALUE = "invalid_request_error", "unsupported_parameter", \
    "unsupported_value"

# (id, path, body, status, code, param); a dict body gets model and messages/prompt unless set.
CASES = [
    ("malformed-json", CHAT, b'{"model": "x"', 400, "invalid_json", None),
    ("not-an-object", TEXT, b"[]", 400, BAD, None),
    ("missing-model", CHAT, {"model": None}, 400, BAD, "model"),
    ("empty-model", TEXT, {"model": ""}, 400, BAD, "model"),
    ("unknown-model", CHAT, {"model": "no-such-model"}, 404, "model_not_found", "model"),
    ("unknown-field", CHAT, {"temprature": 1}, 400, BAD, "temprature"),
    ("missing-messages", CHAT, {"messages": None}, 400, BAD, "messages"),
    ("empty-messages", CHAT, {"messages": []}, 400, BAD, "messages"),
    ("unknown-role", CHAT, {"messages": [{"role": "function", "content": "x"}]}, 400, BAD,
     "messages.0.role"),
    ("content-missing", CHAT, {"messages": [{"role": "user"}]}, 400, BAD, "messages.0.content"),
    ("content-number", CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, BAD,
     "messages.0.content"),
    ("content-image-part", CHAT, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400, UNSUPPORTED_VALUE,
     "messages.0.content"),
    ("content-empty-parts", CHAT, {"messages": [{"role": "user", "content": []}]}, 400,
     UNSUPPORTED_VALUE, "messages.0.content"),
    ("message-name", CHAT, {"messages": [{"role": "user", "content": "x", "name": "a"}]}, 400,
     BAD, "messages.0.name"),
    ("missing-prompt", TEXT, {"prompt": None}, 400, BAD, "prompt"),
    ("empty-prompt", TEXT, {"prompt": ""}, 400, BAD, "prompt"),
    ("batched-prompt", TEXT, {"prompt": ["a", "b"]}, 400, UNSUPPORTED_VALUE, "prompt"),
    ("token-id-prompt", TEXT, {"prompt": [1, 2, 3]}, 400, UNSUPPORTED_VALUE, "prompt"),
    ("max-tokens-zero", CHAT, {"max_tokens": 0}, 400, BAD, "max_tokens"),
    ("max-tokens-string", TEXT, {"max_tokens": "5"}, 400, BAD, "max_tokens"),
    ("max-tokens-above-limit", TEXT, {"max_tokens": 513}, 400, BAD, "max_tokens"),
    ("max-completion-tokens-above-limit", CHAT, {"max_tokens": None, "max_completion_tokens": 513}, 400, BAD,
     "max_completion_tokens"),
    ("max-completion-tokens-negative", CHAT, {"max_tokens": None, "max_completion_tokens": -1}, 400, BAD,
     "max_completion_tokens"),
    ("both-token-limits-differ", CHAT, {"max_tokens": 5, "max_completion_tokens": 6}, 400, BAD,
     None),
    ("max-completion-tokens-on-text", TEXT, {"max_completion_tokens": 5}, 400, BAD,
     "max_completion_tokens"),
    ("temperature-too-high", CHAT, {"temperature": 2.5}, 400, BAD, "temperature"),
    ("temperature-bool", TEXT, {"temperature": True}, 400, BAD, "temperature"),
    ("top-p-zero", CHAT, {"top_p": 0}, 400, BAD, "top_p"),
    ("top-p-above-one", TEXT, {"top_p": 1.5}, 400, BAD, "top_p"),
    ("five-stops", CHAT, {"stop": ["a", "b", "c", "d", "e"]}, 400, BAD, "stop"),
    ("empty-stop", TEXT, {"stop": ""}, 400, BAD, "stop.0"),
    ("stop-number", CHAT, {"stop": 7}, 400, BAD, "stop"),
    ("seed-negative", CHAT, {"seed": -1}, 400, BAD, "seed"),
    ("seed-float", TEXT, {"seed": 1.5}, 400, BAD, "seed"),
    ("n-two", CHAT, {"n": 2}, 400, UNSUPPORTED_VALUE, "n"),
    ("n-zero", TEXT, {"n": 0}, 400, UNSUPPORTED_VALUE, "n"),
    ("best-of-three", TEXT, {"best_of": 3}, 400, UNSUPPORTED_VALUE, "best_of"),
    ("presence-penalty", CHAT, {"presence_penalty": 0.5}, 400, UNSUPPORTED_VALUE,
     "presence_penalty"),
    ("frequency-penalty", TEXT, {"frequency_penalty": -1}, 400, UNSUPPORTED_VALUE,
     "frequency_penalty"),
    ("penalty-out-of-range", CHAT, {"frequency_penalty": 3}, 400, BAD, "frequency_penalty"),
    ("user-number", CHAT, {"user": 5}, 400, BAD, "user"),
    ("stream-string", CHAT, {"stream": "yes"}, 400, BAD, "stream"),
    ("stream-options-without-stream", CHAT, {"stream_options": {"include_usage": True}}, 400,
     BAD, None),
    ("stream-options-unknown", TEXT, {"stream": True, "stream_options": {"x": 1}}, 400, BAD,
     "stream_options.x"),
    ("logprobs-number", CHAT, {"logprobs": 2}, 400, BAD, "logprobs"),
    ("top-logprobs-without-logprobs", CHAT, {"top_logprobs": 2}, 400, BAD, None),
    ("top-logprobs-above-20", CHAT, {"logprobs": True, "top_logprobs": 21}, 400, BAD,
     "top_logprobs"),
    ("text-logprobs-above-5", TEXT, {"logprobs": 6}, 400, BAD, "logprobs"),
    ("text-logprobs-bool", TEXT, {"logprobs": True}, 400, BAD, "logprobs"),
    ("logit-bias", TEXT, {"logit_bias": {"5": 1}}, 400, UNSUPPORTED, "logit_bias"),
    ("tool-choice-without-tools", CHAT, {"tool_choice": "auto"}, 400, BAD, "tool_choice"),
    ("functions", CHAT, {"functions": [{"name": "f"}]}, 400, UNSUPPORTED, "functions"),
    ("response-format-unknown-type", CHAT, {"response_format": {"type": "xml"}}, 400, BAD,
     "response_format.type"),
    ("response-format-schema-missing", TEXT, {"response_format": {"type": "json_schema"}}, 400,
     BAD, "response_format"),
    ("response-format-schema-not-an-object", CHAT, {"response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}}, 400, BAD,
     "response_format.json_schema.schema"),
    ("response-format-invalid-schema", TEXT, {"response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "thing"}}}}, 400,
     "invalid_schema", "response_format.json_schema.schema"),
    ("response-format-unsupported-keyword", CHAT, {"response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "properties": {"a": {"oneOf": [{"type": "integer"}]}}}}}}, 400,
     "invalid_schema", "response_format.json_schema.schema"),
    ("response-format-bad-name", CHAT, {"response_format": {
        "type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}}, 400, BAD,
     "response_format.json_schema.name"),
    ("response-format-with-min-tokens", CHAT, {"response_format": {"type": "json_object"},
                                               "min_tokens": 3}, 400, BAD, "response_format"),
    ("echo", TEXT, {"echo": True}, 400, UNSUPPORTED, "echo"),
    ("suffix", TEXT, {"suffix": "end"}, 400, UNSUPPORTED, "suffix"),
    ("top-k-negative", CHAT, {"top_k": -1}, 400, BAD, "top_k"),
    ("repetition-penalty-zero", TEXT, {"repetition_penalty": 0}, 400, BAD, "repetition_penalty"),
    ("min-tokens-negative", CHAT, {"min_tokens": -1}, 400, BAD, "min_tokens"),
    ("messages-longer-than-context", CHAT, {"messages": [{"role": "user", "content": "saya " * 2100}]},
     400, "context_length_exceeded", "messages"),
    ("prompt-longer-than-context", TEXT, {"prompt": "makan nasi goreng " * 1200}, 400,
     "context_length_exceeded", "prompt"),
    ("no-worker-serves-the-model", CHAT, {"model": "dawet-bench-4m"}, 503, "model_unavailable",
     "model"),
]


def _post(api, path, body):
    if isinstance(body, bytes):
        return api.post(path, content=body, headers={"Content-Type": "application/json"})
    base = {"model": DEMO_MODEL, "max_tokens": 2}
    base |= {"messages": USER} if path == CHAT else {"prompt": "hi"}
    full = {k: v for k, v in (base | body).items() if v is not None}
    return api.post(path, json=full)


@pytest.mark.parametrize("path,body,status,code,param", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_openai_requests_get_the_error_envelope(api, path, body, status, code, param):
    response = _post(api, path, body)
    assert response.status_code == status, response.text
    assert "X-Dawet-Job-Id" not in response.headers
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["code"], error["param"]) == (code, param), error
    assert error["type"] == ("service_unavailable" if status == 503 else "invalid_request_error")
    assert error["message"]


@pytest.mark.parametrize("extra", [
    {"temperature": 1, "top_p": 1, "seed": 3, "n": 1, "presence_penalty": 0,
     "frequency_penalty": 0.0, "user": "u-1", "stop": "zz", "logprobs": False,
     "response_format": {"type": "text"}},
    {"max_tokens": 2, "max_completion_tokens": 2, "stream": False, "tools": None},
    {"n": None, "presence_penalty": None, "stream": None, "stop": None, "temperature": None},
])
def test_options_at_their_neutral_values_are_accepted(api, extra):
    response = api.post(CHAT, json={"model": DEMO_MODEL, "messages": USER, "max_tokens": 2, **extra})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["role"] == "assistant"
