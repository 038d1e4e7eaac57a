"""The `vllm` backend: vLLM's engine behind our Engine interface, in the worker's engine process.

vLLM's in-process engine (v1 LLMEngine) is loaded once per engine process and driven by one
loop thread, as our batching engine is: each iteration reads the pipe's inbox (blocking while
idle), adds new requests as token ids with their own sampling parameters, aborts the stopped
ones, runs one `step()` and hands each request's new token ids to its sink. vLLM's engine core
runs inside this process (VLLM_ENABLE_V1_MULTIPROCESSING=0): our engine process already plays
the part of vLLM's core process beside the worker, which is vLLM's front end here (it detokenizes,
matches stops and streams). A core in a grandchild process outlived a killed engine process
(vLLM does not watch its parent), holding the model's memory; in here it dies with it.

What stays ours: the prompt (rendered and tokenized by the API), detokenizing and stop strings
(the worker's runner holds a stop sequence back across chunks and asks for the stop, which
becomes an abort here), and how a step ends (tasks.engine.interface.step_for). vLLM stops on
the model's end-of-sequence ids, which we pass as stop_token_ids, so `min_new_tokens` holds
them back there too.

A JSON Schema goes to vLLM's structured outputs (its xgrammar backend, compact JSON), with the
tokens a JSON reply never holds left out as ours leaves them out (tasks/engine/structured.py);
log-probabilities are vLLM's raw ones, as ours are.

If this process dies, the worker sees its engine process gone and exits, and the jobs' leases
lapse so they run elsewhere. A step that raises fails the requests in it; serving goes on.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from model_store.adapters import AdapterUnavailable, read_adapter_config
from model_store.registry import ModelSpec, Quantization
from model_store.tokenizer import ChatTokenizer
from tasks.engine.factory import EngineInfo, EngineOptions
from tasks.engine.interface import (CANCELLED_STEP, EndCallback, EngineStats, InvalidSchema,
                                    Request, StepLogprobs, StepSink, TokenStep, run_submitted,
                                    step_for)
from tasks.jobs.contract import FinishReason, SamplingParams

logger = logging.getLogger(__name__)

LORA_ID = 1  # vLLM names an adapter by a positive integer: a merged-style entry's one adapter
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts
GIB = 1 << 30
FINISHES = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH,
            "abort": FinishReason.CANCELLED}

Inbox = Callable[["VllmEngine", bool], None]


class UnsupportedByVllm(ValueError):
    """The registry entry asks for something the vllm backend cannot do on this host."""


@dataclass(eq=False)
class _Run(Request):
    """A request in vLLM: a submitted request and how many tokens it has had."""

    produced: int = 0


class VllmEngine:
    """vLLM's LLMEngine behind the Engine interface; submit from any thread."""

    def __init__(self, llm, eos_ids: frozenset[int], lora=None,
                 after_steps: Callable[[], None] | None = None, inbox: Inbox | None = None):
        self._llm, self._eos_ids, self._lora = llm, eos_ids, lora
        self._lora_enabled = llm.vllm_config.lora_config is not None
        self._lora_ids: dict[tuple[str, str], int] = {}  # per-request adapters: vLLM's ids
        # the core runs in this process: its scheduler is read directly, so vLLM's per-step
        # statistics (off) cost nothing; the loop thread is the only one that touches it
        self._scheduler = llm.engine_core.engine_core.scheduler
        self._after_steps, self._inbox = after_steps, inbox
        self._pending: deque[_Run] = deque()
        self._runs: dict[str, _Run] = {}
        self._ids = 0
        self._json_token_ids: list[int] | None = None  # made for the first JSON request
        self._wakeup = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="dawet-vllm", daemon=True)
        self._thread.start()

    def stats(self) -> EngineStats:
        """Running and waiting requests and KV-cache use, from vLLM's scheduler (called on the
        loop thread, through the inbox)."""
        scheduler = self._scheduler
        return EngineStats(len(scheduler.running), len(scheduler.waiting),
                           scheduler.get_kv_cache_usage(),
                           adapters_loaded=len(self._llm.list_loras()) if self._lora_enabled
                           else None)

    def submit(self, prompt_ids: list[int], params: SamplingParams, cancel: threading.Event,
               sink: StepSink, on_end: EndCallback) -> None:
        """Queue the request: its steps go to `sink`, then `on_end(error or None)` runs once,
        both on the loop thread."""
        with self._wakeup:
            if self._closed:
                raise RuntimeError("the engine was closed")
            self._pending.append(_Run(list(prompt_ids), params, cancel, sink, on_end))
            self._wakeup.notify()

    def run(self, prompt_ids: list[int], params: SamplingParams, cancel: threading.Event,
            sink: StepSink) -> None:
        """Submit the request and wait until it ends; raises if it failed."""
        run_submitted(self.submit, prompt_ids, params, cancel, sink)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the loop after its current step, fail what is left, and stop vLLM's core."""
        with self._wakeup:
            self._closed = True
            self._wakeup.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def join(self) -> None:
        self._thread.join()

    def _loop(self) -> None:
        while not self._closed:
            self._take_requests()
            self._add_pending()
            self._abort_stopped()
            if self._runs:
                self._step()
        closed = RuntimeError("the engine was closed")
        for run in list(self._runs.values()) + list(self._pending):
            run.deliver(closed)
        self._llm.engine_core.shutdown()

    def _take_requests(self) -> None:
        """Read the inbox, or wait on other threads' submissions, blocking while idle."""
        idle = not self._runs and not self._pending
        if self._inbox is not None:
            self._inbox(self, idle)
            return
        with self._wakeup:
            while idle and not self._pending and not self._closed:
                self._wakeup.wait()

    def _add_pending(self) -> None:
        while self._pending:
            run = self._pending.popleft()
            if run.cancel.is_set():
                run.deliver(CANCELLED_STEP)
                continue
            self._ids += 1
            rid = str(self._ids)
            try:
                [prompt] = self._llm.renderer.render_cmpl([_tokens_prompt(run.prompt_ids)])
                self._llm.add_request(rid, prompt, self._sampling_params(run.params),
                                      lora_request=self._lora_request(run.params))
            except Exception as exc:  # this request only: vLLM refused it
                refusal = _schema_refusal(exc, run.params)
                if refusal is None:
                    logger.exception("vLLM refused a request")
                run.deliver(refusal or exc)
                continue
            self._runs[rid] = run

    def _sampling_params(self, params: SamplingParams):
        """vLLM's parameters for ours; a JSON Schema is checked here first, so that a schema
        no grammar can enforce is refused as our engine refuses it."""
        if params.json_schema is None:
            return vllm_sampling_params(params, self._eos_ids)
        if params.json_written_ids:
            raise RuntimeError("a JSON reply cannot resume on the vllm backend: vLLM's grammar "
                               "starts at the reply's first token")
        from tasks.engine.structured import check_schema

        check_schema(params.json_schema)
        return vllm_sampling_params(params, self._eos_ids, self._json_tokens())

    def _json_tokens(self) -> list[int]:
        """The token ids a JSON reply may hold (tasks.engine.structured.tokenizer_view)."""
        if self._json_token_ids is None:
            from tasks.engine.structured import tokenizer_view

            config = self._llm.model_config
            _, writable = tokenizer_view(config.tokenizer, config.get_vocab_size(),
                                         self._eos_ids)
            self._json_token_ids = writable.nonzero().flatten().tolist()
        return self._json_token_ids

    def _lora_request(self, params: SamplingParams):
        """The request's LoRA adapter as vLLM names it (one id per name and path, so a name
        added again with new weights is a new adapter); the entry's merged-style one if none."""
        if params.lora is None:
            return self._lora
        if not self._lora_enabled:
            raise AdapterUnavailable(f"this vllm worker serves no LoRA adapters per request: list "
                                     f"{params.lora.name} in its registry entry's `adapters`")
        from vllm.lora.request import LoRARequest

        key = (params.lora.name, params.lora.path)
        lora_id = self._lora_ids.setdefault(key, len(self._lora_ids) + LORA_ID + 1)
        return LoRARequest(params.lora.name, lora_id, params.lora.path)

    def _abort_stopped(self) -> None:
        """Abort the requests that were cancelled or whose sinks asked to stop."""
        stopped = [rid for rid, run in self._runs.items() if run.stopped]
        if stopped:
            self._llm.abort_request(stopped)
        for rid in stopped:
            self._runs.pop(rid).deliver(CANCELLED_STEP)

    def _step(self) -> None:
        """One vLLM step; every request's new tokens go to its sink."""
        try:
            outputs = self._llm.step()
        except Exception as exc:  # the boundary: fail the step's requests, keep serving
            logger.exception("vLLM step failed")
            self._fail_running(exc)
            return
        for output in outputs:
            run = self._runs.get(output.request_id)
            if run is not None:
                self._deliver(output, run)
        if self._after_steps is not None:
            self._after_steps()

    def _deliver(self, output, run: _Run) -> None:
        """A request's new token ids, as steps; its end when vLLM or a step ended it."""
        completion = output.outputs[0]
        logprobs = completion.logprobs or [None] * len(completion.token_ids)
        for token, ranked in zip(completion.token_ids, logprobs):
            run.produced += 1
            run.deliver(step_for(token, run.produced, run.params, self._eos_ids,
                                 _step_logprobs(token, ranked, run.params.logprobs)))
            if run.ended:
                break
        if output.finished:
            self._runs.pop(output.request_id, None)
            run.deliver(TokenStep(None, FINISHES.get(completion.finish_reason,
                                                     FinishReason.STOP)))
        # a request a step ended before vLLM did (a sink's stop) is aborted next iteration

    def _fail_running(self, exc: Exception) -> None:
        failed, self._runs = self._runs, {}
        self._llm.abort_request(list(failed))
        for run in failed.values():
            run.deliver(exc)


