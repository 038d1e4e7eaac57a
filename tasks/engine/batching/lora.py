"""LoRA adapters applied per token in our forward (llama.py): requests for different adapters,
and for the bare base, share one pass over one copy of the base weights (the idea of S-LoRA
and punica, in plain torch).

An adapter is read with peft's own loader. For each fused projection of a layer (qkv, out,
gate_up, down) its update to the input x is x @ a.T @ b.T: `a` stacks the A matrices of the
parts it changes, `b` puts each part's B, scaled, at that part's output rows (zeros elsewhere).
At a LoRA's small rank that is two thin GEMMs. A pass whose tokens run with several adapters
puts their updates side by side and masks each token's rank columns to its own adapter's
(StepAdapters), so it too takes two GEMMs a projection. A pass with no adapter pays nothing.

Adapters load on first use; at most `limit` stay loaded, the least recently used out first,
never one that a running request uses (AdapterCache).
"""
from __future__ import annotations

import itertools
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from model_store.adapters import AdapterConfig, AdapterUnavailable, read_adapter_config
from tasks.jobs.contract import LoraAdapter

# the fused projections of our forward, and the peft modules each one holds, in output order
FUSED = {"qkv": ("q_proj", "k_proj", "v_proj"), "out": ("o_proj",),
         "gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",)}
