"""The model registry: what each served model is, read from a TOML file. No torch here."""
from __future__ import annotations

import tomllib
from enum import Enum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Backend(str, Enum):
    AUTO = "auto"
    TRANSFORMERS = "transformers"
    UNSLOTH = "unsloth"
    VLLM = "vllm"  # vLLM's engine (tasks/engine/vllm.py), not loaded by this module


class Quantization(str, Enum):
    NONE = "none"
    INT8 = "8bit"
    INT4 = "4bit"


class GenerationDefaults(BaseModel):
    """Sampling values used when a request leaves them out."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(128, ge=1)
    min_new_tokens: int = Field(0, ge=0)
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.1, gt=0.0, le=2.0)


MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class AdapterEntry(BaseModel):
    """A LoRA adapter served under a name of its own over its entry's base weights: the
    entry's workers batch its requests with the base's and the other adapters'."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=MODEL_NAME)
    path: str  # a peft LoRA adapter directory
    system_prompt: str | None = None  # None: the base entry's
    defaults: GenerationDefaults | None = None  # None: the base entry's


class ModelSpec(BaseModel):
    """One served model: weights, adapter, backend, limits and prompt defaults."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=MODEL_NAME)
    path: str  # a local directory (relative to the registry file) or a hub id
    adapter: str | None = None  # a peft LoRA adapter directory, merged into the weights at load
    # LoRA adapters served per request over these weights, each under its own name
    adapters: list[AdapterEntry] = []
    # Set on an adapter's own spec (the registry derives it): the entry whose workers serve it,
    # and the adapter they apply to its requests only.
    base_model: str | None = None
    lora: str | None = None
    backend: Backend = Backend.AUTO
    quantization: Quantization = Quantization.NONE
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    context_length: int = Field(2048, ge=16)
    max_new_tokens_limit: int = Field(1024, ge=1)
    system_prompt: str | None = None
    # How replies write tool calls (api/tool_calls.py); None: read from the chat template.
    tool_parser: Literal["hermes", "llama3_json"] | None = None
    defaults: GenerationDefaults = GenerationDefaults()

    @model_validator(mode="after")
    def _defaults_within_limit(self) -> "ModelSpec":
        if self.defaults.max_new_tokens > self.max_new_tokens_limit:
            raise ValueError(f"{self.name}: defaults.max_new_tokens exceeds max_new_tokens_limit")
        if self.adapter and self.adapters:
            raise ValueError(f"{self.name}: `adapter` merges one adapter into the weights and "
                             "`adapters` serves several over them; an entry takes one of the two")
        return self

    @property
    def served_by(self) -> str:
        """The registry entry whose workers serve this model: itself, or an adapter's base."""
        return self.base_model or self.name

    @property
    def queue(self) -> str:
        """The Celery queue this model's workers consume."""
        return f"dawet.{self.served_by}"

    def adapter_spec(self, entry: AdapterEntry) -> "ModelSpec":
        """The spec of an adapter served over this entry's weights (from the registry file, or
        added at run time)."""
        if self.adapter or self.base_model:
            raise ValueError(f"{self.name} cannot serve adapters over it: it is "
                             + ("an adapter itself" if self.base_model else "merged with one"))
        return self.model_copy(update={
            "name": entry.name, "lora": entry.path, "base_model": self.name, "adapters": [],
            "system_prompt": entry.system_prompt or self.system_prompt,
            "defaults": entry.defaults or self.defaults})


class Registry:
    """The served models by name, in file order."""

    def __init__(self, models: list[ModelSpec], default: str | None = None):
        if not models:
            raise ValueError("the model registry lists no models")
        every = [served for spec in models  # each entry, then the adapters it serves
                 for served in [spec, *(spec.adapter_spec(entry) for entry in spec.adapters)]]
        self.models = {spec.name: spec for spec in every}
        if len(self.models) < len(every):
            raise ValueError("two models or adapters in the registry share a name")
        self.default_name = default or models[0].name
        if self.default_name not in self.models:
            raise ValueError(f"default model {self.default_name!r} is not in the registry")

    def get(self, name: str | None) -> ModelSpec | None:
        """Return the named model (the default for None), or None if unknown."""
        return self.models.get(name or self.default_name)

    @property
    def default(self) -> ModelSpec:
        return self.models[self.default_name]

    def serving(self, name: str | None) -> ModelSpec | None:
        """The entry whose workers serve the named model (an adapter's base), or None."""
        spec = self.get(name)
        return spec if spec is None or spec.base_model is None else self.models[spec.base_model]

    @property
    def entries(self) -> list[ModelSpec]:
        """The models that workers serve: every model but the adapters over them."""
        return [spec for spec in self.models.values() if spec.base_model is None]


def load_registry(path: Path, default: str | None = None) -> Registry:
    """Read a registry file; local paths become absolute, relative to the file."""
    path = Path(path).resolve()
    with path.open("rb") as handle:
        data = tomllib.load(handle)
    specs = [_resolve_paths(ModelSpec(**entry), path.parent) for entry in data.get("models", [])]
    return Registry(specs, default or data.get("default"))


def _resolve_paths(spec: ModelSpec, base: Path) -> ModelSpec:
    """Turn ./relative paths into absolute ones; leave absolute paths and hub ids alone."""
    updates = {field: _resolved(getattr(spec, field), base) for field in ("path", "adapter")}
    updates["adapters"] = [entry.model_copy(update={"path": _resolved(entry.path, base)})
                           for entry in spec.adapters]
    return spec.model_copy(update=updates)


def _resolved(path: str | None, base: Path) -> str | None:
    return str((base / path).resolve()) if path and path.startswith(".") else path
