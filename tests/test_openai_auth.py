"""API keys on every /v1 route, and 422 for messages a chat template refuses (no worker needed)."""
from __future__ import annotations

import hashlib
import shutil

import pytest
from pydantic import ValidationError

from api import create_app
from conftest import DEMO_MODEL, MODELS_FILE, ROOT
from dawet.settings import Settings

KEY = "sk-dawet-test-key"
CHAT_BODY = {"model": DEMO_MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2}
PROTECTED = [("GET", "/v1/models"), ("GET", "/v1/models/dawet-demo"),
             ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
             ("POST", "/v1/generate"), ("GET", "/v1/jobs/some-job"),
             ("DELETE", "/v1/jobs/some-job"), ("GET", "/v1/jobs/some-job/stream"),
             ("GET", "/v1/chat/models"), ("GET", "/v1/conversations/some-conversation"),
             ("DELETE", "/v1/conversations/some-conversation"), ("GET", "/v1/chat"),
             ("GET", "/v1/usage"), ("POST", "/tokenize"), ("POST", "/detokenize")]

WEBSOCKET_UPGRADE = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                     "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}


@pytest.fixture()
def keyed(stack):
    """An app that accepts KEY (and one other key), on the session stack's Redis."""
    digests = [hashlib.sha256(KEY.encode()).hexdigest(), "ab" * 32]
    app = create_app({"models_file": MODELS_FILE, "redis_url": stack.settings.redis_url,
                      "api_keys": ",".join(d.upper() for d in digests)})
    return app.test_client()


@pytest.mark.parametrize("method,path", PROTECTED)
@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", f"Basic {KEY}", "Bearer ",
                                           KEY, f"Bearer {KEY}x"])
def test_every_v1_route_needs_a_valid_key(keyed, method, path, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    if path.endswith(("/stream", "/v1/chat")):
        headers |= WEBSOCKET_UPGRADE
    response = keyed.open(path, method=method, headers=headers, json=CHAT_BODY)
    assert response.status_code == 401
    assert response.json["error"] == {"message": response.json["error"]["message"],
                                      "type": "invalid_request_error", "param": None,
                                      "code": "invalid_api_key"}


def test_a_valid_key_gets_through(keyed):
    auth = {"Authorization": f"Bearer {KEY}"}
    models = keyed.get("/v1/models", headers=auth)
    assert models.status_code == 200 and models.json["data"][0]["ready"] is True
    refused = keyed.post("/v1/chat/completions", headers=auth, json=CHAT_BODY)
    assert refused.status_code == 400 and refused.json["error"]["param"] == "n"
    assert keyed.get("/v1/jobs/no-such-job", headers=auth).status_code == 404
    assert keyed.get("/healthz").status_code == 200  # operations endpoints stay open


def test_the_chat_page_is_open_and_its_api_calls_take_the_key(keyed):
    assert keyed.get("/").status_code == 200
    auth = {"Authorization": f"Bearer {KEY}"}
    assert keyed.get("/v1/chat/models", headers=auth).status_code == 200
    assert keyed.get("/v1/conversations/nope", headers=auth).status_code == 404


def test_only_a_websocket_handshake_may_carry_the_key_as_access_token(keyed):
    handshake = keyed.get(f"/v1/jobs/no-such-job/stream?access_token={KEY}",
                          headers=WEBSOCKET_UPGRADE)
    assert handshake.status_code != 401  # past the key check (the test client cannot upgrade)
    wrong = keyed.get("/v1/jobs/no-such-job/stream?access_token=wrong", headers=WEBSOCKET_UPGRADE)
    assert wrong.status_code == 401
    plain = keyed.get(f"/v1/jobs/no-such-job?access_token={KEY}")
    assert plain.status_code == 401  # plain HTTP requests send the key in a header


def test_api_keys_must_be_sha256_digests():
    with pytest.raises(ValidationError, match="SHA-256"):
        Settings(api_keys=f"{'ab' * 32},{KEY}")
    assert not Settings(api_keys=" , ").auth_enabled()


@pytest.fixture()
def picky_app(tmp_path):
    """A registry whose model's chat template refuses a conversation that starts with the assistant."""
    model_dir = tmp_path / "picky"
    shutil.copytree(ROOT / "var/models/dawet-tiny", model_dir,
                    ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    (model_dir / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] == 'assistant' %}"
        "{{ raise_exception('the conversation must not start with the assistant') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    (tmp_path / "models.toml").write_text('[[models]]\nname = "picky"\npath = "./picky"\n')
    return create_app({"models_file": tmp_path / "models.toml"}).test_client()


@pytest.mark.parametrize("path,extra", [("/v1/chat/completions", {}),
                                        ("/v1/generate", {"max_new_tokens": 2})])
def test_messages_the_chat_template_refuses_get_422(picky_app, path, extra):
    body = {"model": "picky", "messages": [{"role": "assistant", "content": "hi"}], **extra}
    response = picky_app.post(path, json=body)
    assert response.status_code == 422
    error = response.json["error"]
    assert (error["code"], error["param"]) == ("chat_template_error", "messages")
    assert "must not start with the assistant" in error["message"]
