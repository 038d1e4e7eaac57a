"""Benchmark Dawet with the vllm backend against vLLM's own OpenAI server, side by side.

    python -m bench --backend vllm [--clients 1 16] [--repeats 5]

Both serve the same checkpoint (default: var/models/dawet-bench-135m, a random-weight model of
SmolLM2-135M's shape, `make bench-model`) with the same threads and binding: `--threads` OMP
threads each, bound to no core (vLLM's VLLM_CPU_OMP_THREADS_BIND=nobind; our engine process
binds nothing). Both stay up for the whole run and take turns, so each repeat's runs are
seconds apart; the idle one waits on its queue. The same client (bench/openai_load.py) drives
both: C threads, each streaming `--requests` POST /v1/completions of exactly `--tokens` tokens.
  dawet   API → Celery → worker → engine process running vLLM's LLMEngine → Redis → SSE
  vllm    python -m vllm.entrypoints.openai.api_server (its API process and engine core)
Reported per C: tokens/s and TTFT of each side's median run, and the medians over repeats of
each repeat's throughput ratio and TTFT p50 ratio (dawet / vllm).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.openai_load import LoadResult, run_load
from bench.pipeline import ROOT, median, median_run, paired_ratios, table_head
from bench.vllm_server import vllm_server
from dawet.processes import Stack, free_port
from dawet.settings import Settings
from tasks.engine.vllm import cpu_kv_cache_gib

logger = logging.getLogger("bench.backends")

MODEL_DIR = ROOT / "var/models/dawet-bench-135m"
NAME = "dawet-bench-135m"


def registry_file(model_dir: Path, folder: Path) -> Path:
    """A registry with one model: the checkpoint on the vllm backend."""
    path = folder / "models.toml"
    path.write_text(f'default = "{NAME}"\n\n[[models]]\nname = "{NAME}"\n'
                    f'path = "{model_dir.resolve()}"\nbackend = "vllm"\ndtype = "float32"\n'
                    f"context_length = 2048\nmax_new_tokens_limit = 1024\n")
    return path


@contextmanager
def dawet_stack(args: argparse.Namespace, folder: Path) -> Iterator[str]:
    """Redis, one vllm worker and one API process; yields the API's URL."""
    settings = Settings(models_file=registry_file(args.model_dir, folder),
                        default_model=NAME, api_port=free_port(), api_workers=1,
                        max_batch_size=args.max_batch, kv_cache_tokens=args.kv_cache_tokens,
                        torch_threads=args.threads,
                        log_level="WARNING", worker_metrics_port=0)
    (folder / "dawet").mkdir()
    stack = Stack(settings, log_dir=folder / "dawet", ready_timeout=900).start()
    try:
        yield stack.api_url
    finally:
        stack.stop()


def run_pairs(urls: dict[str, str], clients: int, args: argparse.Namespace,
              model: str = NAME) -> dict:
    """A warm-up each, then `repeats` turns, alternating which side goes first. `urls` holds
    two sides, the measured one first; ratios are it over the other."""
    sides = tuple(urls)
    for side in sides:
        run_load(urls[side], model, clients, 1, args.tokens, first_index=10**6)
    runs: dict[str, list[LoadResult]] = {side: [] for side in sides}
    for repeat in range(args.repeats):
        for side in sides if repeat % 2 == 0 else sides[::-1]:
            runs[side].append(run_load(urls[side], model, clients, args.requests, args.tokens,
                                       first_index=repeat * clients * args.requests))
        logger.info("C=%d repeat %d: %s", clients, repeat, ", ".join(
            f"{side} {runs[side][-1].tokens_per_second:.0f}" for side in sides) + " tok/s")
    measured, other = (runs[side] for side in sides)
    ttft = [m.ttft_ms(0.5) / o.ttft_ms(0.5) for m, o in zip(measured, other)]
    pairs = paired_ratios(measured, other)
    logger.info("C=%d paired tok/s ratios: %s", clients, " ".join(f"{r:.3f}" for r in pairs))
    return {"clients": clients, **{side: median_run(runs[side]) for side in sides},
            "throughput": median(pairs), "ttft": median(ttft), "pairs": pairs}


TITLES = {"dawet": ("Dawet (vllm backend)", "Dawet"), "vllm": ("vLLM server", "vLLM")}


def format_table(rows: list[dict], titles: dict[str, tuple[str, str]] = TITLES) -> str:
    """run_pairs' rows as a table; `titles`: each side's (column title, name in the ratios),
    in run_pairs' order."""
    (first, (first_column, first_name)), (second, (second_column, second_name)) = titles.items()
    head = (f"| C | {first_column} tok/s | TTFT p50 ms | TTFT p99 ms | {second_column} tok/s "
            f"| TTFT p50 ms | TTFT p99 ms | tok/s {first_name} / {second_name} "
            f"| TTFT p50 {first_name} / {second_name} |")
    lines = table_head(head)
    for row in rows:
        one, other = row[first], row[second]
        lines.append(f"| {row['clients']} | {one.tokens_per_second:.0f} "
                     f"| {one.ttft_ms(0.5):.0f} | {one.ttft_ms(0.99):.0f} "
                     f"| {other.tokens_per_second:.0f} | {other.ttft_ms(0.5):.0f} "
                     f"| {other.ttft_ms(0.99):.0f} | {row['throughput']:.2f}x | {row['ttft']:.2f}x |")
    return "\n".join(lines)


def pair_arguments(parser: argparse.ArgumentParser) -> None:
    """A paired bench's arguments: the checkpoint, the clients, the runs and a smoke run."""
    parser.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--requests", type=int, default=4, help="requests per client in a run")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per request")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="smoke run: C = 4, 16 tokens, 1 repeat")


def parsed_pairs(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.tokens, args.repeats, args.requests = [4], 16, 1, 1
    return args


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench --backend vllm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["vllm"], default="vllm")
    pair_arguments(parser)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="OMP threads of each engine")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--kv-cache-tokens", type=int, default=65_536,
                        help="Dawet's KV budget; vLLM's server gets the same GiB")
    return parsed_pairs(parser, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # both engines inherit it
    if not (args.model_dir / "config.json").exists():
        sys.exit(f"{args.model_dir} is missing: run `make bench-model`")
    folder = Path(tempfile.mkdtemp(prefix="dawet-bench-backends-"))
    kv_gib = cpu_kv_cache_gib(args.model_dir, args.kv_cache_tokens)  # as the vllm backend sizes it
    with vllm_server(args.model_dir, NAME, cpus="nobind", kv_cache_gib=kv_gib,
                     extra_args=["--max-num-seqs", str(args.max_batch)],
                     log_path=folder / "vllm.log") as vllm_url, \
            dawet_stack(args, folder) as dawet_url:
        rows = [run_pairs({"dawet": dawet_url, "vllm": vllm_url}, c, args) for c in args.clients]
    sys.stdout.write(f"\n{args.model_dir.name}: {args.tokens} tokens per request, "
                     f"{args.requests} requests per client, {args.threads} OMP threads each, "
                     f"unbound; median of {args.repeats} runs and of their paired ratios "
                     f"(logs: {folder})\n\n{format_table(rows)}\n")
    return 0
