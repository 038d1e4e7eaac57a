"""The KV pool of our Llama forward (tasks/engine/batching/kv_pool.py): its slots' bookkeeping,
and on the real demo model, that its memory is its budget, a request is charged what it
reserves, the usage gauge counts real slots, and every path gives its slots back."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import DEMO_MODEL, MODELS_FILE, wait_until
from model_store.loader import LoadedModel, load_model
from model_store.registry import load_registry
from tasks.engine.batching.engine import BatchingEngine
from tasks.engine.batching.kv_pool import PAD, KVPool, SlotTable
from tasks.engine.interface import iterate
from tasks.jobs.contract import SamplingParams


def _greedy(tokens: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=tokens, min_new_tokens=tokens, temperature=0.0,
                          top_p=1.0)


def test_slots_are_taken_and_given_back_and_never_overdrawn():
    pool = KVPool(layers=2, kv_heads=1, head_dim=4, capacity=10, dtype=torch.float32,
                  device=torch.device("cpu"))
    first, second = pool.allocate(4), pool.allocate(6)
    assert pool.used == 10 and PAD not in first + second and len(set(first + second)) == 10
    with pytest.raises(RuntimeError, match="0 free slots, 1 asked"):
        pool.allocate(1)
    pool.release(first)
    assert pool.used == 6 and sorted(pool.allocate(4)) == sorted(first)
    pool.release_all()
    assert pool.used == 0
    assert all(torch.equal(t[PAD], torch.zeros(1, 4)) for t in (*pool.keys, *pool.values))


def test_a_row_reads_back_what_its_slots_were_written_with_padding_zeros():
    pool = KVPool(layers=1, kv_heads=2, head_dim=3, capacity=8, dtype=torch.float32,
                  device=torch.device("cpu"))
    table = SlotTable(torch.device("cpu"))
    long, short = pool.allocate(3), pool.allocate(1)
    for slots in (long, short):
        index = torch.tensor(slots)
        written = index.view(-1, 1, 1).float().expand(-1, 2, 3)
        pool.write(0, index, written, -written)
        table.add(slots)
    columns, bias = table.open_column(pool.allocate(2))  # rows of 3 and 1 tokens, one more each
    keys, values = pool.gather(0, columns)
    assert keys.shape == (2, 2, 4, 3) and bias[:, 0, 0].tolist() == [[0.0] * 4, [0.0, 0.0] + [
        float("-inf")] * 2]
    assert keys[0, 0, :3, 0].tolist() == [float(s) for s in long]
    assert keys[1, 0, 0, 0] == short[0] and values[1, 0, 0, 0] == -short[0]
    assert keys[1, :, 2:].abs().sum() == 0  # padding reads slot PAD's zeros
    table.advance()
    order, dropped = table.keep([1])  # the long row leaves; the short one takes its place
    assert order == [1] and len(dropped) == 1 and dropped[0][:3] == long
    assert table.lengths == [2] and table.slots(0)[0] == short[0]


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return load_model(load_registry(MODELS_FILE).get(DEMO_MODEL))


def _per_token_bytes(engine: BatchingEngine) -> int:
    pool = engine._runner.pool
    return sum(t[0].numel() * t.element_size() for t in (*pool.keys, *pool.values))


def test_the_pool_is_its_budget_and_stays_so_while_requests_run(loaded):
    budget = 1000
    engine = BatchingEngine(loaded, max_batch_size=8, kv_cache_tokens=budget)
    try:
        pool = engine._runner.pool
        tensors = [(t.data_ptr(), t.shape) for t in (*pool.keys, *pool.values)]
        total = sum(t.numel() * t.element_size() for t in (*pool.keys, *pool.values))
        assert total == (budget + 1) * _per_token_bytes(engine)  # one slot of padding
        prompt = loaded.tokenizer.encode("Saya suka makan nasi goreng " * 8)
        with ThreadPoolExecutor(6) as threads:
            list(threads.map(lambda _: list(iterate(engine, prompt, _greedy(60))), range(6)))
        assert [(t.data_ptr(), t.shape) for t in (*pool.keys, *pool.values)] == tensors
    finally:
        engine.close()


def test_a_request_is_charged_its_reservation_not_the_longest_rows(loaded):
    """One long request beside short ones: a padded window would charge every row the long
    one's 400 tokens (4 x 400 > 600) and run them one at a time; the pool runs them together."""
    short = loaded.tokenizer.encode("Hello there")
    long = loaded.tokenizer.encode("Saya suka makan nasi " * 20)
    engine = BatchingEngine(loaded, max_batch_size=8,
                            kv_cache_tokens=len(long) + 300 + 3 * (len(short) + 40))
    try:
        jobs = [(long, _greedy(300))] + [(short, _greedy(40))] * 3
        with ThreadPoolExecutor(4) as threads:
            replies = list(threads.map(lambda job: list(iterate(engine, *job)), jobs))
        assert [len(reply) for reply in replies] == [300, 40, 40, 40]
        assert max(size for _, size in engine.batch_sizes) == 4
    finally:
        engine.close()


