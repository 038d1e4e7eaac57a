"""Prefix caching (tasks/engine/batching/prefix_cache.py): its bookkeeping, and on the real demo
model, that a prompt whose start is cached yields exactly the greedy reply it yields without."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from conftest import DEMO_MODEL, MODELS_FILE, wait_until
from model_store.loader import LoadedModel, load_model
from model_store.registry import load_registry
from tasks.engine.batching.engine import BatchingEngine
from tasks.engine.batching.model_runner import LlamaRunner
from tasks.engine.batching.kv_pool import KVPool
from tasks.engine.batching.prefix_cache import BLOCK, PrefixCache
from tasks.engine.interface import iterate
from tasks.jobs.contract import SamplingParams

GREEDY = SamplingParams(max_new_tokens=24, min_new_tokens=24, temperature=0.0, top_p=1.0)


def _pool(capacity: int = 1000) -> KVPool:
    return KVPool(layers=1, kv_heads=1, head_dim=2, capacity=capacity, dtype=torch.float32,
                  device=torch.device("cpu"))


def test_a_lookup_takes_the_longest_kept_prefix_to_the_token_and_leaves_one_to_compute():
    pool = _pool()
    cache = PrefixCache(capacity_tokens=1000, pool=pool)
    kept, slots = list(range(100, 150)), pool.allocate(50)  # 50 tokens: 3 full blocks and 2
    cache.keep(kept, slots)
    pool.release(slots)
    assert cache.tokens == pool.cached == pool.used + 50 == 50  # no copy
    hit = cache.lookup(kept[:40] + [7, 8, 9])  # shares 40 tokens: 2 blocks and 8 more
    assert hit.tokens == 40 and hit.slots == slots[:40]
    assert cache.lookup(kept[:48]).tokens == 47  # the whole prompt would leave nothing
    assert cache.lookup(kept + [7]).tokens == 50  # all of it, the last block's tail too
    assert cache.lookup(kept[:20]).tokens == 19  # past the first block, within the second
    assert cache.lookup(kept[:10] + [7] * 10) is None  # less than a block shared: no hit
    assert cache.lookup([1] + kept) is None  # a different first block: nothing shared
    assert cache.queried_tokens == 43 + 48 + 51 + 20 + 20 + 51
    assert cache.hit_tokens == 40 + 47 + 50 + 19


def test_a_sequence_that_goes_on_where_a_kept_one_ends_is_kept_beside_it():
    """Two sequences sharing their full blocks but not their last tokens are both kept (the
    newer one answers lookups); one that a kept sequence starts with adds nothing."""
    pool = _pool()
    cache = PrefixCache(capacity_tokens=1000, pool=pool)
    shared = list(range(100, 132))
    first, second = shared + [1, 2], shared + [1, 3, 4]
    cache.keep(first, pool.allocate(len(first)))
    cache.keep(second, pool.allocate(len(second)))
    assert cache.tokens == len(first) + len(second)
    assert cache.lookup(second + [0]).tokens == len(second)
    cache.keep(second[:-1], pool.allocate(len(second) - 1))  # held by `second` already
    assert cache.tokens == len(first) + len(second)


def test_the_least_recently_used_sequence_goes_first_when_the_budget_is_full():
    pool = _pool()
    cache = PrefixCache(capacity_tokens=4 * BLOCK, pool=pool)
    first, second, third = ([n] * (2 * BLOCK) for n in (1, 2, 3))
    for tokens in (first, second):
        cache.keep(tokens, pool.allocate(2 * BLOCK))
    assert cache.lookup(first + [0]) is not None  # first is now the most recently used
    cache.keep(third, pool.allocate(2 * BLOCK))
    assert cache.tokens == 4 * BLOCK
    assert cache.lookup(second + [0]) is None
    assert cache.lookup(first + [0]) is not None and cache.lookup(third + [0]) is not None
    cache.keep(first, pool.allocate(2 * BLOCK))  # kept already: no change
    assert cache.tokens == 4 * BLOCK


def test_kept_sequences_give_their_slots_up_when_running_requests_need_them():
    """Memory pressure: the pool's free slots ran out, so the least recently used kept
    sequences go, but never a slot a sequence still holds. (Each allocate stands for the
    slots a row computed.)"""
    pool = _pool(capacity=6 * BLOCK)
    cache = PrefixCache(capacity_tokens=6 * BLOCK, pool=pool)
    old, shared = pool.allocate(2 * BLOCK), pool.allocate(2 * BLOCK)
    cache.keep([1] * 2 * BLOCK, old)
    cache.keep([2] * 2 * BLOCK, shared)
    pool.release(old)  # the row that computed `old` left; `shared`'s row runs on
    assert pool.free == 2 * BLOCK and pool.cached == 4 * BLOCK
    taken = pool.allocate(3 * BLOCK)  # more than is free: `old` is evicted for it
    assert cache.lookup([1] * 2 * BLOCK + [0]) is None and set(old) <= set(taken)
    with pytest.raises(RuntimeError, match="free slots"):
        pool.allocate(2 * BLOCK)  # evicting `shared` frees nothing: its row holds it
    assert cache.lookup([2] * 2 * BLOCK + [0]) is None  # evicted all the same
    assert pool.used == 5 * BLOCK and pool.cached == 0


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
        # the history and the reply (as the row left the batch, all but its last token's KV)
        assert after.hit_tokens - stats.hit_tokens == len(history) + len(reply) - 1
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
        assert hits >= (len(prompts) - 1) * len(shared)
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
    assert hit.tokens == len(sequence) > len(history)  # the row's, kept
    with torch.inference_mode():
        runner = LlamaRunner(loaded)
        runner.join_prefilled(runner.prefill([sequence]), [0])
        fresh = runner.pool.read(runner.table.slots(0))[0]
    for kept, computed in zip(cached._runner.pool.read(hit.slots)[0], fresh):
        assert torch.allclose(kept, computed[:, :, :hit.tokens], atol=1e-4)


def test_a_full_pool_evicts_cached_prefixes_for_new_requests_whose_replies_stay_exact(loaded):
    history = _history(loaded)
    plain = _engine(loaded, 0)
    prompts = [loaded.tokenizer.encode(f"Cerita {i}: nasi, teh dan pasar. " * 3) for i in range(3)]
    try:
        alone = [_reply(plain, prompt) for prompt in prompts]
    finally:
        plain.close()
    budget = 3 * (len(prompts[0]) + GREEDY.max_new_tokens) + 8
    small = BatchingEngine(loaded, max_batch_size=4, kv_cache_tokens=budget,
                           prefix_cache_tokens=budget)
    try:
        _reply(small, history)  # its prompt and reply are kept: most of the pool
        assert small.stats().prefix_cache.tokens >= len(history) // BLOCK * BLOCK
        replies: list = [None] * len(prompts)
        threads = [threading.Thread(target=lambda i=i: replies.__setitem__(
            i, _reply(small, prompts[i]))) for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert replies == alone  # they needed the cached slots, and got them
        # the cache's own budget is the pool's: only the pool's pressure evicted the history
        assert small._runner.prefixes.lookup(history + [5]) is None
        wait_until(lambda: not small._runner.pool.used, 10, "every slot given back")
    finally:
        small.close()
