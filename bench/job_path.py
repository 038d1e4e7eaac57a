"""Benchmark: a job's time to first token by each way in, in one run, with one client machinery.

    make bench BENCH_ARGS='--job-path'            # or BENCH_ARGS='--job-path --quick'
    python -m bench --job-path [--clients 16] [--rounds 6] [--repeats 5] [--tokens 16]

One stack on `dawet-bench-4m` (bench/keyspace.py's `running_stack`: its own Redis, one batching
worker, two API processes). C client threads run jobs back to back, each over its own
keep-alive connection and socket, as separate users would, taking three paths in turn:
  job API     POST /v1/generate (http.client), then the job's WebSocket (websocket-client)
  job socket  one WebSocket per client, GET /v1/jobs/stream, kept open: a `submit` frame, then
              the job's events on the same socket
  OpenAI SSE  POST /v1/completions with stream = true (http.client)
Client c's k-th job takes path (c + k) mod 3, so a third of the clients are on each path at any
moment and this host's drift (its speed moves by half between runs) hits all three alike.
Every job is the same request: a prompt, exactly `--tokens` new tokens, sampled with a seed.
TTFT runs from sending the request (the POST, the submit frame) to the first token with text.
The worker's own TTFT is the done event's `time_to_first_token_seconds`: from the job's
creation in the API (after admission) to its first token, so it includes the queue wait.
Ratios are medians over repeats of each repeat's ratio of p50s; absolute times are not
comparable from one run to the next here.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import websocket

from bench.keyspace import ApiClient, running_stack, setup_bench_process
from bench.openai_load import sse_events
from bench.pipeline import median, request_body, table_head

logger = logging.getLogger("bench.job_path")

MODEL = "dawet-bench-4m"
TIMEOUT_SECONDS = 120.0
PATHS = ("job API", "job socket", "OpenAI SSE")
BASELINE = "OpenAI SSE"


@dataclass(frozen=True)
class Sample:
    """One job as its client saw it: the job, seconds to its first token, and for the job API
    the seconds its POST took."""

    job_id: str
    ttft: float
    post: float | None = None


def p50(values: list[float]) -> float:
    return median(values) if values else float("nan")


def job_api(client: ApiClient, ws_base: str, tokens: int) -> Callable[[int], Sample]:
    """POST /v1/generate, then read the job's own WebSocket to its end."""

    def run(index: int) -> Sample:
        started = time.perf_counter()
        _, content = client.call("POST", "/v1/generate", request_body(MODEL, index, tokens),
                                 expect=202)
        posted = time.perf_counter() - started
        job = json.loads(content)
        ws = websocket.create_connection(f"{ws_base}/v1/jobs/{job['id']}/stream",
                                         timeout=TIMEOUT_SECONDS)
        try:
            ttft = first_token(received(ws), started)
        finally:
            ws.close()
        return Sample(job["id"], ttft, posted)

    return run


def job_socket(ws_base: str, tokens: int) -> Callable[[int], Sample]:
    """A `submit` frame on the client's own multiplexed socket (opened once, kept), then the
    job's events from it."""
    local = threading.local()

    def run(index: int) -> Sample:
        if not hasattr(local, "ws"):
            local.ws = websocket.create_connection(f"{ws_base}/v1/jobs/stream",
                                                   timeout=TIMEOUT_SECONDS)
        started = time.perf_counter()
        local.ws.send(json.dumps({"type": "submit", "request_id": str(index),
                                  **request_body(MODEL, index, tokens)}))
        submitted = json.loads(local.ws.recv())
        if submitted["type"] != "submitted":
            raise RuntimeError(f"submit refused: {submitted}")
        ttft = first_token(received(local.ws), started)
        return Sample(submitted["job_id"], ttft)

    return run


def openai_sse(client: ApiClient, tokens: int) -> Callable[[int], Sample]:
    """POST /v1/completions with stream = true; the job id is in X-Dawet-Job-Id."""

    def run(index: int) -> Sample:
        body = request_body(MODEL, index, tokens)
        body = {"model": MODEL, "prompt": body["prompt"], "max_tokens": tokens,
                "min_tokens": tokens, "temperature": body["temperature"],
                "top_p": body["top_p"], "seed": body["seed"], "stream": True}
        started = time.perf_counter()
        response = client.open("POST", "/v1/completions", body)
        if response.status != 200:
            raise RuntimeError(f"POST /v1/completions: {response.status} {response.read()!r}")
        return Sample(response.getheader("X-Dawet-Job-Id"),
                      first_token(sse_as_events(response), started))

    return run


def sse_as_events(response) -> Iterator[dict]:
    """A completion stream as job events, for `first_token`; read to [DONE], so that the
    connection carries the next request."""
    for chunk in sse_events(response):
        if "error" in chunk:
            yield {"type": "error", "error": chunk["error"]}
            return
        yield {"type": "token", "text": "".join(c.get("text") or "" for c in chunk["choices"])}
    yield {"type": "done"}


def first_token(events: Iterator[dict], started: float) -> float:
    """Read a job's events to its end; seconds from `started` to its first token with text."""
    ttft = None
    for event in events:
        if event["type"] == "token" and event["text"] and ttft is None:
            ttft = time.perf_counter() - started
        if event["type"] == "error":
            raise RuntimeError(f"job failed: {event}")
        if event["type"] == "done":
            return ttft
    raise RuntimeError("the stream ended before the job did")


