"""Engines turn a prompt into token steps. Workers build one per process.

The interface is small on purpose: `run()` hands each step of one request to a sink, from
whichever thread the engine likes, and returns when the sequence ends. The sink returns True to
abandon the request (a stop sequence), which frees its slot; setting the `cancel` event stops
it at its next step with finish reason `cancelled`. `iterate()` turns a run into an iterator.
No torch here: a worker whose engine runs in its own process never imports it.
"""
from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import Any, Protocol

from tasks.jobs.contract import FinishReason, SamplingParams


@dataclass(frozen=True)
class EngineStats:
    """What a batching engine can report at scrape time (the hook; see the module docstring)."""

    batch_size: int
    waiting: int | None = None  # requests the engine holds but has not scheduled
    kv_cache_usage: float | None = None  # fraction of KV-cache blocks in use, 0..1
    # bytes allocated on each visible GPU, when the engine runs in a process of its own
    gpu_memory_bytes: tuple[int, ...] | None = None
    prefix_cache: PrefixCacheStats | None = None  # an engine with a prefix cache of its own
    adapters_loaded: int | None = None  # LoRA adapters it holds now, where it serves them


@dataclass(frozen=True)
class PrefixCacheStats:
    """A prefix cache's tokens kept now, and prompt tokens looked up and found since it began."""

    tokens: int
    queried_tokens: int
    hit_tokens: int


@dataclass(frozen=True, slots=True)
class StepLogprobs:
    """The log-probability of a step's token, and the likeliest tokens' (id, log-probability),
    best first: from the model's distribution as the grammar (if any) left it, before penalties
    and temperature, as vLLM's raw logprobs."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class TokenStep:
    """One decode step: a new token, and the finish reason when this step ends the sequence."""

    token_id: int | None  # None when the step only reports the end (end-of-sequence, cancel)
    finish: FinishReason | None = None
    logprobs: StepLogprobs | None = None  # the token's, when its request asked for them


class InvalidSchema(ValueError):
    """The request's JSON Schema cannot be compiled into a grammar; the message says why."""


CANCELLED_STEP = TokenStep(None, FinishReason.CANCELLED)


StepSink = Callable[[TokenStep], "bool | None"]  # True: abandon the request now
EndCallback = Callable[[BaseException | None], None]  # a request's end: its error, or None


@dataclass(eq=False)
class Request:
    """A submitted request, the sink its steps go to, and what to call when it ends."""

    prompt_ids: list[int]
    params: SamplingParams
    cancel: threading.Event
    sink: StepSink
    on_end: EndCallback
    ended: bool = False  # it finished, its sink asked to stop or failed: nothing more reaches it
    error: BaseException | None = None
    constraint: Any = None  # its JSON Schema's grammar (tasks/engine/structured.py), if any
    adapter: Any = None  # its LoRA adapter (params.lora) as the engine loaded it, if any

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


def run_submitted(submit, prompt_ids: list[int], params: SamplingParams,
                  cancel: threading.Event, sink: StepSink) -> None:
    """`Engine.run` for an engine with a loop of its own: `submit(prompt_ids, params, cancel,
    sink, on_end)` the request, wait until it ends, and raise its error if it failed."""
    ended, errors = threading.Event(), []

    def on_end(error: BaseException | None) -> None:
        errors.append(error)
        ended.set()

    submit(prompt_ids, params, cancel, sink, on_end)
    ended.wait()
    if errors[0] is not None:
        raise errors[0]


class Engine(Protocol):
    def run(self, prompt_ids: list[int], params: SamplingParams, cancel: threading.Event,
            sink: StepSink) -> None:
        """Generate for one request, handing each step to `sink`, until the sequence ends or
        the sink returns True; raises if generation fails. No step reaches the sink after this
        returns."""

    def close(self) -> None:
        """Release the engine's threads at worker shutdown."""

    def stats(self) -> EngineStats:
        """Batch size, waiting requests and KV-cache use now, for the worker's metrics."""


def iterate(engine: Engine, prompt_ids: list[int], params: SamplingParams,
            cancel: threading.Event | None = None) -> Iterator[TokenStep]:
    """Submit a request now and iterate its steps (closing the iterator abandons it).

    For tests and tools: it costs a thread per request, which the worker's runner avoids.
    """
    steps: queue.SimpleQueue = queue.SimpleQueue()
    closed = threading.Event()

    def sink(step: TokenStep) -> bool:
        steps.put(step)
        return closed.is_set()

    def produce() -> None:
        try:
            engine.run(prompt_ids, params, cancel or threading.Event(), sink)
            steps.put(None)
        except Exception as exc:  # handed to the reader
            steps.put(exc)

    threading.Thread(target=produce, name="dawet-iterate", daemon=True).start()
    return _read(steps, closed)


def _read(steps: queue.SimpleQueue, closed: threading.Event) -> Iterator[TokenStep]:
    try:
        while (item := steps.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        closed.set()


def drive(steps: Iterator[TokenStep], sink: StepSink) -> None:
    """Hand steps to `sink` until the sequence ends or the sink asks to stop."""
    with closing(steps):
        for step in steps:
            if sink(step) or step.finish is not None:
                return


def step_for(token: int, produced: int, params: SamplingParams, eos_ids: frozenset[int],
             logprobs: StepLogprobs | None = None) -> TokenStep:
    """The step for the `produced`-th sampled token: EOS stops (a grammar ends a structured
    reply by allowing only EOS), the limit ends with `length`."""
    if token in eos_ids:
        return TokenStep(None, FinishReason.STOP)
    at_limit = produced == params.max_new_tokens
    return TokenStep(token, FinishReason.LENGTH if at_limit else None, logprobs)


def cuda_memory_allocated() -> tuple[int, ...]:
    """Bytes torch has allocated on each visible GPU of this process; () without CUDA."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return ()
    return tuple(torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count()))
