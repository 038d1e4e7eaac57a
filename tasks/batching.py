"""Continuous batching: every running request shares one batched decode step per iteration.

One scheduler thread owns the model. `run()` queues a request and waits for its end. Each
iteration the scheduler drops cancelled rows, admits waiting requests, runs ONE decode step
for all rows, samples each row with its request's own Sampler (batched, tasks/sampling.py),
hands each row's step to its request's sink, and evicts the rows that ended. While rows are
running, admitted prompts join that decode step, packed into its forward pass (tasks/packed.py);
otherwise (and for long prompts) prompts of similar length prefill together, left-padded. Either
way the pass's logits give a prompt's first token at once and its KV cache joins the running
batch's preallocated cache (tasks/kvcache.py: rows left-padded, explicit position ids).
Admission is bounded by a batch size and a KV-cache budget; the thread blocks when idle.
Requests come from `run()` or `submit()` on any thread, or from an inbox that the scheduler
reads itself between iterations (the engine process's pipe: tasks/engine_process.py).
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from model_store.loader import LoadedModel
from tasks.contract import SamplingParams
from tasks.engine import CANCELLED_STEP, StepSink, TokenStep, step_for
from tasks.kvcache import KVBatch
from tasks.metrics import EngineStats
from tasks.packed import PackedStep, can_pack, packed_attention_on
from tasks.sampling import Sampler, sample_batch

logger = logging.getLogger(__name__)

HISTORY_STEPS = 4096  # how many recent batch sizes the engine remembers
PREFILL_PADDING = 1.25  # a prefill's padded tokens over its real ones, at most
PACKED_PROMPT_TOKENS = 256  # the most prompt tokens that join one decode step (tasks/packed.py)


EndCallback = Callable[[BaseException | None], None]  # a request's end: its error, or None
Inbox = Callable[["BatchingEngine", bool], None]  # (engine, idle): submit what arrived


@dataclass(eq=False)
class _Request:
    """A submitted request, the sink its steps go to, and what to call when it ends."""

    prompt_ids: list[int]
    params: SamplingParams
    cancel: threading.Event
    sink: StepSink
    on_end: EndCallback
    ended: bool = False  # it finished, its sink asked to stop or failed: nothing more reaches it
    error: BaseException | None = None

    @property
    def reserved_tokens(self) -> int:
        return len(self.prompt_ids) + self.params.max_new_tokens

    @property
    def stopped(self) -> bool:
        return self.ended or self.cancel.is_set()

    def deliver(self, item: TokenStep | BaseException) -> None:
        """Hand a step to the sink, or end the request with an error."""
        if self.ended:
            return  # the sink already stopped it: nothing reaches it any more
        try:
            if isinstance(item, BaseException):
                raise item
            ended = bool(self.sink(item)) or item.finish is not None
        except Exception as exc:  # a failing sink ends its own request only
            self.error, ended = exc, True
        if ended:
            self.ended = True
            self.on_end(self.error)


class _Sequence:
    """A running request: its sampler, its length and the token to feed next."""

    def __init__(self, request: _Request, eos_ids: frozenset[int], device: torch.device):
        self.request, self._eos_ids = request, eos_ids
        self.sampler = Sampler(request.params, request.prompt_ids, eos_ids, device)
        self.length = len(request.prompt_ids)  # tokens so far, the last one not yet in the cache
        self.last_token = request.prompt_ids[-1]

    def accept(self, token: int) -> TokenStep:
        """The step for a sampled token; the sequence advances unless it ended."""
        step = step_for(token, self.sampler.produced, self.request.params, self._eos_ids)
        if step.token_id is not None:
            self.last_token, self.length = step.token_id, self.length + 1
        return step


def _prefill_groups(requests: list[_Request]) -> list[list[_Request]]:
    """Group requests, longest prompts first, into prefills whose left padding stays within
    PREFILL_PADDING: each prefill is one forward pass, so on a busy worker the requests that
    arrived during a step prefill together instead of one group per prompt length."""
    groups: list[list[_Request]] = []
    for request in sorted(requests, key=lambda r: len(r.prompt_ids), reverse=True):
        if groups and _padding_allows(groups[-1] + [request]):
            groups[-1].append(request)
        else:
            groups.append([request])
    return groups


def _padding_allows(group: list[_Request]) -> bool:
    lengths = [len(request.prompt_ids) for request in group]
    return len(lengths) * max(lengths) <= PREFILL_PADDING * sum(lengths)


def _within_packed_budget(requests: list[_Request]) -> tuple[list[_Request], list[_Request]]:
    """(the requests whose prompts fit PACKED_PROMPT_TOKENS in all, in order; the rest): a
    long prompt would slow the step down for every running row, so it prefills apart."""
    joining, apart, tokens = [], [], 0
    for request in requests:
        tokens += len(request.prompt_ids)
        (joining if tokens <= PACKED_PROMPT_TOKENS else apart).append(request)
    return joining, apart


def _left_padded(prompts: list[list[int]], device: torch.device) -> dict[str, torch.Tensor]:
    """A prefill's model inputs: prompts left-padded to the longest, with the padding masked and
    position ids that start at each prompt's first token. Prompts of one length need neither."""
    longest = max(len(prompt) for prompt in prompts)
    if all(len(prompt) == longest for prompt in prompts):
        return {"input_ids": torch.tensor(prompts, device=device)}
    pads = [longest - len(prompt) for prompt in prompts]
    ids = torch.tensor([[0] * pad + prompt for pad, prompt in zip(pads, prompts)], device=device)
    mask = torch.tensor([[0] * pad + [1] * len(prompt) for pad, prompt in zip(pads, prompts)],
                        device=device)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}