_TENSOR = re.compile(r"\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
_keys = itertools.count(1)

Shapes = dict[str, tuple[int, int]]  # peft module name: (in features, out features)


@dataclass(frozen=True)
class LoraUpdate:
    """One adapter's update to one fused projection."""

    a: torch.Tensor  # (its parts' ranks, in features)
    b: torch.Tensor  # (the projection's out features, its parts' ranks), scaled

    def to(self, dtype: torch.dtype, device: torch.device) -> LoraUpdate:
        return LoraUpdate(self.a.to(device, dtype), self.b.to(device, dtype))


class LoadedAdapter:
    """An adapter's updates per layer (fused projection name: update)."""

    def __init__(self, ref: LoraAdapter, layers: list[dict[str, LoraUpdate]]):
        self.ref, self.layers = ref, layers
        self.key = next(_keys)  # its prefix-cache namespace: a reload never meets its old KV


def read_adapter(path: str, shapes: Shapes, layers: int, dtype: torch.dtype,
                 device: torch.device) -> list[dict[str, LoraUpdate]]:
    """The adapter's updates, or AdapterUnavailable: a config or tensors we cannot serve."""
    from peft.utils import load_peft_weights

    config = read_adapter_config(path)
    try:
        weights = load_peft_weights(path, device="cpu")
    except Exception as exc:  # noqa: BLE001 - any reader error is the adapter's
        raise AdapterUnavailable(f"{path}: cannot read its weights ({exc})") from None
    found: list[dict[str, dict[str, torch.Tensor]]] = [{} for _ in range(layers)]
    for key, tensor in weights.items():
        match = _TENSOR.search(key)
        if match is None or int(match[1]) >= layers or match[3] not in shapes:
            raise AdapterUnavailable(f"{path}: a tensor this model has no place for: {key}")
        found[int(match[1])].setdefault(match[3], {})[match[4]] = tensor
    updates = []
    for layer, parts in enumerate(found):
        fused = {name: _fused_update(config, parts, modules, shapes, layer, path)
                 for name, modules in FUSED.items()}
        updates.append({name: update.to(dtype, device)
                        for name, update in fused.items() if update is not None})
    return updates


def _fused_update(config: AdapterConfig, parts: dict[str, dict[str, torch.Tensor]],
                  modules: tuple[str, ...], shapes: Shapes, layer: int,
                  path: str) -> LoraUpdate | None:
    present = [module for module in modules if module in parts]
    if not present:
        return None
    rank = sum(parts[module]["A"].shape[0] for module in present)
    b = torch.zeros(sum(shapes[module][1] for module in modules), rank)
    a, row, column = [], 0, 0
    for module in modules:
        features_in, features_out = shapes[module]
        if module in parts:
            lora_a, lora_b = parts[module]["A"], parts[module]["B"]
            r = lora_a.shape[0]
            if lora_a.shape != (r, features_in) or lora_b.shape != (features_out, r):
                raise AdapterUnavailable(f"{path}: {module} has shapes {tuple(lora_a.shape)} and "
                                         f"{tuple(lora_b.shape)}: made for another base model")
            a.append(lora_a)
            b[row:row + features_out, column:column + r] = (
                lora_b.float() * config.scaling(_module_path(layer, module), r))
            column += r
        row += features_out
    return LoraUpdate(torch.cat(a).float(), b)


def _module_path(layer: int, module: str) -> str:
    """The module's path as peft's alpha_pattern names it."""
    block = "mlp" if module in FUSED["gate_up"] + FUSED["down"] else "self_attn"
    return f"model.layers.{layer}.{block}.{module}"


@dataclass(frozen=True)
class StackedUpdate:
    """Several adapters' updates to one projection side by side: their A rows stacked, their B
    columns after each other; `owners` gives the adapter (its place in the set) of each rank."""

    a: torch.Tensor  # (their ranks, in features)
    b: torch.Tensor  # (out features, their ranks)
    owners: tuple[int, ...]


def stack_updates(adapters: tuple[LoadedAdapter, ...]) -> list[dict[str, StackedUpdate]]:
    """Per layer and projection, the updates of the adapters that change it, side by side."""
    layouts: dict[tuple[int, ...], tuple[int, ...]] = {}  # one tuple per layout: masks by id
    stacked = []
    for layer in range(len(adapters[0].layers)):
        projections = {}
        for name in FUSED:
            parts = [(i, adapter.layers[layer][name]) for i, adapter in enumerate(adapters)
                     if name in adapter.layers[layer]]
            if parts:
                owners = tuple(i for i, update in parts for _ in range(update.a.shape[0]))
                projections[name] = StackedUpdate(
                    torch.cat([update.a for _, update in parts]),
                    torch.cat([update.b for _, update in parts], dim=1),
                    layouts.setdefault(owners, owners))
        stacked.append(projections)
    return stacked


class StepAdapters:
    """How a pass's tokens take their adapters' updates. With one adapter for every token, its
    own update; with several (or some tokens on the bare base), the present adapters' updates
    side by side, each token's rank columns masked to its own adapter's: two GEMMs a projection
    however many adapters share the step (per-group gathers and scatters cost the overhead-bound
    demo more than half its speed)."""

    def __init__(self, layers: list[dict], owner: torch.Tensor | None):
        self._layers, self._owner = layers, owner  # owner: each token's adapter, -1: none
        self._masks: dict[int, torch.Tensor] = {}

    @classmethod
    def of(cls, adapters: list[LoadedAdapter | None], counts: list[int], device: torch.device,
           cache: AdapterCache) -> StepAdapters | None:
        """The updates of a pass whose consecutive spans of `counts` tokens run with these
        adapters (None: the base); None when no token has one."""
        present = list(dict.fromkeys(adapter for adapter in adapters if adapter is not None))
        if not present:
            return None
        if len(present) == 1 and None not in adapters:
            return cls(present[0].layers, None)
        place = {adapter: index for index, adapter in enumerate(present)}
        owner = [place.get(adapter, -1) for adapter, count in zip(adapters, counts)
                 for _ in range(count)]
        return cls(cache.stacked(tuple(present)), torch.tensor(owner, device=device))

    def add(self, y: torch.Tensor, x: torch.Tensor, layer: int, projection: str) -> torch.Tensor:
        """Add the update of `projection` in `layer` to each token's row of y = base(x)."""
        update = self._layers[layer].get(projection)
        if update is None:
            return y
        h = x @ update.a.T
        if self._owner is not None:
            h = h * self._mask(update.owners, h.dtype)
        return y.addmm_(h, update.b.T)

    def _mask(self, owners: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """1 where a rank column belongs to the token's adapter (one mask per layout)."""
        mask = self._masks.get(id(owners))
        if mask is None:
            columns = torch.tensor(owners, device=self._owner.device)
            mask = self._masks[id(owners)] = (self._owner[:, None] == columns).to(dtype)
        return mask


class AdapterCache:
    """The loaded adapters by (name, path), least recently used first, at most `limit` beyond
    those in use."""

    def __init__(self, limit: int, load: Callable[[str], list[dict[str, LoraUpdate]]]):
        self.limit, self._load = limit, load
        self._loaded: OrderedDict[tuple[str, str], LoadedAdapter] = OrderedDict()
        # the updates of sets of adapters that shared a step, side by side, most recent last
        self._stacks: OrderedDict[tuple[LoadedAdapter, ...], list] = OrderedDict()

    def get(self, ref: LoraAdapter, in_use: set[LoadedAdapter]) -> LoadedAdapter:
        """The adapter, loaded now if it is not; evicts the least recently used beyond the
        limit that no request in `in_use` runs with."""
        key = (ref.name, ref.path)
        adapter = self._loaded.get(key)
        if adapter is None:
            adapter = self._loaded[key] = LoadedAdapter(ref, self._load(ref.path))
        self._loaded.move_to_end(key)
        keep = in_use | {adapter}
        for key in [k for k, loaded in self._loaded.items() if loaded not in keep]:
            if len(self._loaded) <= self.limit:
                break
            del self._loaded[key]
            self._stacks.clear()  # none may keep an evicted adapter's tensors alive
        return adapter

    def stacked(self, adapters: tuple[LoadedAdapter, ...]) -> list[dict[str, StackedUpdate]]:
        """The adapters' updates side by side (stack_updates), kept for the next steps: the
        set of adapters in a batch changes only when a row joins or leaves."""
        stacked = self._stacks.get(adapters)
        if stacked is None:
            stacked = self._stacks[adapters] = stack_updates(adapters)
            while len(self._stacks) > self.limit:
                self._stacks.popitem(last=False)
        self._stacks.move_to_end(adapters)
        return stacked

    def __len__(self) -> int:
        """How many adapters are loaded."""
        return len(self._loaded)
