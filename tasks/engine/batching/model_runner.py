"""Model execution for our batching engine: inputs, forward passes and KV-cache writes.

Like vLLM's ModelRunner it decides nothing: the engine tells it which prompts to prefill and
which rows decode, and it returns logits. A prefill runs prompts left-padded in one pass; a
decode step runs one column for every row, with joining prompts packed into the same pass
(packed.py). On transformers' forward the running rows' cache is a padded window (KVBatch,
kv_cache.py); on ours every sequence's tokens hold slots of a pool sized at the budget
(kv_pool.py).

ModelRunner runs transformers' own forward, which serves any model; LlamaRunner runs ours
(llama.py) for the Llama family, where every pass is packed and a prefill needs no padding, and
where each sequence may run with a LoRA adapter of its own (lora.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from model_store.adapters import AdapterUnavailable
from tasks.engine.batching.kv_cache import KVBatch
from tasks.engine.batching.kv_pool import KVPool, PassSlots, SlotTable
from tasks.engine.batching.llama import LlamaForward, supports
from tasks.engine.batching.lora import AdapterCache, LoadedAdapter, StepAdapters, read_adapter
from tasks.engine.batching.packed import PackedStep, can_pack, packed_attention_on
from tasks.engine.batching.prefix_cache import PrefixCache
from tasks.jobs.contract import LoraAdapter

Adapters = list[LoadedAdapter | None]  # a pass's sequences' LoRA adapters (None: the base's)


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


def runner_for(loaded, forward: str = "auto", kv_cache_tokens: int = 65_536,
               prefix_cache_tokens: int = 0, max_loaded_adapters: int = 8) -> ModelRunner:
    """Our forward where it serves the model and `forward` is auto, else transformers'. Ours
    holds `kv_cache_tokens` tokens' KV in its pool, keeps up to `prefix_cache_tokens` tokens'
    KV for prompts that start the same way, and up to `max_loaded_adapters` LoRA adapters
    beyond those running."""
    if forward == "auto" and supports(loaded):
        return LlamaRunner(loaded, kv_cache_tokens, prefix_cache_tokens, max_loaded_adapters)
    return ModelRunner(loaded.model, loaded.device, can_pack(loaded))


@dataclass
class Computed:
    """A prompt's first `tokens` tokens, computed by earlier steps: their keys and values are in
    these pool slots (kv_pool.py), which the prompt owns until it joins the batch or is
    released."""

    tokens: int
    slots: list[int]


@dataclass
class PromptPart:
    """What a step computes of a prompt: its tokens from `start`'s end (those computed already,
    with their keys and values; None: from the first) to `end` (None: its last). The step's
    logits for it are its next token's only when the part is final."""

    ids: list[int]
    start: Computed | None = None
    end: int | None = None
    adapter: LoadedAdapter | None = None  # the LoRA adapter its prompt runs with

    def __post_init__(self):
        self.end = len(self.ids) if self.end is None else self.end

    @property
    def done(self) -> int:
        return self.start.tokens if self.start is not None else 0

    @property
    def final(self) -> bool:
        return self.end == len(self.ids)


