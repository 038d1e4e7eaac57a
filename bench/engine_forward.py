"""Our engine at a real size: the new default against the old, each a whole Dawet stack.

    python -m bench --engine [--clients 1 16] [--repeats 5]

Both stacks serve the same checkpoint (default: var/models/dawet-bench-135m, random weights
in SmolLM2-135M's shape, `make bench-model`) with `dawet run`'s defaults, and differ only in
the engine's forward pass and the registry's dtype:
  new   our forward (tasks/engine/batching/llama.py), dtype auto (bf16 on a CPU with native
        bf16, else float32)
  old   transformers' forward, float32: the defaults before issue 18
Both stay up for the whole run and take turns; the same client (bench/openai_load.py) drives
both, C threads each streaming `--requests` completions of exactly `--tokens` tokens. Reported
per C: each side's median run and the medians of each repeat's paired ratios (new / old),
and, at C = 1, how close each side comes to the memory-bandwidth bound: the weights' bytes
read per token against the host's read bandwidth, measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from bench.backends import (NAME, format_table, pair_arguments, parsed_pairs,
                            run_pairs)
from dawet.processes import Stack, free_port
from dawet.settings import Settings

logger = logging.getLogger("bench.engine_forward")

SIDES = {"new": ("auto", "auto"), "old": ("transformers", "float32")}  # forward, dtype
TITLES = {"new": ("new", "new"), "old": ("old", "old")}


def registry_file(model_dir: Path, dtype: str, folder: Path) -> Path:
    path = folder / f"models-{dtype}.toml"
    path.write_text(f'default = "{NAME}"\n\n[[models]]\nname = "{NAME}"\n'
                    f'path = "{model_dir.resolve()}"\ndtype = "{dtype}"\n'
                    f"context_length = 2048\nmax_new_tokens_limit = 1024\n")
    return path


@contextmanager
def settings_stack(folder: Path, name: str, **settings) -> Iterator[str]:
    """Redis, one worker and the API with `dawet run`'s defaults but `settings`, logging under
    folder/name; yields the API's URL."""
    logs = folder / name
    logs.mkdir()
    running = Stack(Settings(api_port=free_port(), log_level="WARNING", worker_metrics_port=0,
                             **settings), log_dir=logs, ready_timeout=600).start()
    try:
        yield running.api_url
    finally:
        running.stop()


def stack(model_dir: Path, forward: str, dtype: str, folder: Path):
    """A stack serving the checkpoint in `dtype` on the `forward` pass."""
    return settings_stack(folder, forward, models_file=registry_file(model_dir, dtype, folder),
                          default_model=NAME, engine_forward=forward)


def read_bandwidth_gb_s(gib: float = 1.0, repeats: int = 5) -> float:
    """The host's memory read bandwidth as torch sees it: the best of `repeats` sums of a
    buffer far larger than the caches."""
    import torch

    buffer = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - started)
    return buffer.numel() * 4 / best / 1e9


def weight_bytes(model_dir: Path, dtype: str) -> int:
    """Bytes of weights a decode step reads: every parameter once (a tied embedding counts once,
    as the output projection)."""
    config = json.loads((model_dir / "config.json").read_text())
    hidden, inter, layers = (config["hidden_size"], config["intermediate_size"],
                             config["num_hidden_layers"])
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    per_layer = hidden * (hidden + 2 * kv) + hidden * hidden + 3 * hidden * inter + 2 * hidden
    output = config["vocab_size"] * hidden
    parameters = layers * per_layer + output * (1 if config.get("tie_word_embeddings") else 2)
    return parameters * (4 if dtype == "float32" else 2)


def served_dtype(dtype: str) -> str:
    if dtype != "auto":
        return dtype
    from model_store.loader import cpu_has_native_bf16

    return "bfloat16" if cpu_has_native_bf16() else "float32"


def bandwidth_lines(rows: list[dict], model_dir: Path, bandwidth: float) -> list[str]:
    """At C = 1, each side's tokens/s against the bound its weights' bytes set."""
    lines = [f"host read bandwidth: {bandwidth:.1f} GB/s"]
    for row in (r for r in rows if r["clients"] == 1):
        for side, (_, dtype) in SIDES.items():
            served = served_dtype(dtype)
            size = weight_bytes(model_dir, served)
            bound = bandwidth * 1e9 / size
            rate = row[side].tokens_per_second
            lines.append(f"{side} ({served}, {size / 1e6:.0f} MB a token): {rate:.1f} tok/s at "
                         f"C=1 = {100 * rate / bound:.0f} % of its bound {bound:.0f} tok/s")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench --engine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", action="store_true", help="(what selects this bench)")
    pair_arguments(parser)
    return parsed_pairs(parser, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not (args.model_dir / "config.json").exists():
        sys.exit(f"{args.model_dir} is missing: run `make bench-model`")
    folder = Path(tempfile.mkdtemp(prefix="dawet-bench-engine-"))
    bandwidth = read_bandwidth_gb_s()
    with ExitStack() as stacks:
        urls = {side: stacks.enter_context(stack(args.model_dir, forward, dtype, folder))
                for side, (forward, dtype) in SIDES.items()}
        rows = [run_pairs(urls, clients, args) for clients in args.clients]
    sys.stdout.write(f"\n{args.model_dir.name}: {args.tokens} tokens per request, "
                     f"{args.requests} requests per client; median of {args.repeats} runs and "
                     f"of their paired ratios (logs: {folder})\n\n{format_table(rows, TITLES)}\n\n"
                     + "\n".join(bandwidth_lines(rows, args.model_dir, bandwidth)) + "\n")
    return 0
