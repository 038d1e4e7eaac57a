"""vLLM's own offline `LLM.generate`, greedy, for the vllm backend's tests: run as a script in a
process of its own (vLLM sets global state), it prints the token ids for each prompt, with and
without the model's adapter, as JSON.

usage: python tests/vllm_reference.py MODEL_DIR ADAPTER_DIR MAX_TOKENS < prompts.json
"""
from __future__ import annotations

import json
import os
import sys


def main(model: str, adapter: str, max_tokens: int) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in json.load(sys.stdin)]
    llm = LLM(model=model, dtype="float32", max_model_len=2048, enable_lora=True,
              max_lora_rank=16, generation_config="vllm", seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    base = llm.generate(prompts, params, use_tqdm=False)
    tuned = llm.generate(prompts, params, lora_request=LoRARequest("adapter", 1, adapter),
                         use_tqdm=False)
    print("REFERENCE", json.dumps({"base": [list(o.outputs[0].token_ids) for o in base],
                      "adapter": [list(o.outputs[0].token_ids) for o in tuned]}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
