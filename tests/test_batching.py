"""The batching engine on the real demo model (CPU), and the runner's streaming on real Redis."""
from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import DEMO_MODEL, MODELS_FILE
from model_store.loader import LoadedModel, load_model
from model_store.registry import Backend, load_registry
from tasks.engine.batching.engine import BatchingEngine
from tasks.engine.batching.scheduler import (PACKED_PROMPT_TOKENS, PREFILL_PADDING, Request,
                                             prefill_groups, split_admitted)
from tasks.jobs.contract import FinishReason, Job, SamplingParams, TokenEvent
from tasks.engine.interface import TokenStep, iterate
from tasks.engine.sequential import SequentialEngine
from tasks.jobs.log import JobStore
from tasks.engine.batching.packed import can_pack
from tasks.worker.runner import JobRunner

BATCH = 16


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return load_model(load_registry(MODELS_FILE).get(DEMO_MODEL))


@pytest.fixture(scope="module")
def engine(loaded: LoadedModel) -> Iterator[BatchingEngine]:
    batching = BatchingEngine(loaded, max_batch_size=BATCH, kv_cache_tokens=65_536)
    yield batching
    batching.close()


def _prompts(loaded: LoadedModel) -> list[list[int]]:
    """Prompts of different lengths, so rows in a batch are left-padded differently."""
    words = ["rice", "tea", "the market", "a long way home", "Saya suka makan nasi"]
    return [loaded.tokenizer.encode(f"Story {i}: " + " ".join(words[:1 + i % 5]) * (1 + i % 3))
            for i in range(BATCH)]


def _params(i: int, greedy: bool) -> SamplingParams:
    """Per-request parameters that differ row to row."""
    return SamplingParams(max_new_tokens=24 + i, min_new_tokens=8 + (i % 3) * 8,
                          temperature=0.0 if greedy else 0.5 + (i % 4) * 0.2,
                          top_p=1.0 if i % 2 else 0.9, top_k=(i % 3) * 10,
                          repetition_penalty=1.0 + (i % 4) * 0.1, seed=1000 + i)


def _tokens(steps: Iterator[TokenStep]) -> list[int | None]:
    return [step.token_id for step in steps]


def _alone(loaded: LoadedModel, prompts: list[list[int]],
           params: list[SamplingParams]) -> list[list[int | None]]:
    """Each request's tokens from the one-at-a-time engine."""
    sequential = SequentialEngine(loaded)
    return [_tokens(iterate(sequential, p, q)) for p, q in zip(prompts, params)]


class _Gate:
    """Holds each request's submission until all of them are ready, then lets them in at once
    (a thread that starts late on a busy host must not miss the batch)."""

    def __init__(self, engine: BatchingEngine, requests: int):
        self._engine, self._barrier = engine, threading.Barrier(requests)

    def run(self, *args) -> None:
        self._barrier.wait()
        self._engine.run(*args)


def _together(engine: BatchingEngine, loaded: LoadedModel, greedy: bool) -> list[list[int | None]]:
    """Submit every request at once, before reading any, so they decode as one batch."""
    gate = _Gate(engine, BATCH)
    streams = [iterate(gate, p, _params(i, greedy)) for i, p in enumerate(_prompts(loaded))]
    with ThreadPoolExecutor(len(streams)) as pool:
        return list(pool.map(_tokens, streams))


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "seeded-sampling"])
def test_a_request_yields_the_same_tokens_alone_or_in_a_batch_of_16(engine, loaded, greedy):
    lengths = [len(p) for p in _prompts(loaded)]
    assert 1 < len(set(lengths)) < len(lengths)  # rows left-padded in prefills and in the batch
    alone = _alone(loaded, _prompts(loaded), [_params(i, greedy) for i in range(BATCH)])
    first = engine.step_count
    together = _together(engine, loaded, greedy)
    assert together == alone
    assert max(size for step, size in engine.batch_sizes if step > first) == BATCH
    assert len({len(tokens) for tokens in together}) > 1  # rows left the batch at different steps


