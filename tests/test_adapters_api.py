"""Several LoRA adapters over one base through the real stack: the session's one worker serves
the demo base and its two persona adapters, the official client asks for each, and adapters are
added and removed at run time (api/adapters.py)."""
from __future__ import annotations

import openai
import pytest
import redis

from conftest import DEMO_BASE, DEMO_MODEL, MODELS_FILE, all_at_once
from metrics_helpers import scrape, value
from model_store.registry import load_registry
from tasks.jobs.workers import WorkerRegistry

REGISTRY = load_registry(MODELS_FILE)
KOPI = "dawet-kopi"
MODELS = (DEMO_BASE, DEMO_MODEL, KOPI)
CHAT = [{"role": "user", "content": "Hello, what should I cook today?"}]


@pytest.fixture()
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.api_url + "/v1", api_key="x", max_retries=0)


def _reply(client: openai.OpenAI, model: str) -> str:
    return client.chat.completions.create(model=model, messages=CHAT, max_tokens=24,
                                          temperature=0).choices[0].message.content


def test_one_worker_serves_the_base_and_each_adapter_its_own_reply(client, stack,
                                                                 redis_client):
    alone = {model: _reply(client, model) for model in MODELS}
    assert len(set(alone.values())) == 3  # the adapters differ from each other and the base
    assert alone[KOPI].startswith("Kopi here!")  # the barista persona's opening
    together = all_at_once(lambda model: _reply(client, model), list(MODELS) * 3)
    assert together == [alone[model] for model in MODELS] * 3
    [worker] = WorkerRegistry(redis.Redis.from_url(stack.settings.redis_url), 1.0).live(DEMO_BASE)
    assert worker["model_loads"] == 1  # one copy of the base
    [port] = stack.worker_metrics_ports
    samples = scrape(f"http://127.0.0.1:{port}/metrics")
    assert value(samples, "dawet_lora_adapters_loaded", model=DEMO_BASE) == 2


def test_an_adapter_added_at_run_time_is_served_then_removed(client, api):
    kopi = REGISTRY.get(KOPI)
    added = api.post("/v1/load_lora_adapter", json={"lora_name": "kopi-again",
                                                    "lora_path": kopi.lora})
    assert added.status_code == 200, added.text
    assert added.json() == {"object": "lora_adapter", "name": "kopi-again", "path": kopi.lora,
                            "base_model": DEMO_BASE}  # the default model's base
    try:
        assert client.models.retrieve("kopi-again").model_extra["parent"] == DEMO_BASE
        assert _reply(client, "kopi-again") == _reply(client, KOPI)  # the same weights
        again = api.post("/v1/load_lora_adapter", json={"lora_name": "kopi-again",
                                                        "lora_path": kopi.lora})
        assert (again.status_code, again.json()["error"]["code"]) == (400, "adapter_exists")
    finally:
        removed = api.post("/v1/unload_lora_adapter", json={"lora_name": "kopi-again"})
    assert removed.status_code == 200 and removed.json()["deleted"] is True
    with pytest.raises(openai.NotFoundError) as caught:
        _reply(client, "kopi-again")
    assert caught.value.code == "model_not_found"
    gone = api.post("/v1/unload_lora_adapter", json={"lora_name": "kopi-again"})
    assert (gone.status_code, gone.json()["error"]["code"]) == (404, "adapter_not_found")


@pytest.mark.parametrize("body, status, param", [
    ({"lora_name": "x", "lora_path": "/nowhere"}, 400, "lora_path"),
    ({"lora_name": KOPI, "lora_path": "{kopi}"}, 400, "lora_name"),  # a registry model's name
    ({"lora_name": "bad name!", "lora_path": "{kopi}"}, 400, "lora_name"),
    ({"lora_name": "x", "lora_path": "{kopi}", "base_model": "nope"}, 404, "base_model"),
    ({"lora_name": "x", "lora_path": "{kopi}", "base_model": "dawet-bench-4m", "extra": 1},
     400, "extra"),
])
def test_a_bad_adapter_request_is_refused_and_changes_nothing(api, body, status, param):
    body = {k: v.format(kopi=REGISTRY.get(KOPI).lora) if isinstance(v, str) else v
            for k, v in body.items()}
    refused = api.post("/v1/load_lora_adapter", json=body)
    assert refused.status_code == status, refused.text
    assert refused.json()["error"]["param"] == param
    assert "x" not in {model["id"] for model in api.get("/v1/models").json()["data"]}
