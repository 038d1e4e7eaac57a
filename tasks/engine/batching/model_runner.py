"""Model execution for our batching engine: inputs, forward passes and KV-cache writes.

Like vLLM's ModelRunner it decides nothing: the engine tells it which prompts to prefill and
which rows decode, and it returns logits. A prefill runs prompts left-padded in one pass; a
decode step runs one column for every row, with joining prompts packed into the same pass
(packed.py). The running rows' cache lives in the preallocated KVBatch (kv_cache.py).

ModelRunner runs transformers' own forward, which serves any model; LlamaRunner runs ours
(llama.py) for the Llama family, where every pass is packed and a prefill needs no padding.
"""
from __future__ import annotations

import torch

from tasks.engine.batching.kv_cache import KVBatch
from tasks.engine.batching.llama import LlamaForward, supports
from tasks.engine.batching.packed import PackedStep, can_pack, packed_attention_on
from tasks.engine.batching.prefix_cache import PrefixCache


def left_padded(prompts: list[list[int]], device: torch.device) -> dict[str, torch.Tensor]:
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


class Prefill:
    """A prefill's last-position logits and what its rows need to join the batch's cache."""

    def __init__(self, logits: torch.Tensor, cache, mask: torch.Tensor | None):
        self.logits, self.cache, self.mask = logits, cache, mask


def runner_for(loaded, forward: str = "auto", prefix_cache_tokens: int = 0) -> ModelRunner:
    """Our forward where it serves the model and `forward` is auto, else transformers'. Ours
    keeps up to `prefix_cache_tokens` tokens' KV for prompts that start the same way."""
    if forward == "auto" and supports(loaded):
        return LlamaRunner(loaded, prefix_cache_tokens)
    return ModelRunner(loaded.model, loaded.device, can_pack(loaded))


class ModelRunner:
    """Runs the model over the batch's KV cache; one thread (the engine's loop) calls it.
    `packs`: whether prompts can join a decode step (packed.py)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, packs: bool = False):
        self.model, self.device, self.packs = model, device, packs
        self.kv = KVBatch(device)

    def prefill(self, prompts: list[list[int]]) -> Prefill:
        """One forward pass over the prompts, left-padded."""
        inputs = left_padded(prompts, self.device)
        out = self.model(**inputs, use_cache=True, logits_to_keep=1)
        return Prefill(out.logits[:, -1, :], out.past_key_values, inputs.get("attention_mask"))

    def join_prefilled(self, prefill: Prefill, rows: list[int]) -> None:
        """These rows of a prefill join the running batch's cache."""
        self.kv.add(prefill.cache, rows, prefill.mask)

    def decode(self, tokens: list[int], positions: list[int],
               prompts: list[list[int]]) -> tuple[torch.Tensor, PackedStep | None]:
        """The decode step's forward pass: logits (rows + prompts, vocab), and the packed step
        holding the joining prompts' keys and values when there are any."""
        mask, cache = self.kv.grow(), self.kv.cache
        if not prompts:
            out = self.model(input_ids=self._column(tokens), position_ids=self._column(positions),
                             attention_mask=mask, past_key_values=cache, use_cache=True)
            return out.logits[:, -1, :], None
        packed = PackedStep(len(tokens), prompts)
        self.kv.packed = packed
        try:
            with packed_attention_on(self.model):
                out = self.model(**packed.inputs(tokens, positions, self.device),
                                 attention_mask=mask, past_key_values=cache, use_cache=True,
                                 packed_step=packed)
        finally:
            self.kv.packed = None
        return out.logits[0], packed

    def join_packed(self, packed: PackedStep, index: int) -> None:
        """The `index`-th packed prompt joins the running batch's cache as a new row."""
        self.kv.add_rows(*packed.prompt_cache(index))

    def remember(self, row: int, tokens: list[int]) -> None:
        """A row about to leave the batch, whose cache holds `tokens`: a runner with a prefix
        cache keeps them for later prompts that start the same way."""

    def advance(self) -> None:
        """The decode step's column is written: every row is one longer."""
        self.kv.advance()

    def keep(self, rows: list[int]) -> list[int]:
        """Keep only these rows; returns the new row order (see KVBatch.keep)."""
        return self.kv.keep(rows)

    def reset(self) -> None:
        """Drop every row (after a failed step)."""
        self.kv = KVBatch(self.device)

    @property
    def width(self) -> int:
        return self.kv.width

    def _column(self, values: list[int]) -> torch.Tensor:
        return torch.tensor([[value] for value in values], device=self.device)


class LlamaRunner(ModelRunner):
    """The runner on our own forward (llama.py): a prefill is a packed pass with no rows, and
    a prompt's cached start (prefix_cache.py) is not computed again."""

    def __init__(self, loaded, prefix_cache_tokens: int = 0):
        super().__init__(loaded.model, loaded.device, packs=True)
        self.forward = LlamaForward(loaded, loaded.spec.context_length)
        self.prefixes = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens else None

    def prefill(self, prompts: list[list[int]]) -> Prefill:
        step = self._step(0, prompts)
        return Prefill(self._pass(step, prompts, [], [], None), step, None)

    def join_prefilled(self, prefill: Prefill, rows: list[int]) -> None:
        for index in rows:
            self.join_packed(prefill.cache, index)

    def decode(self, tokens: list[int], positions: list[int],
               prompts: list[list[int]]) -> tuple[torch.Tensor, PackedStep]:
        step = self._step(len(tokens), prompts)
        return self._pass(step, prompts, tokens, positions, self.kv.grow()), step

    def remember(self, row: int, tokens: list[int]) -> None:
        if self.prefixes is not None:
            self.prefixes.keep(tokens, *self.kv.row_cache(row, len(tokens)), copy=True)

    def _step(self, rows: int, prompts: list[list[int]]) -> PackedStep:
        """A packed step for the rows and these prompts, each cut after its cached start."""
        if self.prefixes is None or not prompts:
            return PackedStep(rows, prompts)
        hits = [self.prefixes.lookup(prompt) for prompt in prompts]
        return PackedStep(rows, [p[h.tokens:] if h else p for p, h in zip(prompts, hits)],
                          [h.tokens if h else 0 for h in hits],
                          {index: hit for index, hit in enumerate(hits) if hit})

    def _pass(self, step: PackedStep, prompts: list[list[int]], tokens: list[int],
              positions: list[int], row_mask: torch.Tensor | None) -> torch.Tensor:
        inputs = step.inputs(tokens, positions, self.device)
        logits = self.forward(inputs["input_ids"][0], inputs["position_ids"][0],
                              inputs["logits_to_keep"], step, self.kv, row_mask)
        if self.prefixes is not None:
            for index, prompt in enumerate(prompts):  # a cached start's prompt owns its tensors
                self.prefixes.keep(prompt, *step.prompt_cache(index),
                                   copy=index not in step.context)
        return logits