class _Staggered:
    """Request 0 runs first; the others are submitted from its sink, a few at each of its
    steps, so they reach an engine whose batch is running (as a busy worker's requests do)."""

    def __init__(self, engine: BatchingEngine, prompts: list[list[int]],
                 params: list[SamplingParams]):
        self._engine, self._prompts, self._params = engine, prompts, params
        self.tokens: list[list[int | None]] = [[] for _ in prompts]
        self.errors: list[BaseException | None] = [None] * len(prompts)
        self._ended = [threading.Event() for _ in prompts]
        self._next = 1

    def run(self) -> list[list[int | None]]:
        self._submit(0)
        for ended in self._ended:
            assert ended.wait(60)
        return self.tokens

    def _submit(self, index: int) -> None:
        def sink(step: TokenStep) -> None:
            self.tokens[index].append(step.token_id)
            if index == 0 and len(self.tokens[0]) % 2 == 0:  # every other step: up to three
                for _ in range(min(len(self.tokens[0]) % 3 + 1, len(self._prompts) - self._next)):
                    self._next += 1
                    self._submit(self._next - 1)

        def on_end(error: BaseException | None) -> None:
            self.errors[index] = error
            self._ended[index].set()

        self._engine.submit(self._prompts[index], self._params[index], threading.Event(), sink,
                            on_end)


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "seeded-sampling"])
def test_prompts_that_join_a_running_batch_yield_the_same_tokens_as_alone(loaded, greedy):
    prompts, params = _prompts(loaded), [_params(i, greedy) for i in range(BATCH)]
    params[0] = params[0].model_copy(update={"max_new_tokens": 64, "min_new_tokens": 64})
    params[5] = params[5].model_copy(update={"max_new_tokens": 1, "min_new_tokens": 1})  # ends
    alone = _alone(loaded, prompts, params)
    assert len(alone[5]) == 1  # ... with its first token, so it never takes a row
    for pack in (True, False):
        engine = BatchingEngine(loaded, max_batch_size=BATCH, kv_cache_tokens=65_536,
                                pack_prompts=pack)
        try:
            assert _Staggered(engine, prompts, params).run() == alone
            assert (engine.packed_prompts >= BATCH // 2) if pack else engine.packed_prompts == 0
        finally:
            engine.close()


def test_a_prompt_that_fails_in_a_packed_step_fails_alone(loaded):
    """An out-of-vocabulary id fails the embedding: the step falls back to prefilling the
    joining prompts apart, so only that request fails and the running row goes on."""
    prompts, params = _prompts(loaded)[:3], [_params(i, True) for i in range(3)]
    params[0] = params[0].model_copy(update={"max_new_tokens": 40, "min_new_tokens": 40})
    alone = _alone(loaded, prompts, params)
    prompts[1] = prompts[1] + [loaded.tokenizer.vocab_size + 7]
    engine = BatchingEngine(loaded, max_batch_size=BATCH, kv_cache_tokens=65_536)
    try:
        staggered = _Staggered(engine, prompts, params)
        tokens = staggered.run()
        assert tokens[0] == alone[0] and tokens[2] == alone[2]
        assert tokens[1] == [] and isinstance(staggered.errors[1], IndexError)
        assert staggered.errors[0] is None and staggered.errors[2] is None
    finally:
        engine.close()


def test_a_failing_prompt_on_an_idle_engine_fails_alone_and_the_engine_serves_on(loaded):
    """With no row running, a step holds prompts only: the one that fails fails alone."""
    prompts, params = _prompts(loaded)[:2], [_params(i, True) for i in range(2)]
    broken = prompts[0] + [loaded.tokenizer.vocab_size + 7]
    engine = BatchingEngine(loaded, max_batch_size=BATCH, kv_cache_tokens=65_536)
    try:
        with pytest.raises(IndexError):
            _tokens(iterate(engine, broken, params[0]))
        assert _tokens(iterate(engine, prompts[1], params[1])) == \
            _alone(loaded, [prompts[1]], [params[1]])[0]
    finally:
        engine.close()


def test_only_transformers_own_sdpa_attention_is_packed(loaded):
    assert loaded.model.config._attn_implementation == "sdpa" and can_pack(loaded)
    assert not can_pack(dataclasses.replace(loaded, backend=Backend.UNSLOTH))  # its own layers


def test_the_prompts_joining_one_step_are_bounded_in_tokens():
    requests = [Request([1] * 100, _params(i, True), threading.Event(), None, None)
                for i in range(4)]
    joining, apart = split_admitted(requests, can_join=True)
    assert sum(len(r.prompt_ids) for r in joining) <= PACKED_PROMPT_TOKENS < 300
    assert joining + apart == requests and len(joining) == 2


def test_prompts_of_similar_length_prefill_together_within_the_padding_bound(loaded):
    requests = [Request(p, _params(i, True), threading.Event(), None, None)
                for i, p in enumerate(_prompts(loaded))]
    groups = prefill_groups(requests)
    assert sorted(map(id, sum(groups, []))) == sorted(map(id, requests))
    for group in groups:
        lengths = [len(r.prompt_ids) for r in group]
        assert len(group) * max(lengths) <= PREFILL_PADDING * sum(lengths)
    assert len(groups) < len({len(r.prompt_ids) for r in requests})
    assert any(len({len(r.prompt_ids) for r in group}) > 1 for group in groups)  # padded


def test_the_batch_never_exceeds_its_size_or_kv_budget(loaded):
    params = SamplingParams(max_new_tokens=40, min_new_tokens=40, temperature=0.0, top_p=1.0)
    prompt = loaded.tokenizer.encode("Hello there")
    small = BatchingEngine(loaded, max_batch_size=3, kv_cache_tokens=4 * (len(prompt) + 40))
    try:
        streams = [iterate(small, prompt, params) for _ in range(8)]
        with ThreadPoolExecutor(8) as pool:
            outputs = list(pool.map(_tokens, streams))
        assert all(len(tokens) == 40 for tokens in outputs)
        assert max(size for _, size in small.batch_sizes) == 3
        with pytest.raises(ValueError, match="KV-cache budget"):
            next(iterate(small, prompt, params.model_copy(update={"max_new_tokens": 500})))
    finally:
        small.close()


def test_stats_report_the_batch_the_queue_and_the_kv_share(loaded):
    params = SamplingParams(max_new_tokens=200, min_new_tokens=200, temperature=0.0, top_p=1.0)
    prompt = loaded.tokenizer.encode("Hello there")
    budget = 2 * (len(prompt) + 200)
    small = BatchingEngine(loaded, max_batch_size=2, kv_cache_tokens=budget)
    try:
        assert small.stats().batch_size == 0 and small.stats().kv_cache_usage == 0.0
        streams = [iterate(small, prompt, params) for _ in range(3)]
        for stream in streams[:2]:
            next(stream)
        while small.running < 2:  # the first token comes from the prefill, before the row joins
            time.sleep(0.001)
        stats = small.stats()
        assert (stats.batch_size, stats.waiting) == (2, 1)
        assert 2 * len(prompt) / budget <= stats.kv_cache_usage <= 1.0
        for stream in streams:
            stream.close()
    finally:
        small.close()


def test_a_cancelled_request_leaves_the_batch_by_the_next_step(engine, loaded):
    params = SamplingParams(max_new_tokens=400, min_new_tokens=400, temperature=0.0, top_p=1.0)
    cancels = [threading.Event() for _ in range(3)]
    streams = [iterate(engine, loaded.tokenizer.encode(f"Job {i}"), params, c)
               for i, c in enumerate(cancels)]
    for stream in streams:
        next(stream)
    while engine.running < 3:
        time.sleep(0.001)
    cancels[0].set()
    last_started = engine.step_count  # the step after it may already hold the row: in flight
    assert list(streams[0])[-1] == TokenStep(None, FinishReason.CANCELLED)
    while engine.step_count <= last_started + 2:
        time.sleep(0.001)
    sizes = dict(engine.batch_sizes)
    assert sizes[last_started + 2] == 2
    for stream in streams[1:]:
        stream.close()  # abandoning frees the slots too
    while engine.running:
        time.sleep(0.001)


def test_the_scheduler_blocks_when_idle(engine):
    while engine.running:
        time.sleep(0.001)
    steps = engine.step_count
    time.sleep(0.3)
    assert engine.step_count == steps


class PacedEngine:
    """The real engine, read no faster than one step per `seconds`: a busy worker's pace."""

    def __init__(self, engine: BatchingEngine, seconds: float):
        self._engine, self._seconds = engine, seconds

    def run(self, prompt_ids, params, cancel, sink):
        def paced(step):
            time.sleep(self._seconds)
            return sink(step)

        self._engine.run(prompt_ids, params, cancel, paced)


def _run_job(redis_client, engine, loaded, params: SamplingParams, chunk_seconds: float,
             prompt: str = "Once upon a time") -> list[dict]:
    """Run one job through a real JobRunner into a real Redis log; return its events."""
    store = JobStore(redis_client, 600)
    job = Job(model=DEMO_MODEL, prompt_token_ids=loaded.tokenizer.encode(prompt), params=params)
    store.create(job)
    JobRunner(store, engine, loaded.tokenizer, "test", chunk_seconds).run(job)
    return store.read(job.id)


def _texts(events: list[dict]) -> list[str]:
    return [e["text"] for e in events if e["type"] == "token"]


GREEDY_64 = SamplingParams(max_new_tokens=64, min_new_tokens=64, temperature=0.0, top_p=1.0)


def test_chunking_coalesces_tokens_but_sends_the_first_at_once(redis_client, engine, loaded):
    per_token = _texts(_run_job(redis_client, engine, loaded, GREEDY_64, 0.0))
    window = 1.0  # wide, so that a loaded host (seconds for 64 tokens) still shows coalescing
    started = time.monotonic()
    chunked = _texts(_run_job(redis_client, PacedEngine(engine, 0.005), loaded, GREEDY_64,
                              window))
    elapsed = time.monotonic() - started
    assert len(per_token) > 32 and "".join(chunked) == "".join(per_token)
    assert chunked[0] == per_token[0]  # the first token was not held back
    assert 2 <= len(chunked) <= elapsed / window + 2 < len(per_token)


def _window_across_a_boundary(text: str, size: int, boundaries: set[int]) -> str:
    """A window after the start of `text` that occurs nowhere earlier in it and that a token
    boundary cuts (which one that is depends on the sampled text, so on the host's numerics)."""
    return next(text[i:i + size] for i in range(size, len(text) - size)
                if text.index(text[i:i + size]) == i and text[i:i + size].strip()
                and any(i < end < i + size for end in boundaries))


def test_a_stop_sequence_split_across_tokens_is_never_streamed(redis_client, engine, loaded):
    params = SamplingParams(max_new_tokens=64, min_new_tokens=48, temperature=0.8, top_p=0.95,
                            seed=7)
    pieces = _texts(_run_job(redis_client, engine, loaded, params, 0.0))  # one per token
    full = "".join(pieces)
    assert len(full) > 24, pieces
    ends = {len("".join(pieces[:i])) for i in range(len(pieces))}
    stop = _window_across_a_boundary(full, 4, ends)
    events = _run_job(redis_client, engine, loaded, params.model_copy(update={"stop": (stop,)}), 0.0)
    streamed = "".join(_texts(events))
    assert streamed == full[:full.index(stop)]
    assert stop not in streamed and events[-1]["finish_reason"] == "stop_sequence"


class _PoisonRow:
    """Wraps an engine's model runner: at the `at`-th decode step with the row, that row's
    logits turn to NaN, as a model's overflow would leave them."""

    def __init__(self, engine: BatchingEngine, row: int, at: int):
        self.row, self.at, self.decodes, self.poisoned = row, at, 0, False
        self._runner = engine._runner
        self._decode = self._runner.decode_parts
        self._runner.decode_parts = self

    def __call__(self, tokens, positions, parts, row_adapters=None):
        logits, packed = self._decode(tokens, positions, parts, row_adapters)
        if len(tokens) > self.row:
            self.decodes += 1
            if self.decodes == self.at:
                logits[self.row] = float("nan")
                self.poisoned = True
        return logits, packed

    def remove(self) -> None:
        del self._runner.decode_parts  # the class's own method again


def test_a_row_with_non_finite_logits_fails_alone_and_its_batch_goes_on(engine, loaded):
    prompts = _prompts(loaded)[:4]
    params = [SamplingParams(max_new_tokens=20, min_new_tokens=20, temperature=0.0, top_p=1.0)
              for _ in range(4)]
    alone = _alone(loaded, prompts, params)
    poison = _PoisonRow(engine, row=1, at=5)
    gate = _Gate(engine, 4)
    results: list = [None] * 4

    def run(i: int) -> None:
        try:
            results[i] = _tokens(iterate(gate, prompts[i], params[i]))
        except Exception as exc:  # the failing row's error, raised by its iterator
            results[i] = exc
    try:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(run, range(4)))
    finally:
        poison.remove()
    assert poison.poisoned
    failed = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
    assert len(failed) == 1 and "not finite" in str(results[failed[0]])
    assert [r for i, r in enumerate(results) if i not in failed] == \
        [a for i, a in enumerate(alone) if i not in failed]


