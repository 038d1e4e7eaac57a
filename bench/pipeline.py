"""Benchmark the serving pipeline against the engine alone.

For each model and each client count C, three kinds of run of C closed-loop clients, each
asking for exactly `tokens` new tokens per job (min_new_tokens = max_new_tokens), repeated and
interleaved; the table shows each kind's median run, TTFTs over all its runs, and the median
over repeats of each repeat's ratios:
  pipeline    HTTP POST /v1/generate → Celery → worker (batching engine) → Redis → WebSocket
  in-process  the same BatchingEngine called from C threads, no queue (the ceiling)
  sequential  SequentialEngine called from min(C, 16) threads in-process, one round (one job
              at a time: the baseline; its rate does not depend on C)
Reported: output tokens/s, time to first token p50/p99, and the pipeline's ratios to both.
"""
from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import websocket

from dawet.cpus import pin_process
from dawet.processes import Stack, free_port
from dawet.settings import Settings
from tasks.engine.process import GIL_SWITCH_SECONDS

logger = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("dawet-demo", "dawet-bench-4m")
CONCURRENCY = (1, 4, 16, 64)
SEQUENTIAL_JOBS = 16  # the most jobs the sequential baseline runs per row
PROMPT = "Once upon a time, in a small village by the sea, there lived"


@dataclass
class Result:
    """One run: tokens produced, wall time and each job's time to first token."""

    tokens: int
    seconds: float
    ttfts: list[float]

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds

    def ttft_ms(self, quantile: float) -> float:
        ordered = sorted(self.ttfts)
        return 1000 * ordered[min(len(ordered) - 1, round(quantile * (len(ordered) - 1)))]


