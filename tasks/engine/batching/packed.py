"""A decode step that also prefills the prompts joining the batch, in one forward pass.

Under load, requests reach a busy engine one or two at a time, each between two decode steps.
A prefill of their own costs a whole forward pass, and on CPU most of a pass is per-op
overhead: one short prompt costs about what a 16-row decode step costs, and every running row
waits for it. So the prompts that join ride along with the step instead (as vLLM's chunked
prefill does, without the chunking): the input is one packed sequence, the running rows' next
tokens first (one each), then each joining prompt's tokens, every token with its own position
id. Norms, MLPs and projections work per token and take the packed sequence as it is; only
attention needs the parts apart: each row's token attends to its cache window (as in a plain
decode step), each prompt causally to itself. `packed_attention` does that, and the batch's
cache (tasks/engine/batching/kv_cache.py) writes the rows' new column and keeps the prompts' keys and values
here, for the prompts that go on to join the batch.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from model_store.registry import Backend

ATTENTION = "dawet_packed"


@dataclass
class PackedStep:
    """One packed forward pass: `rows` running rows' tokens, then the joining prompts'.

    A prompt whose start was computed already (a cached prefix or an earlier part, on our
    forward only) passes only its rest: the tokens before it are its offset."""

    rows: int
    prompts: list[list[int]]
    offsets: list[int] = field(default_factory=list)  # per prompt: tokens before it; none: 0
    spans: list[tuple[int, int]] = field(init=False)  # each prompt's [start, end) after the rows
    keys: dict[int, torch.Tensor] = field(default_factory=dict)  # layer: (1, heads, tokens, dim)
    values: dict[int, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        ends = list(itertools.accumulate(len(prompt) for prompt in self.prompts))
        self.spans = [(end - len(prompt), end) for prompt, end in zip(self.prompts, ends)]
        self.offsets = self.offsets or [0] * len(self.prompts)

    def inputs(self, row_tokens: list[int], row_positions: list[int],
               device: torch.device) -> dict[str, torch.Tensor]:
        """The packed input ids and position ids, and which positions' logits to keep: each
        row's token, then each prompt's last."""
        ids = row_tokens + [token for prompt in self.prompts for token in prompt]
        positions = row_positions + [p for prompt, offset in zip(self.prompts, self.offsets)
                                     for p in range(offset, offset + len(prompt))]
        keep = list(range(self.rows)) + [self.rows + end - 1 for _, end in self.spans]
        return {"input_ids": torch.tensor([ids], device=device),
                "position_ids": torch.tensor([positions], device=device),
                "logits_to_keep": torch.tensor(keep, device=device)}

    def hold(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Hold a layer's prompt keys and values (1, heads, prompt tokens, dim)."""
        self.keys[layer], self.values[layer] = keys, values

    def prompt_cache(self, index: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Prompt `index`'s keys and values, (1, heads, its length, dim) for each layer: views
        of the step's tensors."""
        layers = sorted(self.keys)
        start, end = self.spans[index]
        return ([self.keys[i][:, :, start:end] for i in layers],
                [self.values[i][:, :, start:end] for i in layers])


def packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, attention_mask: torch.Tensor | None,
                     scaling: float | None = None, dropout: float = 0.0,
                     packed_step: PackedStep | None = None, **kwargs):
    """Attention for a packed step. `key`, `value` and `attention_mask` are the running rows'
    cache window (rows, heads, columns, dim) and its mask; the prompts' own keys and values
    are in `packed_step`. Returns (1, tokens, heads, dim), as transformers' sdpa does."""
    step = packed_step
    if step is None:  # not a packed pass
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout,
                                      scaling, **kwargs)
    rows = query[0, :, :step.rows].transpose(0, 1).unsqueeze(2)  # (rows, heads, 1, dim)
    out, _ = sdpa_attention_forward(module, rows, key, value, attention_mask, scaling=scaling)
    parts = [out.transpose(0, 1)]
    keys, values = step.keys[module.layer_idx], step.values[module.layer_idx]
    for start, end in step.spans:
        prompt = query[:, :, step.rows + start:step.rows + end]
        out, _ = sdpa_attention_forward(module, prompt, keys[:, :, start:end],
                                        values[:, :, start:end], None, scaling=scaling)
        parts.append(out)
    return torch.cat(parts, dim=1), None


AttentionInterface.register(ATTENTION, packed_attention)


def can_pack(loaded) -> bool:
    """Whether the loaded model (model_store.loader.LoadedModel) runs transformers' own
    attention layers with sdpa, which a packed pass stands in for. Eager or flash attention are
    left alone, and so is unsloth, which patches the attention layers themselves."""
    return (loaded.backend is Backend.TRANSFORMERS
            and getattr(loaded.model.config, "_attn_implementation", None) == "sdpa")


@contextmanager
def packed_attention_on(model: torch.nn.Module) -> Iterator[None]:
    """Route the model's attention through packed_attention for one forward pass."""
    config = model.config
    previous, config._attn_implementation = config._attn_implementation, ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous
