"""Load a registry model into memory: transformers or unsloth, optional LoRA and 4/8-bit.

Workers import this module; the API never does (it pulls in torch).
"""
from __future__ import annotations

import importlib.util
import logging
import threading
import time
from dataclasses import dataclass

import torch

from model_store.registry import Backend, ModelSpec, Quantization
from model_store.tokenizer import ChatTokenizer

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_load_count = 0
_load_lock = threading.Lock()


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: torch.nn.Module
    tokenizer: ChatTokenizer
    backend: Backend
    device: torch.device
    load_seconds: float


def load_count() -> int:
    """How many models this process has loaded; workers load exactly one."""
    return _load_count


def resolve_device(spec: ModelSpec) -> torch.device:
    """`auto` means the first visible GPU when there is one, else the CPU."""
    if spec.device != "auto":
        return torch.device(spec.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_backend(spec: ModelSpec, device: torch.device) -> Backend:
    """`auto` picks unsloth only on CUDA with unsloth installed."""
    if spec.backend is Backend.VLLM:
        raise ValueError(f"{spec.name} has backend = \"vllm\": vLLM's engine loads it "
                         "(tasks/engine/vllm.py), not this loader")
    if spec.backend is not Backend.AUTO:
        return spec.backend
    if device.type == "cuda" and importlib.util.find_spec("unsloth") is not None:
        return Backend.UNSLOTH
    return Backend.TRANSFORMERS


def resolve_dtype(spec: ModelSpec, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on GPUs that support it, float16 on others; on CPU bfloat16 where the
    CPU computes it natively (AVX-512 bf16, AMX), else float32. On a 2-core AVX-512 bf16 CPU,
    bf16 decoded 1.7-2.3x faster than float32 at SmolLM2-135M's shape (docs/benchmarks.md)."""
    if spec.dtype != "auto":
        return _DTYPES[spec.dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bfloat16 GEMMs in hardware on this CPU (AVX-512 bf16 or AMX)."""
    return (torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def load_model(spec: ModelSpec) -> LoadedModel:
    """Load weights, adapter and tokenizer for `spec`, ready for inference."""
    global _load_count
    started = time.perf_counter()
    device = resolve_device(spec)
    backend = resolve_backend(spec, device)
    if spec.quantization is not Quantization.NONE and device.type != "cuda":
        raise ValueError(f"{spec.name}: {spec.quantization.value} quantization needs a CUDA device")
    loader = _load_unsloth if backend is Backend.UNSLOTH else _load_transformers
    model = loader(spec, device, resolve_dtype(spec, device))
    model.eval()
    with _load_lock:
        _load_count += 1
    seconds = time.perf_counter() - started
    logger.info("loaded %s with %s on %s in %.2fs", spec.name, backend.value, device, seconds)
    return LoadedModel(spec, model, ChatTokenizer(spec.path), backend, device, seconds)


def _quantization_config(spec: ModelSpec, dtype: torch.dtype):
    """A bitsandbytes config for 4/8-bit loading, or None."""
    if spec.quantization is Quantization.NONE:
        return None
    from transformers import BitsAndBytesConfig

    if spec.quantization is Quantization.INT8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True,
    )


def _load_transformers(spec: ModelSpec, device: torch.device, dtype: torch.dtype):
    """from_pretrained on the directory, then the peft adapter when there is one."""
    from transformers import AutoModelForCausalLM

    quantization = _quantization_config(spec, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        spec.path, dtype=dtype, quantization_config=quantization,
        device_map={"": str(device)} if quantization else None,
    )
    if quantization is None:
        model.to(device)
    if spec.adapter or spec.lora:  # an adapter's spec loaded alone (tests, tools): merged too
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, spec.adapter or spec.lora)
        if quantization is None:
            model = model.merge_and_unload()  # plain weights decode faster than adapter hooks
    return model


def _load_unsloth(spec: ModelSpec, device: torch.device, dtype: torch.dtype):
    """unsloth's fast path (CUDA only): its loader handles 4-bit and the adapter."""
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(
        model_name=spec.adapter or spec.lora or spec.path, max_seq_length=spec.context_length,
        dtype=dtype,
        load_in_4bit=spec.quantization is Quantization.INT4,
        load_in_8bit=spec.quantization is Quantization.INT8,
    )
    FastLanguageModel.for_inference(model)
    return model
