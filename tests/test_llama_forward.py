"""Our own forward pass for Llama-family models (tasks/engine/batching/llama.py) against
transformers' forward on the real demo model, whose LoRA adapter it folds in."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import DEMO_MODEL, MODELS_FILE
from model_store.loader import LoadedModel, load_model
from model_store.registry import Backend, Quantization, load_registry
from tasks.engine.batching.engine import BatchingEngine
from tasks.engine.batching.llama import supports
from tasks.engine.batching.model_runner import LlamaRunner, ModelRunner, runner_for


def _load(dtype: str) -> LoadedModel:
    return load_model(load_registry(MODELS_FILE).get(DEMO_MODEL).model_copy(update={"dtype": dtype}))


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return _load("float32")


def _prompts(loaded: LoadedModel) -> list[list[int]]:
    texts = ["Saya suka makan nasi goreng", "tea", "Story: a long way home, a long way home"]
    return [loaded.tokenizer.encode(text) for text in texts]


def _steps(runner: ModelRunner, prompts: list[list[int]], steps: int) -> list[torch.Tensor]:
    """Logits of a prefill of `prompts` but the last, then of `steps` greedy decode steps, the
    last prompt joining at the second step (a packed pass)."""
    with torch.inference_mode():
        first, late = prompts[:-1], prompts[-1:]
        prefill = runner.prefill(first)
        runner.join_prefilled(prefill, list(range(len(first))))
        out, tokens = [prefill.logits], prefill.logits.argmax(-1).tolist()
        lengths = [len(p) for p in first]
        for step in range(steps):
            joining = late if step == 1 else []
            logits, packed = runner.decode(tokens, [n for n in lengths], joining)
            runner.advance()
            out.append(logits)  # the rows', then the joining prompt's
            tokens = logits.argmax(-1).tolist()
            lengths = [n + 1 for n in lengths] + [len(p) for p in joining]
            for index in range(len(joining)):
                runner.join_packed(packed, index)
        return out


def test_the_demo_model_runs_on_our_forward_and_the_rest_on_transformers(loaded):
    assert supports(loaded) and isinstance(runner_for(loaded), LlamaRunner)
    assert type(runner_for(loaded, "transformers")) is ModelRunner
    assert not supports(dataclasses.replace(loaded, backend=Backend.UNSLOTH))
    quantized = loaded.spec.model_copy(update={"quantization": Quantization.INT8})
    assert not supports(dataclasses.replace(loaded, spec=quantized))


@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-4), ("bfloat16", 0.08)])
def test_our_logits_match_transformers_with_the_adapter_folded_in(dtype, tolerance):
    loaded = _load(dtype)
    ours = _steps(LlamaRunner(loaded), _prompts(loaded), 6)
    theirs = _steps(ModelRunner(loaded.model, loaded.device, packs=True), _prompts(loaded), 6)
    for mine, reference in zip(ours, theirs):
        scale = reference.float().abs().max()
        assert (mine.float() - reference.float()).abs().max() <= tolerance * scale
    assert ours[1].argmax(-1).tolist() == theirs[1].argmax(-1).tolist()


def test_float32_weights_are_prepacked_for_onednn_on_cpu(loaded):
    """oneDNN's prepacked float32 GEMMs were 1.5x quicker than `linear` at one row on an AVX2
    CPU: our forward takes them wherever oneDNN runs."""
    forward = LlamaRunner(loaded).forward
    packed = torch.backends.mkldnn.is_available()
    assert all(linear.prepacked is packed for layer in forward.layers
               for linear in (layer.qkv, layer.out, layer.gate_up, layer.down))
    assert forward.lm_head.prepacked is packed


def test_the_adapter_is_folded_in(loaded):
    """The adapter changes the logits: without folding, ours would match the bare base."""
    base = load_model(load_registry(MODELS_FILE).get("dawet-tiny"))
    prompts = _prompts(loaded)
    with_adapter = _steps(LlamaRunner(loaded), prompts, 0)[0]
    bare = _steps(LlamaRunner(base), prompts, 0)[0]
    assert (with_adapter - bare).abs().max() > 0.1


def test_an_engine_without_a_thread_of_its_own_runs_its_loop_in_join(loaded):
    """The engine process's main thread runs the loop (one OpenMP pool: see engine.py)."""
    import threading

    from tasks.engine.interface import iterate
    from tasks.jobs.contract import SamplingParams

    engine = BatchingEngine(loaded, max_batch_size=4, kv_cache_tokens=4096, own_thread=False)
    params = SamplingParams(max_new_tokens=8, min_new_tokens=8, temperature=0.0, top_p=1.0)
    result: list = []

    def client() -> None:
        result.extend(step.token_id for step in iterate(engine, _prompts(loaded)[0], params))
        engine.close()
    threading.Thread(target=client).start()
    engine.join()  # returns once the client closed it
    assert len(result) == 8 and all(isinstance(token, int) for token in result)
