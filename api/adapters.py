"""LoRA adapters added and removed at run time, in vLLM's shapes: POST /v1/load_lora_adapter
and POST /v1/unload_lora_adapter (admin keys only).

An adapter added here is served like one the registry lists: under its own name, by the workers
of its base entry, its requests batched with the base's. The record lives in Redis, so every API
process serves it at once and it outlives restarts; a job carries the adapter's name and path,
and the worker's engine loads it on first use (and evicts the least recently used one beyond
DAWET_MAX_LOADED_ADAPTERS). Removing it stops new requests at once; jobs already queued finish.
"""
from __future__ import annotations

from flask import Blueprint, request
from pydantic import BaseModel, ConfigDict, Field

from api.auth import principal, require_api_key
from api.errors import APIError, invalid
from api.services import services
from model_store.adapters import AdapterUnavailable, read_adapter_config
from model_store.registry import MODEL_NAME, ModelSpec

bp = Blueprint("adapters", __name__, url_prefix="/v1")
bp.before_request(require_api_key)

class LoadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(pattern=MODEL_NAME)
    lora_path: str = Field(min_length=1)
    # Dawet's addition: the registry entry to serve it over; None: the default model's
    base_model: str | None = None


class UnloadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str


def _require_admin() -> None:
    if not principal().admin:
        raise APIError(403, "only an admin key may load or unload adapters", "admin_required",
                       "permission_error")


@bp.post("/load_lora_adapter")
def load_lora_adapter():
    """Serve a peft LoRA adapter directory under a new model name, over a registry entry."""
    _require_admin()
    body = LoadAdapterRequest.model_validate_json(request.get_data())
    svc = services()
    base = svc.registry.serving(body.base_model)  # None: the default model's
    if base is None:
        raise APIError(404, f"model {body.base_model!r} does not exist; see the registry",
                       "model_not_found", param="base_model")
    if svc.registry.get(body.lora_name) is not None:
        raise invalid(f"{body.lora_name!r} names a registry model", param="lora_name")
    try:
        read_adapter_config(body.lora_path)  # where models are mounted, as on the workers
    except AdapterUnavailable as exc:
        raise invalid(str(exc), param="lora_path") from None
    try:
        spec = svc.adapters.add(body.lora_name, body.lora_path, base)
    except ValueError as exc:  # the base cannot take adapters
        raise invalid(str(exc), param="base_model") from None
    return _adapter_card(spec)


@bp.post("/unload_lora_adapter")
def unload_lora_adapter():
    """Stop serving a run-time adapter; its queued jobs still finish."""
    _require_admin()
    body = UnloadAdapterRequest.model_validate_json(request.get_data())
    if not services().adapters.remove(body.lora_name):
        raise APIError(404, f"no LoRA adapter {body.lora_name!r} was loaded at run time",
                       "adapter_not_found", param="lora_name")
    return {"object": "lora_adapter", "name": body.lora_name, "deleted": True}


def _adapter_card(spec: ModelSpec) -> dict:
    return {"object": "lora_adapter", "name": spec.name, "path": spec.lora,
            "base_model": spec.base_model}