def _schema_refusal(exc: Exception, params: SamplingParams) -> InvalidSchema | None:
    """A JSON request's schema refused (by our check, or by vLLM's own), as InvalidSchema; None
    for any other failure."""
    from vllm.exceptions import VLLMClientError

    if isinstance(exc, InvalidSchema):
        return exc
    if params.json_schema is not None and isinstance(exc, VLLMClientError):
        return InvalidSchema(f"the JSON schema cannot be enforced: {exc}")
    return None


def _step_logprobs(token: int, ranked, wanted: int | None) -> StepLogprobs | None:
    """Ours from vLLM's {token id: Logprob} at one position (the sampled token and the top
    `wanted` by rank)."""
    if ranked is None or wanted is None:
        return None
    top = sorted((entry.rank, token_id, entry.logprob) for token_id, entry in ranked.items()
                 if entry.rank is not None and entry.rank <= wanted)
    return StepLogprobs(ranked[token].logprob, tuple((i, lp) for _, i, lp in top))


def _tokens_prompt(prompt_ids: list[int]):
    from vllm.inputs import TokensPrompt

    return TokensPrompt(prompt_token_ids=prompt_ids)


def vllm_sampling_params(params: SamplingParams, eos_ids: frozenset[int],
                         json_token_ids: list[int] | None = None):
    """Our resolved parameters as vLLM's: token ids out (we detokenize), new tokens only; a
    JSON Schema as structured outputs over `json_token_ids`, the tokens a JSON reply may hold."""
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    structured = {}
    if params.json_schema is not None:
        structured = {"structured_outputs": StructuredOutputsParams(
            json=params.json_schema, disable_any_whitespace=True),
            "allowed_token_ids": json_token_ids}
    return VllmSamplingParams(
        temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
        repetition_penalty=params.repetition_penalty, seed=params.seed,
        max_tokens=params.max_new_tokens, min_tokens=params.min_new_tokens,
        stop_token_ids=sorted(eos_ids), detokenize=False, logprobs=params.logprobs,
        output_kind=RequestOutputKind.DELTA, **structured)


