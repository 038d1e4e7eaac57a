"""The one-at-a-time engine: the simple baseline that batching is measured against."""
from __future__ import annotations

import threading
from collections.abc import Iterator

import torch

from model_store.adapters import AdapterUnavailable
from model_store.loader import LoadedModel
from tasks.jobs.contract import SamplingParams
from tasks.engine.interface import CANCELLED_STEP, StepSink, TokenStep, drive, step_for
from tasks.engine.interface import EngineStats
from tasks.engine.sampling import Sampler
from tasks.engine.structured import Grammars


class SequentialEngine:
    """One request at a time through the model, with a KV cache: the simple baseline."""

    def __init__(self, loaded: LoadedModel):
        self._loaded = loaded
        self._grammars = Grammars.for_model(loaded)
        self._lock = threading.Lock()
        self._callers = 0  # requests running or waiting for the lock
        self._count_lock = threading.Lock()

    def close(self) -> None:
        """Nothing to release: the engine runs on its callers' threads."""

    def stats(self) -> EngineStats:
        """One request decodes at a time; the others wait for it."""
        running = int(self._lock.locked())
        return EngineStats(running, max(self._callers - running, 0))

    def run(self, prompt_ids: list[int], params: SamplingParams, cancel: threading.Event,
            sink: StepSink) -> None:
        """Generate on the caller's thread; one request at a time."""
        if params.lora is not None:
            raise AdapterUnavailable("the sequential engine serves no LoRA adapter per request; "
                                     "the batching engine does (DAWET_ENGINE=batching)")
        self._count(+1)
        try:
            with self._lock:
                drive(self._decode(prompt_ids, params, cancel), sink)
        finally:
            self._count(-1)

    def _count(self, change: int) -> None:
        with self._count_lock:
            self._callers += change

    def _decode(self, prompt_ids: list[int], params: SamplingParams,
                cancel: threading.Event) -> Iterator[TokenStep]:
        model, device = self._loaded.model, self._loaded.device
        eos_ids = self._loaded.tokenizer.eos_token_ids
        sampler = Sampler(params, prompt_ids, eos_ids, device, self._grammars.constraint(params))
        step_input, cache = torch.tensor([prompt_ids], device=device), None
        for produced in range(1, params.max_new_tokens + 1):
            if cancel.is_set():
                yield CANCELLED_STEP
                return
            with torch.inference_mode():
                out = model(input_ids=step_input, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            token = sampler.next_token(out.logits[:, -1, :])
            step = step_for(token, produced, params, eos_ids, sampler.logprobs)
            yield step
            if step.finish is not None:
                return
            step_input = torch.tensor([[step.token_id]], device=device)