class ModelRunner:
    """Runs the model over the batch's KV cache; one thread (the engine's loop) calls it.
    `packs`: whether prompts can join a decode step (packed.py); `chunks`: whether a step can
    compute part of a prompt (PromptPart), for a chunked prefill."""

    chunks = False
    paged = False  # whether a request is charged its reservation (kv_pool.py), not the window
    prefixes: PrefixCache | None = None  # the KV of earlier sequences, where the runner keeps it
    adapters: AdapterCache | None = None  # the LoRA adapters loaded, where the runner serves them

    def __init__(self, model: torch.nn.Module, device: torch.device, packs: bool = False):
        self.model, self.device, self.packs = model, device, packs
        self.kv = KVBatch(device)

    def adapter(self, ref: LoraAdapter, in_use: set[LoadedAdapter]) -> LoadedAdapter:
        """The LoRA adapter, loaded (keeping those `in_use`), for a request that runs with it."""
        raise AdapterUnavailable("LoRA adapters per request run on our Llama-family forward "
                                 "only; this model runs on transformers' forward")

    def prefill(self, prompts: list[list[int]], adapters: Adapters | None = None) -> Prefill:
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

    def decode_parts(self, tokens: list[int], positions: list[int], parts: list[PromptPart],
                     row_adapters: Adapters | None = None
                     ) -> tuple[torch.Tensor, PackedStep | None]:
        """decode(), for prompts given as parts; here every part is a whole prompt."""
        assert all(part.start is None and part.final for part in parts)
        return self.decode(tokens, positions, [part.ids for part in parts])

    def cached_start(self, prompt: list[int],
                     adapter: LoadedAdapter | None = None) -> Computed | None:
        """The start of `prompt` (run with `adapter`) whose keys and values are cached already,
        held for the prompt until it joins the batch or is released: none here."""
        return None

    def started(self, packed: PackedStep, index: int, part: PromptPart) -> Computed:
        """A non-final part's prompt as its next part starts from (a runner that chunks)."""
        raise NotImplementedError("this runner computes whole prompts only")

    def join_packed(self, packed: PackedStep, index: int) -> None:
        """The `index`-th packed prompt joins the running batch's cache as a new row."""
        self.kv.add_rows(*packed.prompt_cache(index))

    def discard(self, packed: PackedStep, index: int) -> None:
        """The `index`-th prompt of the pass ended at its first token: it never joins."""

    def release(self, start: Computed | None) -> None:
        """A prompt dropped before its last part: what it computed is freed."""

    def remember(self, row: int, tokens: list[int], adapter: LoadedAdapter | None = None) -> None:
        """A row about to leave the batch, whose cache holds the first of `tokens` (all but a
        last sampled one): a runner with a prefix cache keeps them for later prompts that start
        the same way (with the same adapter)."""

    def advance(self) -> None:
        """The decode step's column is written: every row is one longer."""
        self.kv.advance()

    def keep(self, rows: list[int]) -> list[int]:
        """Keep only these rows; returns the new row order (see KVBatch.keep)."""
        return self.kv.keep(rows)

    def reset(self) -> None:
        """Drop every row (after a failed step)."""
        self.kv = KVBatch(self.device)

    def kv_tokens(self) -> int:
        """Tokens' worth of KV the cache holds now: here rows x the window, padding included."""
        return self.kv.rows * self.kv.width

    def _column(self, values: list[int]) -> torch.Tensor:
        return torch.tensor([[value] for value in values], device=self.device)