def test_the_usage_gauge_counts_the_slots_rows_hold(loaded):
    prompt = loaded.tokenizer.encode("Hello there")
    engine = BatchingEngine(loaded, max_batch_size=4, kv_cache_tokens=1000)
    cancel, seen = threading.Event(), []

    def sink(step) -> None:
        seen.append(step)
        while len(seen) == 5 and not cancel.is_set():  # hold the loop after the 5th token
            time.sleep(0.001)
    try:
        assert engine.stats().kv_cache_usage == 0.0
        done = threading.Event()
        engine.submit(prompt, _greedy(50), cancel, sink, lambda error: done.set())
        while len(seen) < 5:
            time.sleep(0.001)
        # the prompt and the 4 tokens fed back hold slots; the 5th has no keys yet
        assert engine.stats().kv_cache_usage == (len(prompt) + 4) / 1000
        cancel.set()
        assert done.wait(10)
        wait_until(lambda: engine.stats().kv_cache_usage == 0.0, 10, "the gauge at 0")
    finally:
        engine.close()


def test_every_way_a_request_ends_gives_its_slots_back(loaded):
    """Replies that run out, end at their first token, are cancelled mid-prefill or mid-reply,
    chunked prompts, prefix hits: when all have ended, no slot is held."""
    engine = BatchingEngine(loaded, max_batch_size=4, kv_cache_tokens=20_000,
                            prefix_cache_tokens=4096)
    words = "Saya suka makan nasi goreng dan minum teh manis "
    prompts = [loaded.tokenizer.encode(words * n) for n in (1, 2, 40, 90)]
    try:
        def run(i: int) -> None:
            cancel = threading.Event()
            stream = iterate(engine, prompts[i % 4], _greedy(1 if i % 5 == 0 else 30), cancel)
            for n, _ in enumerate(stream):
                if i % 3 == 0 and n == 2:
                    cancel.set()
            if i % 7 == 0:
                cancel.set()
        with ThreadPoolExecutor(8) as threads:
            list(threads.map(run, range(24)))
        assert engine._runner.prefixes.hit_tokens > 0 and engine.step_count > 0
        wait_until(lambda: not engine._runner.pool.used, 10, "every slot given back")
    finally:
        engine.close()


def test_a_prompt_cancelled_between_its_parts_gives_its_slots_back(loaded):
    """A long prompt computes a part per step and holds its slots meanwhile; cancelled before
    its last part, it frees them, while a row beside it runs on."""
    engine = BatchingEngine(loaded, max_batch_size=4, kv_cache_tokens=20_000)
    row = loaded.tokenizer.encode("Hello there")
    long = loaded.tokenizer.encode("Saya suka makan nasi goreng dan minum teh manis " * 150)
    cancel, ended = threading.Event(), threading.Event()
    try:
        stream = iterate(engine, row, _greedy(400))
        next(stream)
        engine.submit(long, _greedy(10), cancel, lambda step: None, lambda error: ended.set())
        wait_until(lambda: any(p.start for p in engine._prefilling), 30,  # more parts to go
                   "a part of the long prompt computed", interval=0.0005)
        cancel.set()
        assert ended.wait(10)
        assert len(list(stream)) == 399  # the row ran on
        wait_until(lambda: not engine._runner.pool.used, 10, "every slot given back")
    finally:
        engine.close()


def test_a_failed_pass_gives_back_its_slots_and_its_prompts_cached_starts(loaded, monkeypatch):
    """The pass fails in the packed step, then again in the prefill apart that follows it:
    the request ends with the error, and neither its new slots nor the cached start it shared
    stay held; the engine serves on."""
    engine = BatchingEngine(loaded, max_batch_size=4, kv_cache_tokens=20_000,
                            prefix_cache_tokens=4096)
    prompt = loaded.tokenizer.encode("Saya suka makan nasi goreng dan minum teh manis " * 4)
    runner, failures = engine._runner, []
    forward = runner.forward

    def failing_twice(*args, **kwargs):
        if len(failures) < 2:
            failures.append(True)
            raise MemoryError("out of memory")
        return forward(*args, **kwargs)
    try:
        list(iterate(engine, prompt, _greedy(4)))  # its prompt and reply are cached now
        monkeypatch.setattr(runner, "forward", failing_twice)
        hits = runner.prefixes.hit_tokens
        with pytest.raises(MemoryError):
            list(iterate(engine, prompt + [5, 6, 7], _greedy(4)))
        assert len(failures) == 2 and runner.prefixes.hit_tokens > hits  # a start was shared
        assert runner.pool.used == 0
        assert len(list(iterate(engine, prompt + [5, 6, 7], _greedy(4)))) == 4
    finally:
        engine.close()
