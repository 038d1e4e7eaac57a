"""Build the engine a model asks for: its options, its backend, and where it runs.

`start_engine` loads the model and starts an engine, in a child process of its own by default
(tasks/engine/process.py) or on this process's threads. `build_engine` picks the backend:
  batching    ours: continuous batching over transformers (with peft, unsloth, bitsandbytes)
  sequential  ours: one request at a time, the baseline
  vllm        vLLM's engine, for models whose registry entry says backend = "vllm"
Backends that run a loop of their own (batching, vllm) read the pipe's inbox between steps.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from model_store.registry import Backend, ModelSpec

logger = logging.getLogger(__name__)

LOOP_KINDS = frozenset({"batching", "vllm"})  # engines whose own loop reads the inbox


@dataclass(frozen=True)
class EngineOptions:
    """How to build the engine: everything the child needs besides the model's spec."""

    kind: str = "batching"  # batching | sequential | vllm (vllm: set by the model's backend)
    max_batch_size: int = 32
    kv_cache_tokens: int = 65_536
    torch_threads: int = 0  # 0 keeps torch's default
    log_level: str = "INFO"
    cpus: frozenset[int] = frozenset()  # the CPUs the engine process keeps to; empty: any
    forward: str = "auto"  # batching: auto (ours where it serves the model) | transformers
    prefix_cache_tokens: int = 0  # batching on our forward: KV kept for later prompts
    max_loaded_adapters: int = 8  # LoRA adapters an engine keeps loaded beyond those running

    @property
    def runs_own_loop(self) -> bool:
        """Whether the engine's own loop reads the inbox (else: a thread per request)."""
        return self.kind in LOOP_KINDS


@dataclass(frozen=True)
class EngineInfo:
    """What the loaded model is, for the worker's heartbeat and metrics."""

    backend: str
    device: str
    load_seconds: float
    model_loads: int


def engine_options(settings, spec: ModelSpec, cpus: frozenset[int] = frozenset()) -> EngineOptions:
    """The engine options a worker's settings (dawet.settings.Settings) and its model choose,
    with the CPUs the engine process keeps to (empty: any). A vllm model runs vLLM's engine."""
    kind = "vllm" if spec.backend is Backend.VLLM else settings.engine
    return EngineOptions(kind, settings.max_batch_size, settings.kv_cache_tokens,
                         settings.torch_threads, settings.log_level, cpus,
                         settings.engine_forward, settings.prefix_cache_tokens,
                         settings.max_loaded_adapters)


def start_engine(spec: ModelSpec, options: EngineOptions, own_process: bool = True,
                 on_lost=None, after_steps=None, inbox=None):
    """Load the model and start its engine: (engine, EngineInfo). `own_process` runs it in a
    child process (EngineProcess); otherwise it runs on this process's threads."""
    if own_process:
        from tasks.engine.process import EngineProcess

        engine = EngineProcess(spec, options, on_lost)
        return engine, engine.info
    configure_torch_threads(options)
    if options.kind == "vllm":
        from tasks.engine.vllm import start_vllm_engine

        return start_vllm_engine(spec, options, after_steps, inbox)
    from model_store.loader import load_count, load_model

    loaded = load_model(spec)
    info = EngineInfo(loaded.backend.value, str(loaded.device), loaded.load_seconds, load_count())
    return build_engine(loaded, options, after_steps, inbox), info


def build_engine(loaded, options: EngineOptions, after_steps=None, inbox=None):
    """Our engine the options choose: continuous batching, or one job at a time. A batching
    engine calls `after_steps()` each time a forward pass has handed its steps to sinks, and
    reads `inbox` (tasks.engine.batching.engine.Inbox) at each iteration when given one."""
    from tasks.engine.batching.engine import BatchingEngine
    from tasks.engine.sequential import SequentialEngine

    logger.info("engine: %s (max batch %d, KV budget %d tokens)", options.kind,
                options.max_batch_size, options.kv_cache_tokens)
    if options.kind == "sequential":
        return SequentialEngine(loaded)
    # with an inbox, the engine process's main thread (the model's loader) runs the loop: join()
    return BatchingEngine(loaded, options.max_batch_size, options.kv_cache_tokens, after_steps,
                          inbox, forward=options.forward, own_thread=inbox is None,
                          prefix_cache_tokens=options.prefix_cache_tokens,
                          max_loaded_adapters=options.max_loaded_adapters)


def configure_torch_threads(options: EngineOptions) -> None:
    """Torch's intra-op threads, set before the model loads."""
    if options.torch_threads:
        import torch

        torch.set_num_threads(options.torch_threads)
