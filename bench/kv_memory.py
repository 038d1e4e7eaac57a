"""The KV cache's memory on a mixed batch: our forward's pool against transformers' forward's
padded window, the two KV caches the batching engine has.

    python -m bench --kv-memory [--budget 65536] [--long 1500] [--short 15] [--tokens 64]

One long prompt and `--short` short ones run at once, `--tokens` greedy tokens each, on
var/models/dawet-bench-135m (`make bench-model`) in float32 on both sides, each side in a
process of its own (so one's freed memory cannot hide the other's peak), with
DAWET_KV_CACHE_TOKENS = `--budget`. Reported per side: the tokens the batch holds at most,
the tokens the KV buffers are sized for, and the process's peak resident memory over the run,
against the same process before it (so the weights are not counted; activations are).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from bench.backends import MODEL_DIR

SIDES = {"pool": "auto", "window": "transformers"}  # our forward, transformers'


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench --kv-memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kv-memory", action="store_true", help="(what selects this bench)")
    parser.add_argument("--budget", type=int, default=65_536)
    parser.add_argument("--long", type=int, default=1500, help="the long prompt's tokens")
    parser.add_argument("--short", type=int, default=15, help="short prompts beside it")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # one side's process
    args = parser.parse_args()
    if args.side:
        print(json.dumps(_measure(args)))
        return 0
    print(f"{MODEL_DIR.name}, float32: 1 prompt of {args.long} tokens and {args.short} short "
          f"ones, {args.tokens} tokens each, at once; DAWET_KV_CACHE_TOKENS={args.budget}")
    print("| KV cache | tokens held at most | KV buffers sized for (tokens) | MiB | "
          "peak RSS growth MiB |")
    print("|---|---|---|---|---|")
    for side in SIDES:
        out = subprocess.run([sys.executable, "-m", "bench", *sys.argv[1:], "--side", side],
                             check=True, capture_output=True, text=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        print(f"| {side} | {row['held']} | {row['sized']} | {row['sized_mib']:.0f} | "
              f"{row['rss_mib']:.0f} |")
    return 0


def _measure(args: argparse.Namespace) -> dict:
    from model_store.loader import load_model
    from model_store.registry import ModelSpec
    from tasks.engine.batching.engine import BatchingEngine
    from tasks.engine.interface import iterate
    from tasks.jobs.contract import SamplingParams

    loaded = load_model(ModelSpec(name="kv-memory", path=str(MODEL_DIR), dtype="float32",
                                  context_length=4096, max_new_tokens_limit=1024))
    engine = BatchingEngine(loaded, max_batch_size=args.short + 1, kv_cache_tokens=args.budget,
                            forward=SIDES[args.side])
    params = SamplingParams(max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                            temperature=0.0, top_p=1.0)
    words = loaded.tokenizer.encode("Saya suka makan nasi goreng di pasar pagi. " * 400)
    prompts = [words[:args.long]] + [loaded.tokenizer.encode(f"Request {i}: rice and tea")
                                     for i in range(args.short)]
    before, peak = _rss(), _Peak()
    with peak, ThreadPoolExecutor(len(prompts)) as threads:
        list(threads.map(lambda prompt: list(iterate(engine, prompt, params)), prompts))
    sized, token_bytes = _kv_size(engine._runner)
    engine.close()
    return {"held": sum(len(p) + args.tokens - 1 for p in prompts), "sized": sized,
            "sized_mib": sized * token_bytes / 2**20, "rss_mib": (peak.value - before) / 2**20}


def _kv_size(runner) -> tuple[int, int]:
    """(tokens the KV buffers are sized for, bytes of one token's KV over every layer)."""
    if hasattr(runner, "pool"):  # our forward: (slots, kv heads, dim) per layer
        keys = runner.pool.keys
        return runner.pool.capacity, 2 * len(keys) * keys[0][0].numel() * keys[0].element_size()
    keys = runner.kv._keys  # transformers': (rows, kv heads, columns, dim) per layer
    return (keys[0].shape[0] * keys[0].shape[2],
            2 * len(keys) * keys[0][0, :, 0].numel() * keys[0].element_size())


def _rss() -> int:
    with open(f"/proc/{os.getpid()}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS"))


class _Peak:
    """The process's peak resident memory while the block runs, sampled every 5 ms."""

    def __init__(self):
        self.value, self._done = 0, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._done.is_set():
            self.value = max(self.value, _rss())
            time.sleep(0.005)