def test_a_step_that_fails_after_its_forward_pass_fails_its_rows_and_joiners_and_none_hangs(
        loaded, monkeypatch):
    """A failure after the pass (a CUDA OOM growing the KV buffers, say) ends every request it
    touched with the error, the prompts joining that step included, and the engine serves on."""
    prompts, params = _prompts(loaded)[:6], [_params(i, True) for i in range(6)]
    params[0] = params[0].model_copy(update={"max_new_tokens": 40, "min_new_tokens": 40})
    engine = BatchingEngine(loaded, max_batch_size=BATCH, kv_cache_tokens=65_536)
    runner = engine._runner
    decode, advance, failed, joins = runner.decode_parts, runner.advance, [], []

    def decode_noting_the_last_prompt(tokens, positions, parts, row_adapters=None):
        joins.append(any(part.ids == prompts[-1] for part in parts))
        return decode(tokens, positions, parts)

    def advance_failing_when_it_joins():
        if joins[-1] and not failed:
            failed.append(True)
            raise MemoryError("out of memory growing the KV cache")
        advance()

    monkeypatch.setattr(runner, "decode_parts", decode_noting_the_last_prompt)
    monkeypatch.setattr(runner, "advance", advance_failing_when_it_joins)
    try:
        staggered = _Staggered(engine, prompts, params)
        staggered.run()  # every request ends within its wait: none hangs
        assert failed and isinstance(staggered.errors[-1], MemoryError)  # a joiner
        assert isinstance(staggered.errors[0], MemoryError)  # a running row
        assert all(e is None or isinstance(e, MemoryError) for e in staggered.errors)
        after = _tokens(iterate(engine, prompts[1], params[1]))
        assert after == _alone(loaded, [prompts[1]], [params[1]])[0]
    finally:
        engine.close()