def vllm_engine_args(spec: ModelSpec, options: EngineOptions, cuda: bool):
    """vLLM's EngineArgs for a registry model and the worker's engine options."""
    from vllm.config import StructuredOutputsConfig
    from vllm.engine.arg_utils import EngineArgs

    import torch

    from model_store.loader import resolve_dtype

    extra = {}
    if spec.adapter or spec.adapters:  # adapters added at run time need a rank within this one
        loras = options.max_loaded_adapters
        extra.update(enable_lora=True, max_loras=loras, max_cpu_loras=loras,
                     max_lora_rank=_lora_rank([spec.adapter] if spec.adapter else
                                              [entry.path for entry in spec.adapters]))
    if spec.quantization is not Quantization.NONE:
        extra.update(quantization=_quantization(spec, cuda))
    # on CPU, `auto` means what it means for our loader (vLLM's own would be bf16 anywhere)
    dtype = spec.dtype if cuda else str(resolve_dtype(spec, torch.device("cpu"))).removeprefix(
        "torch.")
    return EngineArgs(
        model=spec.path, tokenizer=spec.path, dtype=dtype,
        max_model_len=spec.context_length, max_num_seqs=options.max_batch_size,
        enable_prefix_caching=True, generation_config="vllm",  # defaults come from our registry
        disable_log_stats=True, seed=0, async_scheduling=True,
        # JSON Schemas: xgrammar (as our engine), compact; log-probabilities: raw (the default)
        structured_outputs_config=StructuredOutputsConfig(backend="xgrammar",
                                                          disable_any_whitespace=True),
        **extra)