def received(ws: websocket.WebSocket) -> Iterator[dict]:
    """A WebSocket's JSON frames."""
    while True:
        yield json.loads(ws.recv())


@dataclass
class Run:
    """One path's run: what its clients saw, and each job's TTFT as its worker measured it."""

    samples: list[Sample]
    worker_ttfts: list[float]

    def ttft_p50(self) -> float:
        return p50([s.ttft for s in self.samples])

    def worker_p50(self) -> float:
        return p50(self.worker_ttfts)

    def post_p50(self) -> float:
        return p50([s.post for s in self.samples if s.post is not None])


def run_mixed(client: ApiClient, clients: int, rounds: int,
              paths: dict[str, Callable[[int], Sample]], first_index: int) -> dict[str, Run]:
    """C threads, `rounds` jobs each back to back, client c's k-th job by path (c + k) mod the
    number of paths; then every job's worker timings (read after the run: it costs the run
    nothing). One Run per path."""
    names = list(paths)

    def one_client(number: int) -> list[tuple[str, Sample]]:
        jobs = []
        for round_ in range(rounds):
            name = names[(number + round_) % len(names)]
            jobs.append((name, paths[name](first_index + number * rounds + round_)))
        return jobs

    with ThreadPoolExecutor(clients) as pool:
        done = [job for jobs in pool.map(one_client, range(clients)) for job in jobs]
    runs = {name: Run([], []) for name in names}
    for name, sample in done:
        _, content = client.call("GET", f"/v1/jobs/{sample.job_id}")
        runs[name].samples.append(sample)
        runs[name].worker_ttfts.append(json.loads(content)["timings"]
                                       ["time_to_first_token_seconds"])
    return runs


def format_table(runs: dict[str, list[Run]]) -> str:
    """A Markdown table of ratios: each path's TTFT p50 over the SSE path's and over its own
    jobs' worker TTFT p50 (medians over repeats of each repeat's ratio)."""
    lines = table_head(f"| path | jobs | TTFT p50 / {BASELINE} TTFT p50 "
                       "| TTFT p50 / its worker TTFT p50 | POST p50 / TTFT p50 "
                       "| TTFT / SSE by repeat |")
    for path in runs:
        to_sse = [run.ttft_p50() / sse.ttft_p50() for run, sse in zip(runs[path], runs[BASELINE])]
        to_worker = [run.ttft_p50() / run.worker_p50() for run in runs[path]]
        posts = [run.post_p50() / run.ttft_p50() for run in runs[path]]
        post = f"{median(posts):.2f}" if path == "job API" else "-"
        lines.append(f"| {path} | {sum(len(r.samples) for r in runs[path])} "
                     f"| **{median(to_sse):.2f}x** | **{median(to_worker):.2f}x** | {post} "
                     f"| {' '.join(f'{ratio:.2f}' for ratio in to_sse)} |")
    return "\n".join(lines)


def bench(api_url: str, args: argparse.Namespace) -> dict[str, list[Run]]:
    """A warm-up run, then `repeats` runs of the paths mixed; each path's Run of each repeat."""
    client = ApiClient(api_url)
    ws_base = api_url.replace("http", "ws", 1)
    paths = {"job API": job_api(client, ws_base, args.tokens),
             "job socket": job_socket(ws_base, args.tokens),
             "OpenAI SSE": openai_sse(client, args.tokens)}
    paths = {name: run for name, run in paths.items() if name in args.paths}
    # warm up: the tokenizer, every client's connection and socket, the engine at this C
    run_mixed(client, args.clients, len(paths), paths, 10**6)
    runs: dict[str, list[Run]] = {name: [] for name in paths}
    for repeat in range(args.repeats):
        for name, run in run_mixed(client, args.clients, args.rounds, paths,
                                   repeat * args.clients * args.rounds).items():
            runs[name].append(run)
            logger.info("repeat %d %s: TTFT p50 %.0f ms, worker TTFT p50 %.0f ms%s",
                        repeat + 1, name, 1000 * run.ttft_p50(), 1000 * run.worker_p50(),
                        f", POST p50 {1000 * run.post_p50():.0f} ms" if name == "job API" else "")
    return runs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench --job-path", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job-path", action="store_true", help="(what selects this bench)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=6,
                        help="jobs per client in each run, taking the paths in turn")
    parser.add_argument("--repeats", type=int, default=5, help="runs")
    parser.add_argument("--tokens", type=int, default=16, help="new tokens per job")
    parser.add_argument("--api-workers", type=int, default=2, help="DAWET_API_WORKERS")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS),
                        help=f"the paths to run ({BASELINE} always runs: the ratios' base)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 rounds, 1 repeat")
    args = parser.parse_args(argv)
    args.paths = {*args.paths, BASELINE}
    if args.quick:
        args.rounds, args.repeats = 3, 1
    return args


def main(argv: list[str] | None = None) -> int:
    """Start the stack, run the paths, print the table."""
    args = parse_args(argv)
    setup_bench_process()
    with running_stack(MODEL, args.api_workers) as stack:
        runs = bench(stack.api_url, args)
    sys.stdout.write(
        f"\n{MODEL}, {args.clients} clients, {args.rounds} jobs of {args.tokens} tokens per "
        f"client and run (the paths in turn), {args.repeats} runs, "
        f"{args.api_workers} API processes, "
        f"{os.cpu_count()} CPUs\n\n{format_table(runs)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