class LlamaRunner(ModelRunner):
    """The runner on our own forward (llama.py), over a pool of KV slots sized at the budget
    (kv_pool.py): a prefill is a packed pass with no rows; a prompt's cached start
    (prefix_cache.py) shares the cache's slots, not computed again, and a long prompt can be
    computed a part per step (chunked prefill: PromptPart)."""

    chunks = True
    paged = True

    def __init__(self, loaded, kv_cache_tokens: int = 65_536, prefix_cache_tokens: int = 0,
                 max_loaded_adapters: int = 8):
        self.model, self.device, self.packs = loaded.model, loaded.device, True
        self.forward = forward = LlamaForward(loaded, loaded.spec.context_length)
        self.pool = KVPool(len(forward.layers), forward.kv_heads, forward.head_dim,
                           kv_cache_tokens, forward.dtype, loaded.device)
        self.table = SlotTable(loaded.device)
        self._opened: list[int] | None = None  # the rows' slots for a step not yet advanced
        self._placed: list[list[int]] = []  # the last pass's prompts' slots, up to each part's end
        self.prefixes = (PrefixCache(prefix_cache_tokens, self.pool) if prefix_cache_tokens
                         else None)
        self.adapters = AdapterCache(max_loaded_adapters, lambda path: read_adapter(
            path, forward.shapes, len(forward.layers), forward.dtype, loaded.device))

    def adapter(self, ref: LoraAdapter, in_use: set[LoadedAdapter]) -> LoadedAdapter:
        return self.adapters.get(ref, in_use)

    def cached_start(self, prompt: list[int],
                     adapter: LoadedAdapter | None = None) -> Computed | None:
        hit = (self.prefixes.lookup(prompt, _namespace(adapter))
               if self.prefixes is not None else None)
        if hit is None:
            return None
        self.pool.share(hit.slots)  # the prompt's now: eviction cannot free them under it
        return Computed(hit.tokens, hit.slots)

    def prefill(self, prompts: list[list[int]], adapters: Adapters | None = None) -> Prefill:
        adapters = adapters or [None] * len(prompts)
        parts = [PromptPart(prompt, self.cached_start(prompt, adapter), adapter=adapter)
                 for prompt, adapter in zip(prompts, adapters)]
        step = self._step(0, parts)
        try:
            return Prefill(self._pass(step, parts, [], [], []), step, None)
        except BaseException:
            for part in parts:  # the cached starts it took: no prompt of it goes on
                self.release(part.start)
            raise

    def join_prefilled(self, prefill: Prefill, rows: list[int]) -> None:
        for index in rows:
            self.join_packed(prefill.cache, index)

    def decode(self, tokens: list[int], positions: list[int],
               prompts: list[list[int]]) -> tuple[torch.Tensor, PackedStep]:
        return self.decode_parts(tokens, positions,
                                 [PromptPart(prompt, self.cached_start(prompt)) for prompt in prompts])

    def decode_parts(self, tokens: list[int], positions: list[int], parts: list[PromptPart],
                     row_adapters: Adapters | None = None) -> tuple[torch.Tensor, PackedStep]:
        step = self._step(len(tokens), parts)
        return self._pass(step, parts, tokens, positions,
                          row_adapters or [None] * len(tokens)), step

    def started(self, packed: PackedStep, index: int, part: PromptPart) -> Computed:
        return Computed(part.end, self._placed[index])

    def join_packed(self, packed: PackedStep, index: int) -> None:
        self.table.add(self._placed[index])

    def discard(self, packed: PackedStep, index: int) -> None:
        self.pool.release(self._placed[index])

    def release(self, start: Computed | None) -> None:
        if start is not None:
            self.pool.release(start.slots)

    def remember(self, row: int, tokens: list[int], adapter: LoadedAdapter | None = None) -> None:
        if self.prefixes is not None:
            self._keep_prefix(tokens, self.table.slots(row), adapter)

    def advance(self) -> None:
        self.table.advance()
        self._opened = None

    def keep(self, rows: list[int]) -> list[int]:
        order, dropped = self.table.keep(rows)
        for slots in dropped:
            self.pool.release(slots)
        return order

    def reset(self) -> None:
        if self.prefixes is not None:
            self.prefixes.clear()
        self.pool.release_all()
        self.table, self._opened, self._placed = SlotTable(self.device), None, []

    def kv_tokens(self) -> int:
        return self.pool.used

    def _step(self, rows: int, parts: list[PromptPart]) -> PackedStep:
        """A packed step for the rows and these prompts' parts, each after its start."""
        return PackedStep(rows, [part.ids[part.done:part.end] for part in parts],
                          [part.done for part in parts])

    def _pass(self, step: PackedStep, parts: list[PromptPart], tokens: list[int],
              positions: list[int], row_adapters: Adapters) -> torch.Tensor:
        inputs = step.inputs(tokens, positions, self.device)
        adapters = StepAdapters.of([*row_adapters, *(part.adapter for part in parts)],
                                   [1] * len(tokens) + [part.end - part.done for part in parts],
                                   self.device, self.adapters)
        fresh: list[int] = []  # the slots this pass takes for its prompts
        try:
            slots = self._place(parts, len(tokens), fresh)
            logits = self.forward(inputs["input_ids"][0], inputs["position_ids"][0],
                                  inputs["logits_to_keep"], step, self.pool, slots, adapters)
        except BaseException:
            self.pool.release(fresh)  # a Computed start stays its prompt's; the rows' column too
            self._placed = []
            raise
        if self.prefixes is not None:
            for part, placed in zip(parts, self._placed):
                if part.final:
                    self._keep_prefix(part.ids, placed, part.adapter)
        return logits

    def _place(self, parts: list[PromptPart], rows: int, fresh: list[int]) -> PassSlots:
        """Take slots for the pass's tokens: a new column for the rows (the one opened before,
        if the step is retried), and each prompt part's, after its start's slots."""
        written, row_slots, row_bias, contexts = [], None, None, []
        if rows:
            self._open_column(rows)
            row_slots, row_bias = self.table.open_column(self._opened)
            written += self._opened
        self._placed = []
        for part in parts:
            before = part.start.slots if part.start is not None else []
            new = self.pool.allocate(part.end - part.done)
            fresh += new
            written += new
            self._placed.append(before + new)
            contexts.append(torch.tensor(before + new, device=self.device) if before else None)
        return PassSlots(torch.tensor(written, device=self.device), row_slots, row_bias,
                         contexts)

    def _open_column(self, rows: int) -> None:
        """Slots for the rows' next tokens. A step retried (its pass failed) reuses those it
        opened; rows that joined meanwhile (prefilled apart) are the last ones."""
        opened = self._opened or []
        if len(opened) < rows:
            opened = opened + self.pool.allocate(rows - len(opened))
        elif len(opened) > rows:
            self.pool.release(opened[rows:])
        self._opened = opened[:rows]

    def _keep_prefix(self, tokens: list[int], slots: list[int],
                     adapter: LoadedAdapter | None) -> None:
        """Keep a sequence's computed tokens in the prefix cache: its slots."""
        self.prefixes.keep(tokens, slots, _namespace(adapter))


def _namespace(adapter: LoadedAdapter | None) -> int:
    """The prefix cache's namespace of a sequence: its KV depends on its adapter."""
    return adapter.key if adapter is not None else 0