def _continue_after(redis_client, engine, loaded, params: SamplingParams, earlier: list[dict],
                    delivered: int) -> list[dict]:
    """Run a job as attempt 2, after an attempt that delivered `earlier`'s first token events."""
    store = JobStore(redis_client, 600)
    job = Job(model=DEMO_MODEL, prompt_token_ids=loaded.tokenizer.encode("Once upon a time"),
              params=params)
    store.create(job)
    for event in [e for e in earlier if e["type"] == "token"][:delivered]:
        store.append(job.id, TokenEvent(event["text"], tuple(event["ids"])))
    store.redis.hset(f"dawet:job:{{{job.id}}}", "fence", 2)  # as a second claim leaves it
    JobRunner(store, engine, loaded.tokenizer, "test", 0.0).run(job, fence=2)
    return store.read(job.id)


def test_a_continued_reply_is_the_greedy_reply_and_deterministic_for_a_seed(redis_client,
                                                                            engine, loaded):
    whole = _run_job(redis_client, engine, loaded, GREEDY_64, 0.0)
    greedy = _continue_after(redis_client, engine, loaded, GREEDY_64, whole, 20)
    assert "".join(_texts(greedy)) == "".join(_texts(whole))
    assert greedy[-1]["usage"] == whole[-1]["usage"]
    seeded = SamplingParams(max_new_tokens=48, min_new_tokens=48, temperature=0.9, top_p=0.95,
                            seed=11)
    earlier = _run_job(redis_client, engine, loaded, seeded, 0.0)
    first, second = (_continue_after(redis_client, engine, loaded, seeded, earlier, 12)
                     for _ in range(2))
    assert _texts(first) == _texts(second)  # the same seam and seed: the same continuation
    assert _texts(first)[:12] == _texts(earlier)[:12]
    assert first[-1]["usage"]["completion_tokens"] == 48


