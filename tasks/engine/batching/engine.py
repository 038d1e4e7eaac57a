"""Continuous batching: every running request shares one batched decode step per iteration.

One loop thread owns the model: in the engine process, its main thread, the one that loaded
the model (`own_thread=False`, then `join()` runs the loop). Torch's OpenMP keeps a pool of
threads per calling thread, and on a 2-core CPU a second pool beside the loader's made every
step 1.5-3x slower (docs/benchmarks.md). Each iteration it reads new requests (from `submit()` on any
thread, or from the engine process's inbox, which it reads itself between iterations), drops
cancelled rows, asks the scheduler (scheduler.py) what to admit and how, has the model runner
(model_runner.py) prefill prompts that go apart and run ONE decode step for all rows with the
joining prompts packed into it, samples each row with its request's own Sampler (batched,
tasks/engine/sampling.py), hands each row's step to its request's sink, and evicts the rows that
ended. A prompt's first token comes from the pass that read it, and its KV cache joins the
running batch's preallocated cache (kv_cache.py). The thread blocks while idle.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

import torch

from model_store.loader import LoadedModel
from tasks.engine.batching.model_runner import Computed, PromptPart, runner_for
from tasks.engine.batching.scheduler import (PACKED_PROMPT_TOKENS, Scheduler, prefill_groups,
                                             split_admitted)
from tasks.engine.interface import (CANCELLED_STEP, EndCallback, EngineStats, Request, StepSink,
                                    TokenStep, run_submitted, step_for)
from tasks.engine.sampling import NonFiniteLogits, Sampler, sample_batch
from tasks.engine.structured import Grammars
from tasks.jobs.contract import SamplingParams

logger = logging.getLogger(__name__)

HISTORY_STEPS = 4096  # how many recent batch sizes the engine remembers

Inbox = Callable[["BatchingEngine", bool], None]  # (engine, idle): submit what arrived


class _Sequence:
    """A running request: its sampler, its length and the token to feed next."""

    def __init__(self, request: Request, eos_ids: frozenset[int], device: torch.device):
        self.request, self._eos_ids = request, eos_ids
        self.sampler = Sampler(request.params, request.prompt_ids, eos_ids, device,
                               request.constraint)
        self.tokens = list(request.prompt_ids)  # and the reply so far (an EOS is not one)
        self.length = len(self.tokens)
        self.last_token = self.tokens[-1]

    def accept(self, token: int) -> TokenStep:
        """The step for a sampled token; the sequence advances unless it ended."""
        step = step_for(token, self.sampler.produced, self.request.params, self._eos_ids,
                        self.sampler.logprobs)
        if step.token_id is not None:
            self.tokens.append(step.token_id)
            self.last_token, self.length = step.token_id, self.length + 1
        return step


class _Prefilling:
    """An admitted request whose prompt is being computed, a part per step on a runner that
    chunks; `start`: its tokens computed so far, with their keys and values."""

    def __init__(self, sequence: _Sequence, start: Computed | None):
        self.sequence, self.start = sequence, start

    def next_part(self, budget: int | None) -> PromptPart:
        """Its next part: the rest of its prompt, or `budget` tokens of it at most."""
        part = PromptPart(self.sequence.request.prompt_ids, self.start,
                          adapter=self.sequence.request.adapter)
        if budget is not None:
            part.end = min(part.end, part.done + budget)
        return part


class BatchingEngine:
    """Continuous batching behind the Engine interface; safe to call from many threads.

    The loop thread hands each step to its request's sink itself. A sink must be quick (the
    runner's decodes, matches stops and queues events for the writer thread): measured on CPU,
    any hand-off to another thread cost more, each waiting for the GIL up to a switch interval
    while the loop runs Python.
    """

    def __init__(self, loaded: LoadedModel, max_batch_size: int, kv_cache_tokens: int,
                 after_steps: Callable[[], None] | None = None, inbox: Inbox | None = None,
                 pack_prompts: bool = True, forward: str = "auto", own_thread: bool = True,
                 prefix_cache_tokens: int = 0, max_loaded_adapters: int = 8):
        self._runner = runner_for(loaded, forward, kv_cache_tokens, prefix_cache_tokens,
                                  max_loaded_adapters)
        self._device = loaded.device
        # prompts join a running batch inside its decode step, where the model allows it
        self._pack_prompts = pack_prompts and self._runner.packs
        # ... and, where the runner computes part of a prompt per step, every prompt does
        self._chunks = self._pack_prompts and self._runner.chunks
        self._eos_ids = loaded.tokenizer.eos_token_ids
        self._grammars = Grammars.for_model(loaded)  # JSON Schemas, compiled at submit
        self._scheduler = Scheduler(max_batch_size, kv_cache_tokens, self._runner.paged)
        self._after_steps = after_steps  # called after a forward pass's steps reached sinks
        self._inbox = inbox  # read by the loop at each iteration; it blocks there when idle
        self._rows: list[_Sequence] = []
        self._prefilling: list[_Prefilling] = []  # prompts joining the batch, oldest first
        self._admitted: list[Request] = []
        self.step_count = 0
        self.packed_prompts = 0  # prompts that joined a decode step instead of a prefill
        self.batch_sizes: deque[tuple[int, int]] = deque(maxlen=HISTORY_STEPS)  # (step, rows)
        # (step, prompt tokens it computed): at most PACKED_PROMPT_TOKENS on a runner that chunks
        self.prompt_tokens: deque[tuple[int, int]] = deque(maxlen=HISTORY_STEPS)
        self._loop_thread: threading.Thread | None = None  # the thread running the loop
        self._loop_ended = threading.Event()
        if own_thread:
            self._loop_thread = threading.Thread(target=self._run, name="dawet-batcher",
                                                 daemon=True)
            self._loop_thread.start()

    @property
    def max_batch_size(self) -> int:
        return self._scheduler.max_batch_size

    @property
    def kv_cache_tokens(self) -> int:
        return self._scheduler.kv_cache_tokens

    def close(self, timeout: float = 10.0) -> None:
        """Stop the loop after its current iteration; requests still running are failed.
        Its inbox may call this too (the loop's own thread then does not wait for itself)."""
        self._scheduler.close()
        if self._loop_thread not in (None, threading.current_thread()):
            self._loop_ended.wait(timeout)

    def join(self) -> None:
        """Wait until the engine is closed and its loop has failed what was left; without a
        thread of its own, run the loop on this thread until then."""
        if self._loop_thread is None and not self._loop_ended.is_set():
            self._run()
        self._loop_ended.wait()

    @property
    def running(self) -> int:
        """How many sequences are in the batch now."""
        return len(self._rows)

    def stats(self) -> EngineStats:
        """Batch size, waiting requests and the share of the KV budget the cache holds."""
        held = self._runner.kv_tokens()
        prefixes, adapters = self._runner.prefixes, self._runner.adapters
        return EngineStats(len(self._rows), len(self._scheduler.waiting),
                           min(held / self.kv_cache_tokens, 1.0),
                           prefix_cache=prefixes.stats() if prefixes is not None else None,
                           adapters_loaded=len(adapters) if adapters is not None else None)

    def run(self, prompt_ids: list[int], params: SamplingParams, cancel: threading.Event,
            sink: StepSink) -> None:
        """Queue the request and wait until it ends; its steps go to `sink` meanwhile."""
        run_submitted(self.submit, prompt_ids, params, cancel, sink)

    def submit(self, prompt_ids: list[int], params: SamplingParams, cancel: threading.Event,
               sink: StepSink, on_end: EndCallback) -> None:
        """Queue the request without waiting: its steps go to `sink`, then `on_end(error or
        None)` runs once, both on the loop thread. Raises if it can never fit, or if its JSON
        Schema cannot be compiled."""
        self._scheduler.add(Request(list(prompt_ids), params, cancel, sink, on_end,
                                    constraint=self._grammars.constraint(params)))

    def _run(self) -> None:
        """The loop: take requests, drop stopped rows, admit, decode; block while idle."""
        self._loop_thread = threading.current_thread()
        try:
            self._loop()
        finally:
            self._loop_ended.set()

    def _loop(self) -> None:
        with torch.inference_mode():
            while not self._scheduler.closed:
                try:
                    self._iterate()
                except Exception as exc:  # the boundary: fail what it touched, keep serving
                    logger.exception("batched decode step failed")
                    self._fail_all(exc)
        self._fail_all(RuntimeError("the engine was closed"))
        self._scheduler.fail_waiting(RuntimeError("the engine was closed"))

    def _iterate(self) -> None:
        self._take_requests()
        self._evict([i for i, s in enumerate(self._rows) if s.request.stopped], CANCELLED_STEP)
        self._drop_stopped_prefills()
        admitted = self._scheduler.admit(self._scheduled())
        self._admitted = admitted  # taken from the queue, not yet in rows: a failure fails them
        admitted = self._load_adapters(admitted)
        if self._chunks:  # every prompt joins the steps, a part within each one's budget
            joining, apart = admitted, []
        else:
            joining, apart = split_admitted(admitted, self._pack_prompts and bool(self._rows))
        self._prefilling += [_Prefilling(_Sequence(r, self._eos_ids, self._device),
                                         self._runner.cached_start(r.prompt_ids, r.adapter))
                             for r in joining]
        for group in prefill_groups(apart):
            self._prefill(group)
            self._steps_delivered()  # first tokens go out before the decode step
        if self._rows or self._prefilling:
            self._decode_step()
            self._steps_delivered()

    def _scheduled(self) -> list[Request]:
        return [s.request for s in self._rows] + [p.sequence.request for p in self._prefilling]

    def _load_adapters(self, admitted: list[Request]) -> list[Request]:
        """Load each admitted request's LoRA adapter (it stays loaded while a request runs with
        it); a request whose adapter cannot be loaded ends with the error, the others go on."""
        in_use = {request.adapter for request in self._scheduled() if request.adapter}
        ready = []
        for request in admitted:
            if request.params.lora is not None:
                try:
                    request.adapter = self._runner.adapter(request.params.lora, in_use)
                except Exception as exc:  # noqa: BLE001 - this request's failure only
                    logger.warning("adapter %s: %s", request.params.lora.name, exc)
                    request.deliver(exc)
                    continue
                in_use.add(request.adapter)
            ready.append(request)
        return ready

    def _drop_stopped_prefills(self) -> None:
        stopped = [p for p in self._prefilling if p.sequence.request.stopped]
        for prefilling in stopped:
            prefilling.sequence.request.deliver(CANCELLED_STEP)
            self._runner.release(prefilling.start)
        self._prefilling = [p for p in self._prefilling if p not in stopped]

    def _steps_delivered(self) -> None:
        if self._after_steps is not None:
            self._after_steps()

    def _take_requests(self) -> None:
        """Read the inbox, or wait on the other threads' submissions, blocking while idle."""
        busy = len(self._rows) + len(self._prefilling)
        if self._inbox is not None:
            self._inbox(self, not busy and not self._scheduler.waiting)
        else:
            self._scheduler.wait_for_work(busy)

    def _prefill(self, group: list[Request]) -> None:
        """Run the prompts as one batch, deliver first tokens, join those not ended."""
        sequences = [_Sequence(r, self._eos_ids, self._device) for r in group]
        try:
            prefill = self._runner.prefill([r.prompt_ids for r in group],
                                           [r.adapter for r in group])
            tokens = sample_batch([s.sampler for s in sequences], prefill.logits)
        except Exception as exc:  # these requests only: their runners turn it into error events
            logger.exception("prefill failed")
            for request in group:
                request.deliver(exc)
            return
        going = []
        for index, (sequence, token) in enumerate(zip(sequences, tokens)):
            if self._accept(sequence, token):
                self._runner.discard(prefill.cache, index)
            else:
                going.append(index)
        if going:
            self._runner.join_prefilled(prefill, going)
            self._rows.extend(sequences[i] for i in going)

    def _accept(self, sequence: _Sequence, token: int | None) -> bool:
        """Deliver the step for a sampled token; return whether the sequence ended. A row that
        could not be sampled (None: non-finite logits) fails alone; its batch goes on."""
        if token is None:
            sequence.request.deliver(NonFiniteLogits())
            return True
        step = sequence.accept(token)
        sequence.request.deliver(step)
        return step.finish is not None

    def _decode_step(self) -> None:
        """One forward pass for every running row and the prompt parts this step computes,
        then per-row sampling and eviction; a prompt whose last part ran takes a row, unless
        its first token ended it."""
        self.step_count += 1
        self.batch_sizes.append((self.step_count, len(self._rows)))
        parts = self._parts()
        try:
            logits, packed = self._forward([part for _, part in parts])
        except Exception:
            if not parts:
                raise
            # a prompt may be what failed: prefilled apart, a failure fails its own requests
            logger.exception("a packed decode step failed; its prompts prefill apart")
            for prefilling, _ in parts:
                self._runner.release(prefilling.start)
            self._prefilling = [p for p in self._prefilling if all(p is not q for q, _ in parts)]
            for group in prefill_groups([p.sequence.request for p, _ in parts]):
                self._prefill(group)
            if not self._rows:  # the step held prompts only
                return
            parts, (logits, packed) = [], self._forward([])
        if self._rows:
            self._runner.advance()
        self.prompt_tokens.append((self.step_count, sum(p.end - p.done for _, p in parts)))
        self._sample_and_join(logits, packed, parts)

    def _parts(self) -> list[tuple[_Prefilling, PromptPart]]:
        """The prompt parts this step computes, oldest prompt first: on a runner that chunks,
        PACKED_PROMPT_TOKENS tokens in all at most, so that a long prompt never stalls the
        running rows for more than a step's budget; elsewhere whole prompts."""
        if not self._chunks:
            return [(p, p.next_part(None)) for p in self._prefilling]
        parts, room = [], PACKED_PROMPT_TOKENS
        for prefilling in self._prefilling:
            if room <= 0:
                break
            part = prefilling.next_part(room)
            parts.append((prefilling, part))
            room -= part.end - part.done
        return parts

    def _sample_and_join(self, logits: torch.Tensor, packed,
                         parts: list[tuple[_Prefilling, PromptPart]]) -> None:
        """Sample the rows and the prompts whose last part ran; evict the rows that ended and
        let those prompts take rows. A prompt with parts to go keeps what it computed."""
        rows = len(self._rows)
        finals = [index for index, (_, part) in enumerate(parts) if part.final]
        for index, (prefilling, part) in enumerate(parts):
            if not part.final:
                prefilling.start = self._runner.started(packed, index, part)
        done = {id(parts[index][0]) for index in finals}
        self._prefilling = [p for p in self._prefilling if id(p) not in done]
        joiners = [parts[index][0].sequence for index in finals]
        if len(finals) < len(parts):
            logits = logits[list(range(rows)) + [rows + index for index in finals]]
        sequences = self._rows + joiners
        tokens = sample_batch([s.sampler for s in sequences], logits)
        ended = [self._accept(s, token) for s, token in zip(sequences, tokens)]
        self._evict([i for i, done in enumerate(ended[:rows]) if done])
        self.packed_prompts += len(joiners)
        for index, joiner, ended_now in zip(finals, joiners, ended[rows:]):
            if ended_now:
                self._runner.discard(packed, index)
            else:
                self._runner.join_packed(packed, index)
                self._rows.append(joiner)

    def _forward(self, parts: list[PromptPart]):
        return self._runner.decode_parts([s.last_token for s in self._rows],
                                         [s.length - 1 for s in self._rows], parts,
                                         [s.request.adapter for s in self._rows])

    def _evict(self, rows: list[int], final: TokenStep | None = None) -> None:
        """Remove these rows from the batch, sending each a `final` step when given."""
        if not rows:
            return
        for index in rows:
            row = self._rows[index]
            if final is not None:
                row.request.deliver(final)
            self._runner.remember(index, row.tokens, row.request.adapter)
        gone = set(rows)
        order = self._runner.keep([i for i in range(len(self._rows)) if i not in gone])
        self._rows = [self._rows[i] for i in order]

    def _fail_all(self, exc: Exception) -> None:
        """Hand the error to every running request and to those this iteration admitted (a
        request that already ended ignores it), and start over with an empty batch. The
        requests still waiting run in the next iteration."""
        for request in self._scheduled() + self._admitted:
            request.deliver(exc)
        self._rows, self._prefilling, self._admitted = [], [], []
        self._runner.reset()
