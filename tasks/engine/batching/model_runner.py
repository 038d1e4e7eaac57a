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


def runner_for(loaded, forward: str = "auto") -> ModelRunner:
    """Our forward where it serves the model and `forward` is auto, else transformers'."""
    if forward == "auto" and supports(loaded):
        return LlamaRunner(loaded)
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
    """The runner on our own forward (llama.py): a prefill is a packed pass with no rows."""

    def __init__(self, loaded):
        super().__init__(loaded.model, loaded.device, packs=True)
        self.forward = LlamaForward(loaded, loaded.spec.context_length)

    def prefill(self, prompts: list[list[int]]) -> Prefill:
        step = PackedStep(0, prompts)
        return Prefill(self._pass(step, [], [], None), step, None)

    def join_prefilled(self, prefill: Prefill, rows: list[int]) -> None:
        for index in rows:
            self.join_packed(prefill.cache, index)

    def decode(self, tokens: list[int], positions: list[int],
               prompts: list[list[int]]) -> tuple[torch.Tensor, PackedStep]:
        step = PackedStep(len(tokens), prompts)
        return self._pass(step, tokens, positions, self.kv.grow()), step

    def _pass(self, step: PackedStep, tokens: list[int], positions: list[int],
              row_mask: torch.Tensor | None) -> torch.Tensor:
        inputs = step.inputs(tokens, positions, self.device)
        return self.forward(inputs["input_ids"][0], inputs["position_ids"][0],
                            inputs["logits_to_keep"], step, self.kv, row_mask)
