"""The one-at-a-time engine and per-request sampling on the real demo model (CPU)."""
from __future__ import annotations

import pytest

from conftest import MODELS_FILE
from model_store.registry import load_registry
from model_store.tokenizer import Message
from tasks.jobs.contract import FinishReason, SamplingParams

GREEDY = dict(temperature=0.0, top_p=1.0, repetition_penalty=1.1)


@pytest.fixture(scope="module")
def models():
    from model_store.loader import load_model

    registry = load_registry(MODELS_FILE)
    return {name: load_model(registry.get(name)) for name in ("dawet-demo", "dawet-tiny")}


def _prompt(loaded, text="Hello, what should I cook today?") -> list[int]:
    tokenizer = loaded.tokenizer
    return tokenizer.encode(tokenizer.render([Message("user", text)]))


def _generate(loaded, **params) -> tuple[list[int], FinishReason]:
    from tasks.engine.interface import iterate
    from tasks.engine.sequential import SequentialEngine

    steps = list(iterate(SequentialEngine(loaded), _prompt(loaded), SamplingParams(**params)))
    return [s.token_id for s in steps if s.token_id is not None], steps[-1].finish


def test_the_lora_adapter_changes_the_output(models):
    with_adapter = _generate(models["dawet-demo"], max_new_tokens=24, **GREEDY)[0]
    base_only = _generate(models["dawet-tiny"], max_new_tokens=24, **GREEDY)[0]
    assert with_adapter != base_only


def test_greedy_is_deterministic_and_stops_at_the_length(models):
    first, finish = _generate(models["dawet-tiny"], max_new_tokens=6, min_new_tokens=6, **GREEDY)
    assert len(first) == 6 and finish is FinishReason.LENGTH
    assert _generate(models["dawet-tiny"], max_new_tokens=6, min_new_tokens=6, **GREEDY)[0] == first


def test_min_new_tokens_holds_off_the_end_token(models):
    free, finish = _generate(models["dawet-tiny"], max_new_tokens=200, **GREEDY)
    assert finish is FinishReason.STOP and len(free) < 200
    held, _ = _generate(models["dawet-tiny"], max_new_tokens=200, min_new_tokens=len(free) + 5,
                        **GREEDY)
    assert len(held) >= len(free) + 5


def test_a_seed_makes_sampling_repeatable(models):
    sampled = dict(max_new_tokens=16, min_new_tokens=16, temperature=1.0, top_p=0.9, top_k=50)
    runs = [_generate(models["dawet-tiny"], seed=seed, **sampled)[0] for seed in (7, 7, 8)]
    assert runs[0] == runs[1] != runs[2]
