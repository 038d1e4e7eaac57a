"""Prefix caching (tasks/engine/batching/prefix_cache.py): its bookkeeping, and on the real demo
model, that a prompt whose start is cached yields exactly the greedy reply it yields without."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from conftest import DEMO_MODEL, MODELS_FILE
from model_store.loader import LoadedModel, load_model
from model_store.registry import load_registry
from tasks.engine.batching.engine import BatchingEngine
from tasks.engine.batching.model_runner import LlamaRunner
from tasks.engine.batching.prefix_cache import BLOCK, PrefixCache
from tasks.engine.interface import iterate
from tasks.jobs.contract import SamplingParams

GREEDY = SamplingParams(max_new_tokens=24, min_new_tokens=24, temperature=0.0, top_p=1.0)


def _kv(tokens: int, layers: int = 2) -> list[torch.Tensor]:
    """Keys (or values) whose every entry is its token's position, per layer."""
    column = torch.arange(tokens, dtype=torch.float32).view(1, 1, tokens, 1)
    return [column.expand(1, 2, tokens, 4).clone() for _ in range(layers)]


def test_a_lookup_takes_the_longest_kept_block_prefix_and_leaves_a_token_to_compute():
    cache = PrefixCache(capacity_tokens=1000)
    kept = list(range(100, 150))  # 50 tokens: 3 full blocks kept
    cache.keep(kept, _kv(50), _kv(50), copy=True)
    assert cache.tokens == 3 * BLOCK
    hit = cache.lookup(kept[:40] + [7, 8, 9])  # shares 40 tokens: 2 blocks
    assert hit.tokens == 2 * BLOCK and hit.keys[0].shape == (1, 2, 2 * BLOCK, 4)
    assert torch.equal(hit.keys[1][0, 0, :, 0], torch.arange(2 * BLOCK, dtype=torch.float32))
    assert cache.lookup(kept[:48]).tokens == 2 * BLOCK  # the whole prompt would leave nothing
    assert cache.lookup(kept[:49]).tokens == 3 * BLOCK
    assert cache.lookup([1] + kept) is None  # a different first block: nothing shared
    assert cache.queried_tokens == 43 + 48 + 49 + 51 and cache.hit_tokens == 7 * BLOCK


def test_the_least_recently_used_sequence_goes_first_when_the_budget_is_full():
    cache = PrefixCache(capacity_tokens=4 * BLOCK)
    first, second, third = ([n] * (2 * BLOCK) for n in (1, 2, 3))
    cache.keep(first, _kv(2 * BLOCK), _kv(2 * BLOCK), copy=True)
    cache.keep(second, _kv(2 * BLOCK), _kv(2 * BLOCK), copy=True)
    assert cache.lookup(first + [0]) is not None  # first is now the most recently used
    cache.keep(third, _kv(2 * BLOCK), _kv(2 * BLOCK), copy=True)
    assert cache.tokens == 4 * BLOCK
    assert cache.lookup(second + [0]) is None
    assert cache.lookup(first + [0]) is not None and cache.lookup(third + [0]) is not None
    cache.keep(first, _kv(2 * BLOCK), _kv(2 * BLOCK), copy=True)  # kept already: no change
    assert cache.tokens == 4 * BLOCK


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return load_model(load_registry(MODELS_FILE).get(DEMO_MODEL))


def _engine(loaded: LoadedModel, prefix_cache_tokens: int) -> BatchingEngine:
    return BatchingEngine(loaded, max_batch_size=8, kv_cache_tokens=65_536,
                          prefix_cache_tokens=prefix_cache_tokens)


def _reply(engine: BatchingEngine, prompt: list[int]) -> list[int]:
    return [step.token_id for step in iterate(engine, prompt, GREEDY)]


def _history(loaded: LoadedModel) -> list[int]:
    return loaded.tokenizer.encode("Saya suka makan nasi goreng di pasar pagi. " * 6)


def test_a_conversations_next_turn_reuses_its_history_and_replies_as_without(loaded):
    history = _history(loaded)
    cached, plain = _engine(loaded, 4096), _engine(loaded, 0)
    try:
        reply = _reply(cached, history)
        turn = history + reply + loaded.tokenizer.encode(" Apa kabar?")
        stats = cached.stats().prefix_cache
        assert _reply(cached, turn) == _reply(plain, turn)
        after = cached.stats().prefix_cache
        # the history and the reply (as the row left the batch) were found, to a block
        assert after.hit_tokens - stats.hit_tokens == (len(history) + len(reply) - 1) // BLOCK * BLOCK
        assert plain.stats().prefix_cache is None
    finally:
        cached.close()
        plain.close()


def test_prompts_sharing_a_start_join_a_running_batch_with_it_cached(loaded):
    """Requests with a shared system prompt arrive while others decode: they join the batch in
    packed steps, each from the cached start, and each replies as it would alone."""
    shared = _history(loaded)
    prompts = [shared + loaded.tokenizer.encode(f" Pertanyaan {i}: apa?") for i in range(5)]
    plain = _engine(loaded, 0)
    try:
        alone = [_reply(plain, prompt) for prompt in prompts]
    finally:
        plain.close()
    cached = _engine(loaded, 4096)
    try:
        assert _reply(cached, prompts[0]) == alone[0]  # keeps the shared start
        replies: list = [None] * len(prompts)
        started = threading.Barrier(len(prompts) - 1)

        def run(i: int) -> None:
            started.wait()
            replies[i] = _reply(cached, prompts[i])
        threads = [threading.Thread(target=run, args=(i,)) for i in range(1, len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert replies[1:] == alone[1:]
        hits = cached.stats().prefix_cache.hit_tokens
        assert hits >= (len(prompts) - 1) * (len(shared) // BLOCK * BLOCK)
    finally:
        cached.close()


def test_a_reply_that_ended_with_eos_is_kept_aligned_with_its_tokens(loaded):
    """A JSON reply ends when its grammar allows only EOS, so its last token's keys are cached
    too: the kept keys must be exactly its tokens', as a fresh prefill computes them."""
    history = _history(loaded)
    history = history[:len(history) // BLOCK * BLOCK - 1]  # its reply's first token ends a block
    schema = '{"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}'
    structured = GREEDY.model_copy(update={"json_schema": schema, "min_new_tokens": 0,
                                           "max_new_tokens": 40})
    cached = _engine(loaded, 4096)
    try:
        steps = list(iterate(cached, history, structured))
        assert steps[-1].finish.value == "stop" and steps[-1].token_id is None  # by EOS
        sequence = history + [step.token_id for step in steps if step.token_id is not None]
        deadline = time.monotonic() + 10
        while cached.running and time.monotonic() < deadline:  # the loop keeps it as it evicts
            time.sleep(0.01)
        hit = cached._runner.prefixes.lookup(sequence + [0])
    finally:
        cached.close()
    assert hit.tokens == len(sequence) // BLOCK * BLOCK > len(history)  # the row's, kept
    with torch.inference_mode():
        runner = LlamaRunner(loaded)
        runner.join_prefilled(runner.prefill([sequence]), [0])
        fresh = runner.pool.read(runner.table.slots(0))[0]
    for kept, computed in zip(hit.keys, fresh):
        assert torch.allclose(kept, computed[:, :, :hit.tokens], atol=1e-4)
