"""POST /tokenize and /detokenize (vLLM's shapes) against the real stack's API."""
from __future__ import annotations

import pytest

from conftest import DEMO_MODEL, MODELS_FILE
from model_store.registry import load_registry
from model_store.tokenizer import ChatTokenizer, Message

SPEC = load_registry(MODELS_FILE, DEMO_MODEL).get(DEMO_MODEL)


@pytest.fixture(scope="module")
def tokenizer() -> ChatTokenizer:
    return ChatTokenizer(SPEC.path)


def test_a_prompt_tokenizes_as_a_completion_sees_it_and_detokenizes_back(api, tokenizer):
    text = "Halo, apa kabar? Selamat pagi."
    answer = api.post("/tokenize", json={"model": DEMO_MODEL, "prompt": text}).json()
    assert answer["tokens"] == tokenizer.encode_prompt(text)
    assert answer["count"] == len(answer["tokens"])
    assert answer["max_model_len"] == SPEC.context_length
    completion = api.post("/v1/completions", json={"model": DEMO_MODEL, "prompt": text,
                                                   "max_tokens": 1}).json()
    assert completion["usage"]["prompt_tokens"] == answer["count"]
    bare = api.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert bare["tokens"] == tokenizer.encode(text)
    assert api.post("/detokenize", json={"tokens": bare["tokens"]}).json() == {"prompt": text}


def test_messages_tokenize_through_the_chat_template_as_a_chat_completion_sees_them(api,
                                                                                   tokenizer):
    messages = [{"role": "user", "content": "Ceritakan dongeng."}]
    answer = api.post("/tokenize", json={"messages": messages}).json()
    rendered = tokenizer.render([Message("user", "Ceritakan dongeng.")], SPEC.system_prompt)
    assert answer["tokens"] == tokenizer.encode(rendered)
    chat = api.post("/v1/chat/completions", json={"model": DEMO_MODEL, "messages": messages,
                                                  "max_tokens": 1}).json()
    assert chat["usage"]["prompt_tokens"] == answer["count"]


@pytest.mark.parametrize("path,body,status,code", [
    ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, 400,
     "invalid_request_error"),
    ("/tokenize", {}, 400, "invalid_request_error"),
    ("/tokenize", {"model": "nope", "prompt": "x"}, 404, "model_not_found"),
    ("/detokenize", {"tokens": [1, 10**9]}, 400, "invalid_token_ids"),
    ("/detokenize", {"tokens": [-1]}, 400, "invalid_request_error"),
    ("/detokenize", {"tokens": "1 2"}, 400, "invalid_request_error"),
])
def test_bad_tokenize_requests_get_the_error_envelope(api, path, body, status, code):
    response = api.post(path, json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