def _quantization(spec: ModelSpec, cuda: bool) -> str:
    """vLLM's bitsandbytes support: 4-bit in flight on CUDA; nothing else maps."""
    if not cuda:
        raise UnsupportedByVllm(f"{spec.name}: quantization = {spec.quantization.value!r} needs "
                                "bitsandbytes on CUDA, and this host has no GPU")
    if spec.quantization is Quantization.INT8:
        raise UnsupportedByVllm(f"{spec.name}: vLLM quantizes with bitsandbytes in flight to "
                                "4-bit only; use quantization = \"4bit\", a pre-quantized "
                                "checkpoint, or backend = \"transformers\" for 8-bit")
    return "bitsandbytes"


def _lora_rank(adapters: list[str]) -> int:
    """The smallest rank vLLM accepts that holds the adapters' (16 at least, vLLM's default,
    for adapters added at run time)."""
    rank = max(read_adapter_config(adapter).rank for adapter in adapters)
    return next(r for r in LORA_RANKS if r >= max(rank, 16))


def cpu_kv_cache_gib(model_dir: str | Path, tokens: int) -> int:
    """Whole GiB (at least 1) that fp32 keys and values of `tokens` tokens take in this model."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    heads = config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim", config["hidden_size"] // config["num_attention_heads"])
    per_token = 2 * config["num_hidden_layers"] * heads * head_dim * 4
    return max(1, -(-tokens * per_token // GIB))


def _configure_cpu_backend(spec: ModelSpec, options: EngineOptions) -> None:
    """vLLM's CPU backend reads its KV space (GiB) and its threads from the environment: size
    the space from our KV budget, and run as many threads as the engine has CPUs (with its core
    in this process vLLM binds nothing, and it runs one thread unless OMP_NUM_THREADS says)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE",
                          str(cpu_kv_cache_gib(spec.path, options.kv_cache_tokens)))
    threads = options.torch_threads or len(options.cpus) or len(os.sched_getaffinity(0))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def start_vllm_engine(spec: ModelSpec, options: EngineOptions, after_steps=None, inbox=None):
    """Load the model into vLLM's engine: (VllmEngine, EngineInfo)."""
    import torch

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the core in this process: see above
    cuda = torch.cuda.is_available()
    if not cuda:
        _configure_cpu_backend(spec, options)
    args = vllm_engine_args(spec, options, cuda)
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.llm_engine import LLMEngine

    started = time.perf_counter()
    llm = LLMEngine.from_engine_args(args)
    lora = LoRARequest(spec.name, LORA_ID, spec.adapter) if spec.adapter else None
    info = EngineInfo("vllm", "cuda" if cuda else "cpu", time.perf_counter() - started, 1)
    eos_ids = ChatTokenizer(spec.path).eos_token_ids
    return VllmEngine(llm, eos_ids, lora, after_steps, inbox), info
