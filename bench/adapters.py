"""Many adapters over one base: what a mixed batch costs in our engine.

    python -m bench --adapters [--repeats 5] [--clients 16] [--tokens 64]

One batching engine on the demo base (dawet-tiny, in this process, `dawet run`'s engine
settings), `--clients` requests of `--tokens` greedy tokens at once, three ways, alternating
which goes first each repeat:
  base    every request on the bare base
  one     every request on one adapter (dawet-demo)
  mixed   the requests spread over the base and both adapters (dawet-demo, dawet-kopi)
Reported: each way's median tokens/s and its ratio to `base`, measured in one run.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time

from bench.pipeline import ROOT, median, parse_repeats, repeats_parser, table_head

logger = logging.getLogger("bench.adapters")

BASE, ADAPTERS = "dawet-tiny", ("dawet-demo", "dawet-kopi")
PROMPT = "Hello, what should I cook today?"


def ways(registry) -> dict[str, list]:
    """Each way's LoRA adapter per client slot (None: the base), cycled over the clients."""
    from tasks.jobs.contract import LoraAdapter

    loras = [LoraAdapter(name=name, path=registry.get(name).lora, base=BASE) for name in ADAPTERS]
    return {"base": [None], "one": loras[:1], "mixed": [None, *loras]}


def tokens_per_second(engine, prompt: list[int], loras: list, clients: int, tokens: int) -> float:
    from tasks.engine.interface import iterate
    from tasks.jobs.contract import SamplingParams

    def run(index: int) -> None:
        params = SamplingParams(max_new_tokens=tokens, min_new_tokens=tokens, temperature=0.0,
                                top_p=1.0, lora=loras[index % len(loras)])
        for _ in iterate(engine, prompt, params):
            pass

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return clients * tokens / (time.perf_counter() - started)


def format_table(results: dict[str, list[float]]) -> str:
    lines = table_head("| requests | tokens/s p50 | / base |")
    base = median(results["base"])
    for way, runs in results.items():
        lines.append(f"| {way} | {median(runs):.0f} | {median(runs) / base:.2f}x |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = repeats_parser("adapters", __doc__, repeats=5)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    return parse_repeats(parser, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from dawet.settings import Settings
    from model_store.loader import load_model
    from model_store.registry import load_registry
    from model_store.tokenizer import Message
    from tasks.engine.factory import build_engine, configure_torch_threads, engine_options

    registry = load_registry(ROOT / "models.toml")
    options = engine_options(Settings(), registry.get(BASE))
    configure_torch_threads(options)
    loaded = load_model(registry.get(BASE))
    engine = build_engine(loaded, options)
    prompt = loaded.tokenizer.encode(loaded.tokenizer.render([Message("user", PROMPT)]))
    plans = ways(registry)
    for loras in plans.values():  # warm-up: every adapter loaded
        tokens_per_second(engine, prompt, loras, len(loras), 4)
    results: dict[str, list[float]] = {way: [] for way in plans}
    for repeat in range(args.repeats):
        for way in list(plans) if repeat % 2 == 0 else list(plans)[::-1]:
            results[way].append(tokens_per_second(engine, prompt, plans[way], args.clients,
                                                  args.tokens))
        logger.info("repeat %d: %s", repeat, results)
    engine.close()
    sys.stdout.write(f"\n{BASE} and its adapters, {args.clients} requests x {args.tokens} tokens "
                     f"at once, our engine; medians of {args.repeats} repeats\n\n"
                     f"{format_table(results)}\n")
    return 0
