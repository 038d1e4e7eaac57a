"""Many LoRA adapters over one base in our batching engine (tasks/engine/batching/lora.py), on
the demo base and its two persona adapters (CPU, float32)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import MODELS_FILE, all_at_once
from model_store.adapters import AdapterUnavailable, read_adapter_config
from model_store.loader import LoadedModel, load_model
from model_store.registry import AdapterEntry, ModelSpec, Registry, load_registry
from model_store.tokenizer import Message
from tasks.engine.batching.engine import BatchingEngine
from tasks.engine.interface import iterate
from tasks.jobs.contract import LoraAdapter, SamplingParams

BASE, ADAPTERS = "dawet-tiny", ("dawet-demo", "dawet-kopi")
PROMPTS = ("Hello, what should I cook today?", "Halo, apa kabar?", "What is two plus three?")


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_registry(MODELS_FILE)


@pytest.fixture(scope="module")
def base(registry) -> LoadedModel:
    return load_model(registry.get(BASE))


def _lora(registry: Registry, name: str | None) -> LoraAdapter | None:
    if name is None:
        return None
    spec = registry.get(name)
    return LoraAdapter(name=spec.name, path=spec.lora, base=spec.served_by)


def _params(lora: LoraAdapter | None, tokens: int = 24) -> SamplingParams:
    return SamplingParams(max_new_tokens=tokens, min_new_tokens=tokens, temperature=0.0,
                          top_p=1.0, lora=lora)


def _prompt(loaded: LoadedModel, text: str) -> list[int]:
    return loaded.tokenizer.encode(loaded.tokenizer.render([Message("user", text)]))


def _reply(engine, prompt: list[int], params: SamplingParams) -> list[int]:
    return [step.token_id for step in iterate(engine, prompt, params)
            if step.token_id is not None]


def _all_at_once(engine, requests: list[tuple[list[int], SamplingParams]]) -> list[list[int]]:
    """Run the requests at the same time (they share decode steps), in order of their index."""
    return all_at_once(lambda request: _reply(engine, *request), requests)


@pytest.fixture()
def engine(base):
    built = BatchingEngine(base, max_batch_size=16, kv_cache_tokens=16_384,
                           prefix_cache_tokens=4096)
    yield built
    built.close()


def test_a_mixed_batch_gives_each_request_its_adapters_greedy_reply_alone(registry, base,
                                                                         engine):
    names = [None, *ADAPTERS]
    requests = [(_prompt(base, text), _params(_lora(registry, name)))
                for text in PROMPTS for name in names]
    alone = [_reply(engine, *request) for request in requests]
    assert _all_at_once(engine, requests) == alone
    assert engine.stats().adapters_loaded == 2
    by_model = {name: [alone[i] for i in range(len(requests)) if names[i % len(names)] == name]
                for name in names}
    assert by_model[None] != by_model["dawet-demo"] != by_model["dawet-kopi"] != by_model[None]


def test_an_adapter_per_request_replies_as_peft_does_with_the_adapter_merged(registry, base,
                                                                            engine):
    """The reference: transformers and peft, the adapter merged into a second copy of the base."""
    from tasks.engine.sequential import SequentialEngine

    for name in ADAPTERS:
        merged = SequentialEngine(load_model(registry.get(name)))  # loaded alone: merged
        prompt = _prompt(base, PROMPTS[0])
        assert _reply(engine, prompt, _params(_lora(registry, name))) == \
            _reply(merged, prompt, _params(None))


def test_the_least_recently_used_adapter_goes_beyond_the_limit_but_never_a_running_one(
        registry, base):
    engine = BatchingEngine(base, max_batch_size=8, kv_cache_tokens=8192, max_loaded_adapters=1)
    try:
        prompt = _prompt(base, PROMPTS[0])
        demo, kopi = (_params(_lora(registry, name)) for name in ADAPTERS)
        first = _reply(engine, prompt, demo)
        _reply(engine, prompt, kopi)
        assert engine.stats().adapters_loaded == 1  # dawet-demo went
        # both running at once: neither is evicted under the other, and each is its own
        together = _all_at_once(engine, [(prompt, demo), (prompt, kopi)] * 2)
        assert together[0] == together[2] == first != together[1]
        assert engine.stats().adapters_loaded <= 2
        _reply(engine, prompt, demo)
        assert engine.stats().adapters_loaded == 1
    finally:
        engine.close()


def test_the_prefix_cache_never_hands_one_adapters_keys_to_another(registry, base, engine):
    prompt = _prompt(base, "Tell me about the weather in Jakarta this week, please. " * 4)
    demo = _params(_lora(registry, "dawet-demo"))
    fresh = BatchingEngine(base, max_batch_size=4, kv_cache_tokens=8192)  # no prefix cache
    try:
        expected = _reply(fresh, prompt, demo)
    finally:
        fresh.close()
    _reply(engine, prompt, _params(None))  # the base's KV of the prompt is now kept
    hits = engine.stats().prefix_cache.hit_tokens
    assert _reply(engine, prompt, demo) == expected
    assert engine.stats().prefix_cache.hit_tokens == hits  # nothing of the base's was used
    assert _reply(engine, prompt, demo) == expected  # ... but its own is
    assert engine.stats().prefix_cache.hit_tokens > hits


def test_an_adapter_that_cannot_load_fails_its_request_only(registry, base, engine, tmp_path):
    bad = LoraAdapter(name="missing", path=str(tmp_path / "nowhere"), base=BASE)
    prompt = _prompt(base, PROMPTS[1])
    good = _params(_lora(registry, "dawet-kopi"))
    expected = _reply(engine, prompt, good)
    with pytest.raises(AdapterUnavailable, match="adapter_config.json"):
        _reply(engine, prompt, _params(bad))
    assert _reply(engine, prompt, good) == expected


def _adapter_copy(registry: Registry, tmp_path: Path, **config) -> Path:
    source = Path(registry.get("dawet-demo").lora)
    target = tmp_path / "adapter"
    target.mkdir()
    for file in source.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    raw = json.loads((target / "adapter_config.json").read_text())
    (target / "adapter_config.json").write_text(json.dumps({**raw, **config}))
    return target


@pytest.mark.parametrize("config, problem", [
    ({"use_dora": True}, "use_dora"),
    ({"target_modules": ["q_proj", "lm_head"]}, "targets"),
    ({"peft_type": "IA3"}, "only LoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
])
def test_what_an_adapter_per_request_cannot_be_is_named(registry, tmp_path, config, problem):
    with pytest.raises(AdapterUnavailable, match=problem):
        read_adapter_config(_adapter_copy(registry, tmp_path, **config))


def test_alpha_and_rank_set_each_update_scale(registry, tmp_path):
    config = read_adapter_config(_adapter_copy(
        registry, tmp_path, alpha_pattern={"v_proj": 4}, use_rslora=True))
    assert config.scaling("model.layers.0.self_attn.q_proj", 8) == 16 / 8 ** 0.5
    assert config.scaling("model.layers.0.self_attn.v_proj", 8) == 4 / 8 ** 0.5


def test_the_registry_serves_each_adapter_under_its_name_from_its_base(registry):
    demo = registry.get("dawet-demo")
    assert demo.served_by == BASE and demo.queue == registry.get(BASE).queue
    assert demo.system_prompt and demo.defaults.min_new_tokens == 64
    assert registry.get("dawet-kopi").system_prompt is None
    assert registry.serving("dawet-kopi").name == BASE
    assert [spec.name for spec in registry.entries] == [BASE, "dawet-bench-4m", "dawet-tiny-vllm"]


def test_a_registry_refuses_names_that_collide_and_adapters_over_a_merged_one():
    entry = AdapterEntry(name="twin", path="/adapters/a")
    with pytest.raises(ValueError, match="share a name"):
        Registry([ModelSpec(name="twin", path="/base"),
                  ModelSpec(name="base", path="/base", adapters=[entry])])
    with pytest.raises(ValueError, match="takes one of the two"):
        ModelSpec(name="merged", path="/base", adapter="/adapters/b", adapters=[entry])