def test_a_long_prompt_prefills_in_parts_between_the_running_rows_steps(loaded):
    """Chunked prefill: a 1,800-token prompt that arrives mid-batch is computed at most
    PACKED_PROMPT_TOKENS tokens per step, and the running row gets a token at every one of
    those steps; the prompt's reply is the one it gets prefilled whole."""
    words = "Saya suka makan nasi goreng di pasar pagi bersama keluarga besar kami. "
    long_prompt = loaded.tokenizer.encode(words * 200)[:1800]
    short = _prompts(loaded)[0]
    params = SamplingParams(max_new_tokens=8, min_new_tokens=8, temperature=0.0, top_p=1.0)
    running = params.model_copy(update={"max_new_tokens": 60, "min_new_tokens": 60})
    whole = BatchingEngine(loaded, max_batch_size=4, kv_cache_tokens=65_536, pack_prompts=False)
    try:
        expected = _tokens(iterate(whole, long_prompt, params))
    finally:
        whole.close()
    engine = BatchingEngine(loaded, max_batch_size=4, kv_cache_tokens=65_536)
    alone: list = []
    alone_ended = threading.Event()  # alone, with no row running, it prefills in parts too
    engine.submit(long_prompt, params, threading.Event(), lambda step: alone.append(step.token_id),
                  lambda error: alone_ended.set())
    assert alone_ended.wait(120) and alone == expected
    steps_of_the_row: list[int] = []
    late: list = []
    row_ended, late_ended = threading.Event(), threading.Event()

    def sink(step: TokenStep) -> None:
        steps_of_the_row.append(engine.step_count)
        if len(steps_of_the_row) == 5:  # the row is running: the long prompt arrives
            engine.submit(long_prompt, params, threading.Event(),
                          lambda step: late.append(step.token_id), lambda e: late_ended.set())
    try:
        engine.submit(short, running, threading.Event(), sink, lambda error: row_ended.set())
        assert row_ended.wait(120) and late_ended.wait(120)
        assert late == expected
        computed = [(step, tokens) for step, tokens in engine.prompt_tokens if tokens]
        assert max(tokens for _, tokens in computed) <= PACKED_PROMPT_TOKENS
        long_steps = [step for step, tokens in computed if step > steps_of_the_row[4]]
        assert len(long_steps) >= -(-len(long_prompt) // PACKED_PROMPT_TOKENS)
        assert set(long_steps) <= set(steps_of_the_row)  # the row got a token at each
    finally:
        engine.close()
