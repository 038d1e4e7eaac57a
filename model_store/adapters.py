"""What a LoRA adapter served per request must be, read from its adapter_config.json (no torch:
the API checks an adapter added at run time with it, and the engines before they load one).

Our forward (tasks/engine/batching/lora.py) applies plain LoRA to the projections of attention
and MLP: peft's `LORA` type, without DoRA, bias terms or modules saved whole (which would
change the base's weights for every request in the batch).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

PROJECTIONS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                         "down_proj"})


class AdapterUnavailable(ValueError):
    """The adapter cannot be served here; the message says why."""


@dataclass(frozen=True)
class AdapterConfig:
    rank: int
    alpha: float
    rslora: bool  # scale by alpha / sqrt(rank) instead of alpha / rank
    targets: frozenset[str]
    alpha_pattern: dict[str, float]

    def scaling(self, module: str, rank: int) -> float:
        """The update's scale for `module` (its path in the model) at its own rank."""
        alpha = next((value for pattern, value in self.alpha_pattern.items()
                      if module == pattern or module.endswith("." + pattern)), self.alpha)
        return alpha / (rank ** 0.5 if self.rslora else rank)


def read_adapter_config(path: str | Path) -> AdapterConfig:
    """The adapter's config, or AdapterUnavailable naming what we cannot serve."""
    try:
        raw = json.loads((Path(path) / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise AdapterUnavailable(f"{path}: no readable adapter_config.json ({exc})") from None
    if raw.get("peft_type") != "LORA":
        raise AdapterUnavailable(f"{path}: a {raw.get('peft_type')} adapter; only LoRA is served")
    unsupported = [name for name, on in (("use_dora", raw.get("use_dora")),
                                         ("modules_to_save", raw.get("modules_to_save")),
                                         ("bias", raw.get("bias", "none") != "none"),
                                         ("lora_bias", raw.get("lora_bias")),
                                         ("fan_in_fan_out", raw.get("fan_in_fan_out"))) if on]
    if unsupported:
        raise AdapterUnavailable(f"{path}: {', '.join(unsupported)} is not supported per request")
    targets = raw.get("target_modules") or []
    targets = frozenset([targets] if isinstance(targets, str) else targets)
    if not targets or not targets <= PROJECTIONS:
        raise AdapterUnavailable(f"{path}: targets {sorted(targets)}; per-request adapters may "
                                 f"target only {sorted(PROJECTIONS)}")
    return AdapterConfig(int(raw["r"]), float(raw.get("lora_alpha", raw["r"])),
                         bool(raw.get("use_rslora")), targets,
                         {k: float(v) for k, v in (raw.get("alpha_pattern") or {}).items()})