def paired_ratios(results: list[Result], baselines: list[Result]) -> list[float]:
    """Throughput over the baseline's throughput, repeat by repeat: the runs of one repeat are
    seconds apart, so the host's drift cancels out of each ratio."""
    return [r.tokens_per_second / b.tokens_per_second for r, b in zip(results, baselines)]


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def median_run(results: list[Result]) -> Result:
    """The run of median throughput, carrying every run's TTFTs (so p99 spans all of them)."""
    middle = sorted(results, key=lambda r: r.tokens_per_second)[len(results) // 2]
    return Result(middle.tokens, middle.seconds, [t for r in results for t in r.ttfts])


def request_body(model: str, index: int, tokens: int) -> dict:
    """A sampled request that generates exactly `tokens` tokens."""
    return {"model": model, "prompt": f"{PROMPT} {index}", "max_new_tokens": tokens,
            "min_new_tokens": tokens, "temperature": 0.7, "top_p": 0.95, "seed": index}


def closed_loop(clients: int, rounds: int, one_job: Callable[[int], tuple[int, float]]) -> Result:
    """Run `clients` threads, each doing `rounds` jobs back to back; one_job → (tokens, ttft)."""
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        outcomes = list(pool.map(one_job, range(clients * rounds)))
    seconds = time.perf_counter() - started
    return Result(sum(t for t, _ in outcomes), seconds, [ttft for _, ttft in outcomes])


def pipeline_job(api_url: str, model: str, tokens: int) -> Callable[[int], tuple[int, float]]:
    """One job through the API: POST, then read its WebSocket stream to the end.

    Each client thread keeps its own keep-alive connection, as separate users would, and
    POSTs with http.client: the clients share the server's CPUs here, and httpx cost them
    about 0.7 ms more per request (2.9 against 2.1 ms per sequential POST)."""
    local = threading.local()
    address = urllib.parse.urlsplit(api_url)

    def post(body: dict) -> dict:
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPConnection(address.hostname, address.port, timeout=120)
        local.conn.request("POST", "/v1/generate", json.dumps(body),
                           {"Content-Type": "application/json"})
        response = local.conn.getresponse()
        if response.status != 202:
            raise RuntimeError(f"POST /v1/generate: {response.status} {response.read()!r}")
        return json.loads(response.read())

    def run(index: int) -> tuple[int, float]:
        started = time.perf_counter()
        job = post(request_body(model, index, tokens))
        ws = websocket.create_connection(job["stream_url"], timeout=120)
        first = None
        try:
            while True:
                event = json.loads(ws.recv())
                if event["type"] == "token" and first is None:
                    first = time.perf_counter() - started
                if event["type"] in ("done", "error"):
                    break
        finally:
            ws.close()
        if event["type"] == "error":
            raise RuntimeError(f"job failed: {event}")
        return event["usage"]["completion_tokens"], first

    return run


def engine_job(engine, spec, tokenizer, tokens: int) -> Callable[[int], tuple[int, float]]:
    """One job straight into an engine, in this process, its steps only counted. It is the
    pipeline's job exactly: the same request body, resolved against the model's defaults (a
    repetition penalty, say) and its prompt encoded as the API does."""
    from api.schemas import GenerateRequest

    def run(index: int) -> tuple[int, float]:
        request = GenerateRequest.model_validate(request_body(spec.name, index, tokens))
        prompt_ids, params = tokenizer.encode_prompt(request.prompt), request.sampling_params(spec)
        started, marks = time.perf_counter(), []

        def count(step) -> None:
            marks.append((step.token_id is not None, time.perf_counter() - started))

        engine.run(prompt_ids, params, threading.Event(), count)
        return sum(produced for produced, _ in marks), marks[0][1]

    return run


def start_stack(args: argparse.Namespace, log_dir: Path) -> Stack:
    """Redis, one batching worker per model (concurrency = max batch) and the API."""
    settings = Settings(models_file=ROOT / "models.toml", default_model=args.models[0],
                        api_port=free_port(), api_workers=args.api_workers,
                        max_batch_size=args.max_batch, worker_concurrency=args.max_batch,
                        engine="batching", stream_chunk_seconds=args.chunk_seconds,
                        torch_threads=args.torch_threads, engine_cpus=args.engine_cpus,
                        log_level="WARNING")
    return Stack(settings, models=list(args.models), log_dir=log_dir).start()


def bench_model(stack: Stack, model: str, args: argparse.Namespace,
                split: tuple[frozenset[int], frozenset[int]] | None) -> list[dict]:
    """All runs for one model; the engines load here, in the bench process. `split` is the
    engine's CPUs and the others', read before this process kept to the others."""
    from model_store.loader import load_model
    from model_store.registry import load_registry
    from tasks.engine.batching.engine import BatchingEngine
    from tasks.engine.sequential import SequentialEngine

    loaded = load_model(load_registry(ROOT / "models.toml").get(model))
    if split:  # the in-process scheduler gets the engine's CPUs too; the clients keep off them
        os.sched_setaffinity(0, split[0])  # this thread only: the scheduler inherits it
    batching = BatchingEngine(loaded, args.max_batch, stack.settings.kv_cache_tokens)
    if split:
        os.sched_setaffinity(0, split[1])
    sequential = SequentialEngine(loaded)
    rows = []
    for clients in args.concurrency:
        run = {"pipeline": pipeline_job(stack.api_url, model, args.tokens),
               "in-process": engine_job(batching, loaded.spec, loaded.tokenizer, args.tokens),
               "sequential": engine_job(sequential, loaded.spec, loaded.tokenizer, args.tokens)}
        closed_loop(clients, 1, run["pipeline"])  # warm up the stack at this concurrency
        runs: dict[str, list[Result]] = {name: [] for name in run}
        for _ in range(args.repeats):  # interleaved, so a slow spell of the host hits all three
            for name in ("pipeline", "in-process"):
                runs[name].append(closed_loop(clients, args.rounds, run[name]))
            # one job at a time: its rate does not depend on C, so a few jobs measure it
            runs["sequential"].append(closed_loop(min(clients, SEQUENTIAL_JOBS), 1,
                                                  run["sequential"]))
        rows.append({"model": model, "clients": clients,
                     **{name: median_run(results) for name, results in runs.items()},
                     "ratios": [median(paired_ratios(runs["pipeline"], runs[name]))
                                for name in ("in-process", "sequential")]})
        logger.info("%s C=%d done; pipeline / in-process by repeat: %s", model, clients,
                    " ".join(f"{ratio:.2f}" for ratio in
                             paired_ratios(runs["pipeline"], runs["in-process"])))
    batching.close()
    return rows


def repeats_parser(mode: str, doc: str, repeats: int) -> argparse.ArgumentParser:
    """The parser of a `python -m bench --<mode>` comparison run `--repeats` times (2 with
    --quick); parse with parse_repeats."""
    parser = argparse.ArgumentParser(prog=f"python -m bench --{mode}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(f"--{mode}", action="store_true")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 repeats")
    return parser


def parse_repeats(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 2
    return args


def table_head(head: str) -> list[str]:
    """A Markdown table's header row and the separator row under it."""
    return [head, "|" + "---|" * (head.count("|") - 1)]


def format_table(rows: list[dict]) -> str:
    """A Markdown table of the runs."""
    head = ("| model | C | pipeline tok/s | TTFT p50 ms | TTFT p99 ms | in-process tok/s "
            "| in-process TTFT p99 ms | sequential tok/s | pipeline / in-process "
            "| pipeline / sequential |")
    lines = table_head(head)
    for row in rows:
        pipe, ceiling, seq = row["pipeline"], row["in-process"], row["sequential"]
        to_ceiling, to_sequential = row["ratios"]
        lines.append(
            f"| {row['model']} | {row['clients']} | {pipe.tokens_per_second:.0f} "
            f"| {pipe.ttft_ms(0.5):.0f} | {pipe.ttft_ms(0.99):.0f} "
            f"| {ceiling.tokens_per_second:.0f} | {ceiling.ttft_ms(0.99):.0f} "
            f"| {seq.tokens_per_second:.0f} "
            f"| {to_ceiling:.2f}x | {to_sequential:.1f}x |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--concurrency", nargs="+", type=int, default=list(CONCURRENCY))
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per job")
    parser.add_argument("--rounds", type=int, default=3, help="jobs per client in each run")
    parser.add_argument("--repeats", type=int, default=5,
                        help="runs of each kind per C; the table shows the median run and the "
                             "median of each repeat's ratios")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--chunk-seconds", type=float, default=0.05,
                        help="DAWET_STREAM_CHUNK_SECONDS for the worker")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="DAWET_TORCH_THREADS for the worker and the in-process runs (0: default)")
    parser.add_argument("--api-workers", default="auto",
                        help="DAWET_API_WORKERS (auto: one per CPU left to the stack when the "
                             "engine has CPUs of its own, else the setting's default)")
    parser.add_argument("--engine-cpus", default="auto",
                        help="DAWET_ENGINE_CPUS for the worker, and the CPUs of the in-process "
                             "scheduler; the clients keep to the others (auto: the last CPU on "
                             "a host with two or more; '' pins nothing)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: dawet-bench-4m, C = 1 and 16, 16 tokens, one round")
    args = parser.parse_args(argv)
    if args.engine_cpus == "auto":
        usable = sorted(os.sched_getaffinity(0))
        args.engine_cpus = str(usable[-1]) if len(usable) > 1 else ""
    if args.api_workers == "auto":
        split = Settings(engine_cpus=args.engine_cpus).engine_cpu_split()
        args.api_workers = len(split[1]) if split else Settings().api_workers
    args.api_workers = int(args.api_workers)
    if args.quick:
        args.models, args.concurrency, args.tokens, args.rounds = ["dawet-bench-4m"], [1, 16], 16, 1
        args.repeats = 1
    return args