class BatchingEngine:
    """Continuous batching behind the Engine interface; safe to call from many threads.

    The scheduler thread hands each step to its request's sink itself. A sink must be quick
    (the runner's decodes, matches stops and queues events for the writer thread): measured on
    CPU, any hand-off to another thread cost more, each waiting for the GIL up to a switch
    interval while the scheduler runs Python.
    """

    def __init__(self, loaded: LoadedModel, max_batch_size: int, kv_cache_tokens: int,
                 after_steps: Callable[[], None] | None = None, inbox: Inbox | None = None,
                 pack_prompts: bool = True):
        self._model, self._device = loaded.model, loaded.device
        # prompts join a running batch inside its decode step, where the model allows it
        self._pack_prompts = pack_prompts and can_pack(loaded)
        self._eos_ids = loaded.tokenizer.eos_token_ids
        self.max_batch_size, self.kv_cache_tokens = max_batch_size, kv_cache_tokens
        self._after_steps = after_steps  # called after a forward pass's steps reached sinks
        self._inbox = inbox  # read by the scheduler at each iteration; it blocks there when idle
        self._waiting: deque[_Request] = deque()
        self._wakeup = threading.Condition()
        self._rows: list[_Sequence] = []
        self._kv = KVBatch(loaded.device)
        self.step_count = 0
        self.packed_prompts = 0  # prompts that joined a decode step instead of a prefill
        self._closed = False
        self.batch_sizes: deque[tuple[int, int]] = deque(maxlen=HISTORY_STEPS)  # (step, rows)
        self._thread = threading.Thread(target=self._run, name="dawet-batcher", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the scheduler after its current iteration; requests still running are failed.
        Its inbox may call this too (the scheduler's own thread then does not wait for itself)."""
        with self._wakeup:
            self._closed = True
            self._wakeup.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def join(self) -> None:
        """Wait until the engine is closed and its scheduler has failed what was left."""
        self._thread.join()

    @property
    def running(self) -> int:
        """How many sequences are in the batch now."""
        return len(self._rows)

    def stats(self) -> EngineStats:
        """Batch size, waiting requests and the share of the KV budget the padded batch holds."""
        held = len(self._rows) * self._kv.width
        return EngineStats(len(self._rows), len(self._waiting), min(held / self.kv_cache_tokens, 1.0))

    def run(self, prompt_ids: list[int], params: SamplingParams, cancel: threading.Event,
            sink: StepSink) -> None:
        """Queue the request and wait until it ends; its steps go to `sink` meanwhile."""
        ended, errors = threading.Event(), []

        def on_end(error: BaseException | None) -> None:
            errors.append(error)
            ended.set()

        self.submit(prompt_ids, params, cancel, sink, on_end)
        ended.wait()
        if errors[0] is not None:
            raise errors[0]

    def submit(self, prompt_ids: list[int], params: SamplingParams, cancel: threading.Event,
               sink: StepSink, on_end: EndCallback) -> None:
        """Queue the request without waiting: its steps go to `sink`, then `on_end(error or
        None)` runs once, both on the scheduler thread. Raises if it can never fit."""
        request = _Request(list(prompt_ids), params, cancel, sink, on_end)
        if request.reserved_tokens > self.kv_cache_tokens:
            raise ValueError(f"prompt plus max_new_tokens ({request.reserved_tokens}) exceeds the "
                             f"KV-cache budget of {self.kv_cache_tokens} tokens")
        with self._wakeup:
            if self._closed:
                raise RuntimeError("the engine was closed")
            self._waiting.append(request)
            self._wakeup.notify()

    def _run(self) -> None:
        """The scheduler loop: take requests, drop stopped rows, admit, decode; block while
        idle."""
        with torch.inference_mode():
            while not self._closed:
                try:
                    self._take_requests()
                    self._evict([i for i, s in enumerate(self._rows) if s.request.stopped],
                                CANCELLED_STEP)
                    joining, apart = self._joining(self._admissions())
                    for group in _prefill_groups(apart):
                        self._prefill(group)
                        self._steps_delivered()  # first tokens go out before the decode step
                    if self._rows:
                        self._decode_step(joining)
                        self._steps_delivered()
                except Exception as exc:  # the boundary: fail the batch, keep serving
                    logger.exception("batched decode step failed")
                    self._fail_all(exc)
        self._fail_all(RuntimeError("the engine was closed"))
        with self._wakeup:
            for request in self._waiting:
                request.deliver(RuntimeError("the engine was closed"))

    def _steps_delivered(self) -> None:
        if self._after_steps is not None:
            self._after_steps()

    def _take_requests(self) -> None:
        """Read the inbox, or wait on the other threads' submissions, blocking while idle."""
        idle = not self._rows and not self._waiting
        if self._inbox is not None:
            self._inbox(self, idle)
            return
        with self._wakeup:
            while not self._rows and not self._waiting and not self._closed:
                self._wakeup.wait()

    def _admissions(self) -> list[_Request]:
        """Take the waiting requests that fit the batch and the KV budget."""
        with self._wakeup:
            for request in [r for r in self._waiting if r.stopped]:  # cancelled while waiting
                self._waiting.remove(request)
                request.deliver(CANCELLED_STEP)
            admitted: list[_Request] = []
            while self._waiting and not self._closed and self._fits(admitted, self._waiting[0]):
                admitted.append(self._waiting.popleft())
            return admitted

    def _fits(self, admitted: list[_Request], request: _Request) -> bool:
        """Whether one more row fits: the padded cache is at most rows x longest reservation."""
        requests = [s.request for s in self._rows] + admitted + [request]
        longest = max(r.reserved_tokens for r in requests)
        return len(requests) <= self.max_batch_size and len(requests) * longest <= self.kv_cache_tokens

    def _joining(self, admitted: list[_Request]) -> tuple[list[_Request], list[_Request]]:
        """Split admitted requests into those whose prompts join the next decode step and those
        that prefill apart. With no running rows there is no step to join."""
        if not (self._pack_prompts and self._rows):
            return [], admitted
        return _within_packed_budget(admitted)

    def _prefill(self, group: list[_Request]) -> None:
        """Run the prompts as one batch, deliver first tokens, join those not ended."""
        sequences = [_Sequence(r, self._eos_ids, self._device) for r in group]
        try:
            inputs = _left_padded([r.prompt_ids for r in group], self._device)
            out = self._model(**inputs, use_cache=True, logits_to_keep=1)
            tokens = sample_batch([s.sampler for s in sequences], out.logits[:, -1, :])
        except Exception as exc:  # these requests only: their runners turn it into error events
            logger.exception("prefill failed")
            for request in group:
                request.deliver(exc)
            return
        going = [i for i, (sequence, token) in enumerate(zip(sequences, tokens))
                 if not self._accept(sequence, token)]
        if going:
            self._kv.add(out.past_key_values, going, inputs.get("attention_mask"))
            self._rows.extend(sequences[i] for i in going)

    def _accept(self, sequence: _Sequence, token: int) -> bool:
        """Deliver the step for a sampled token; return whether the sequence ended."""
        step = sequence.accept(token)
        sequence.request.deliver(step)
        return step.finish is not None

    def _decode_step(self, joining: list[_Request]) -> None:
        """One forward pass for every running row and the prompts joining them, then per-row
        sampling and eviction; the joining requests that did not end take rows."""
        self.step_count += 1
        self.batch_sizes.append((self.step_count, len(self._rows)))
        joiners = [_Sequence(r, self._eos_ids, self._device) for r in joining]
        try:
            logits, packed = self._forward(joiners)
        except Exception:
            if not joining:
                raise
            # a prompt may be what failed: prefilled apart, a failure fails its own requests
            logger.exception("a packed decode step failed; its prompts prefill apart")
            for group in _prefill_groups(joining):
                self._prefill(group)
            joiners, (logits, packed) = [], self._forward([])
        self._kv.advance()
        self.packed_prompts += len(joiners)
        sequences = self._rows + joiners
        tokens = sample_batch([s.sampler for s in sequences], logits)
        ended = [self._accept(s, token) for s, token in zip(sequences, tokens)]
        rows = len(self._rows)
        self._evict([i for i, done in enumerate(ended[:rows]) if done])
        for index, (joiner, done) in enumerate(zip(joiners, ended[rows:])):
            if not done:
                self._kv.add_rows(*packed.prompt_cache(index))
                self._rows.append(joiner)

    def _forward(self, joiners: list[_Sequence]) -> tuple[torch.Tensor, PackedStep | None]:
        """The decode step's forward pass: logits (rows + joiners, vocab), and the packed step
        holding the joiners' keys and values when there are joiners."""
        tokens = [s.last_token for s in self._rows]
        positions = [s.length - 1 for s in self._rows]
        mask, cache = self._kv.grow(), self._kv.cache
        if not joiners:
            out = self._model(input_ids=self._column(tokens), position_ids=self._column(positions),
                              attention_mask=mask, past_key_values=cache, use_cache=True)
            return out.logits[:, -1, :], None
        packed = PackedStep(len(self._rows), [s.request.prompt_ids for s in joiners])
        self._kv.packed = packed
        try:
            with packed_attention_on(self._model):
                out = self._model(**packed.inputs(tokens, positions, self._device),
                                  attention_mask=mask, past_key_values=cache, use_cache=True,
                                  packed_step=packed)
        finally:
            self._kv.packed = None
        return out.logits[0], packed

    def _column(self, values: list[int]) -> torch.Tensor:
        return torch.tensor([[value] for value in values], device=self._device)

    def _evict(self, rows: list[int], final: TokenStep | None = None) -> None:
        """Remove these rows from the batch, sending each a `final` step when given."""
        if not rows:
            return
        for index in rows:
            if final is not None:
                self._rows[index].request.deliver(final)
        gone = set(rows)
        order = self._kv.keep([i for i in range(len(self._rows)) if i not in gone])
        self._rows = [self._rows[i] for i in order]

    def _fail_all(self, exc: Exception) -> None:
        """Hand the error to every running request and start over with an empty batch."""
        for sequence in self._rows:
            sequence.request.deliver(exc)
        self._rows = []
        self._kv = KVBatch(self._device)
