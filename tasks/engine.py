"""Engines turn a prompt into a stream of token ids. Workers build one per process.

The interface is small on purpose: `stream()` yields TokenSteps and stops with a finish
reason; closing the iterator early (a stop sequence) frees the request's slot, and setting
the `cancel` event stops it at its next step with finish reason `cancelled`.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from model_store.loader import LoadedModel
from tasks.contract import FinishReason, SamplingParams
from tasks.sampling import Sampler


@dataclass(frozen=True)
class TokenStep:
    """One decode step: a new token, and the finish reason when this step ends the sequence."""

    token_id: int | None  # None when the step only reports the end (end-of-sequence, cancel)
    finish: FinishReason | None = None


CANCELLED_STEP = TokenStep(None, FinishReason.CANCELLED)


class Engine(Protocol):
    def stream(self, prompt_ids: list[int], params: SamplingParams,
               cancel: threading.Event | None = None) -> Iterator[TokenStep]:
        """Generate for one request; close the iterator to abandon it, set `cancel` to stop it."""

    def close(self) -> None:
        """Release the engine's threads at worker shutdown."""


def step_for(token: int, produced: int, params: SamplingParams,
             eos_ids: frozenset[int]) -> TokenStep:
    """The step for the `produced`-th sampled token: EOS stops, the limit ends with `length`."""
    if token in eos_ids:
        return TokenStep(None, FinishReason.STOP)
    at_limit = produced == params.max_new_tokens
    return TokenStep(token, FinishReason.LENGTH if at_limit else None)


class SequentialEngine:
    """One request at a time through the model, with a KV cache: the simple baseline."""

    def __init__(self, loaded: LoadedModel):
        self._loaded = loaded
        self._lock = threading.Lock()

    def close(self) -> None:
        """Nothing to release: the engine runs on its callers' threads."""

    def stream(self, prompt_ids: list[int], params: SamplingParams,
               cancel: threading.Event | None = None) -> Iterator[TokenStep]:
        with self._lock:
            yield from self._decode(prompt_ids, params, cancel or threading.Event())

    def _decode(self, prompt_ids: list[int], params: SamplingParams,
                cancel: threading.Event) -> Iterator[TokenStep]:
        model, device = self._loaded.model, self._loaded.device
        eos_ids = self._loaded.tokenizer.eos_token_ids
        sampler = Sampler(params, prompt_ids, eos_ids, device)
        step_input, cache = torch.tensor([prompt_ids], device=device), None
        for produced in range(1, params.max_new_tokens + 1):
            if cancel.is_set():
                yield CANCELLED_STEP
                return
            with torch.inference_mode():
                out = model(input_ids=step_input, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            step = step_for(sampler.next_token(out.logits[:, -1, :]), produced, params, eos_ids)
            yield step
            if step.finish is not None:
                return
            step_input = torch.tensor([[step.token_id]], device=device)