def main(argv: list[str] | None = None) -> int:
    """Start the stack, run every model and client count, print the table."""
    args = parse_args(argv)
    # The client threads share this process's GIL, and websocket-client reads a handshake's
    # reply one byte (one recv, one GIL hand-off) at a time: at CPython's 5 ms switch interval
    # a thread back from recv waited that long behind the others. 1 ms, as the worker uses.
    sys.setswitchinterval(GIL_SWITCH_SECONDS)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    log_dir = Path(tempfile.mkdtemp(prefix="dawet-bench-"))
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)  # the in-process runs match the worker
    stack = start_stack(args, log_dir)
    split = stack.settings.engine_cpu_split()
    if split:
        pin_process(split[1])  # the clients, like the stack's other processes
    try:
        rows = [row for model in args.models for row in bench_model(stack, model, args, split)]
    finally:
        stack.stop()
    sys.stdout.write(f"\n{args.tokens} new tokens per job, {args.rounds} jobs per client, "
                     f"median of {args.repeats} runs and of their paired ratios, "
                     f"{os.cpu_count()} CPUs, torch threads {args.torch_threads or 'default'}, "
                     f"engine CPUs {args.engine_cpus or 'any'}, "
                     f"chunk {args.chunk_seconds}s (logs: {log_dir})\n\n"
                     f"{format_table(rows)}\n")
    return 0
