"""Closed-loop streaming load on any OpenAI-compatible server's POST /v1/completions.

    python -m bench.openai_load --url http://127.0.0.1:8000 --model NAME [--clients 1 16]
    python -m bench.openai_load --vllm-model var/models/dawet-bench-135m [--cpus 0-1]

C client threads, each with one keep-alive http.client connection, each sending R streaming
requests back to back. Every request asks for exactly T tokens (max_tokens = min_tokens = T:
vLLM and Dawet accept min_tokens; ignore_eos is not sent, as Dawet may reject it), sampled at
temperature 0.7 with a seed of its own. Tokens are counted from the stream's final usage chunk
(stream_options.include_usage) when the server sends one, else one per chunk (vLLM sends one
chunk per token, some with empty text: a partial UTF-8 character, a skipped special token; a
chunk with empty text and a finish_reason is a trailer, not counted). TTFT: from sending the
request to its first chunk with non-empty text.
With --vllm-model it starts vLLM's server on that model first (bench/vllm_server.py).
"""
from __future__ import annotations

import argparse
import http.client
import json
import logging
import sys
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench.pipeline import Result, median_run, table_head

logger = logging.getLogger("bench.openai_load")

PROMPT = "Once upon a time, in a small village by the sea, there lived"
TEMPERATURE = 0.7
TIMEOUT_SECONDS = 300.0
SWITCH_INTERVAL_SECONDS = 0.001  # the client threads share one GIL; as bench/pipeline.py


@dataclass
class LoadResult(Result):
    """Result (tokens, seconds, ttfts) plus each request's token count and how it was counted."""

    counts: list[int]
    usage: bool  # every count came from the server's usage chunk

    def off(self, tokens: int) -> int:
        """Requests that did not end with exactly `tokens` tokens."""
        return sum(count != tokens for count in self.counts)


def completion_body(model: str, index: int, tokens: int, prompt: str = PROMPT,
                    usage: bool = True) -> dict:
    """A streaming, sampled request for exactly `tokens` tokens, seeded by its index."""
    body = {"model": model, "prompt": f"{prompt} {index}", "max_tokens": tokens,
            "min_tokens": tokens, "temperature": TEMPERATURE, "seed": index, "stream": True}
    if usage:
        body["stream_options"] = {"include_usage": True}
    return body


def sse_events(response: http.client.HTTPResponse):
    """Yield each parsed `data:` event of an SSE stream up to [DONE], then drain the body so
    the connection can carry the next request."""
    while line := response.readline():
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        yield json.loads(data)
    response.read()


def stream_completion(conn: http.client.HTTPConnection, body: dict) -> tuple[int, float, bool]:
    """Send one streaming completion request; return (tokens, ttft seconds, counted by usage)."""
    started = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"POST /v1/completions: {response.status} {response.read()[:500]!r}")
    ttft, chunks, usage = None, 0, None
    for event in sse_events(response):
        if event.get("usage"):
            usage = event["usage"]["completion_tokens"]
        for choice in event.get("choices") or ():
            chunks += bool(choice.get("text")) or choice.get("finish_reason") is None
            if choice.get("text") and ttft is None:
                ttft = time.perf_counter() - started
    if ttft is None:
        raise RuntimeError(f"no text in the stream of request seed={body['seed']}")
    return (usage, ttft, True) if usage is not None else (chunks, ttft, False)


def run_load(base_url: str, model: str, clients: int, requests: int, tokens: int, *,
             prompt: str = PROMPT, usage: bool = True, first_index: int = 0) -> LoadResult:
    """C = `clients` threads, each sending `requests` streaming requests back to back over its
    own keep-alive connection; request i (seed i) counts from first_index."""
    address = urllib.parse.urlsplit(base_url)

    def client(number: int) -> list[tuple[int, float, bool]]:
        conn = http.client.HTTPConnection(address.hostname, address.port, timeout=TIMEOUT_SECONDS)
        try:
            return [stream_completion(conn, completion_body(
                        model, first_index + number * requests + r, tokens, prompt, usage))
                    for r in range(requests)]
        finally:
            conn.close()

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        outcomes = [one for done in pool.map(client, range(clients)) for one in done]
    seconds = time.perf_counter() - started
    counts = [count for count, _, _ in outcomes]
    return LoadResult(sum(counts), seconds, [ttft for _, ttft, _ in outcomes], counts,
                      all(by_usage for _, _, by_usage in outcomes))


def bench(base_url: str, model: str, args: argparse.Namespace) -> list[tuple[int, LoadResult]]:
    """For each client count: one warm-up round, then `repeats` runs; (C, median run)."""
    rows, index = [], 0
    for clients in args.clients:
        run_load(base_url, model, clients, 1, args.tokens, usage=args.usage, first_index=10**6)
        runs = []
        for _ in range(args.repeats):
            runs.append(run_load(base_url, model, clients, args.requests, args.tokens,
                                 usage=args.usage, first_index=index))
            index += clients * args.requests
        middle = median_run(runs)  # a Result: keep the counts of every run
        rows.append((clients, LoadResult(middle.tokens, middle.seconds, middle.ttfts,
                                         [c for r in runs for c in r.counts],
                                         all(r.usage for r in runs))))
        logger.info("C=%d: %s tok/s by run", clients,
                    " ".join(f"{r.tokens_per_second:.0f}" for r in runs))
    return rows


def format_table(rows: list[tuple[int, LoadResult]], tokens: int) -> str:
    """A Markdown table of the median runs."""
    lines = table_head("| C | tok/s | TTFT p50 ms | TTFT p99 ms | requests | not T tokens "
                       "| counted by |")
    for clients, r in rows:
        lines.append(f"| {clients} | {r.tokens_per_second:.0f} | {r.ttft_ms(0.5):.0f} "
                     f"| {r.ttft_ms(0.99):.0f} | {len(r.counts)} | {r.off(tokens)} "
                     f"| {'usage' if r.usage else 'chunks'} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.openai_load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="base URL of a running server")
    target.add_argument("--vllm-model", type=Path, help="start vLLM's server on this model directory")
    parser.add_argument("--model", help="model name to request (default: the --vllm-model directory's name)")
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--requests", type=int, default=4, help="requests per client in a run")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per request")
    parser.add_argument("--repeats", type=int, default=1, help="runs per client count (median shown)")
    parser.add_argument("--no-usage", dest="usage", action="store_false",
                        help="do not ask for stream_options.include_usage (count chunks)")
    parser.add_argument("--cpus", default="auto", help="VLLM_CPU_OMP_THREADS_BIND for --vllm-model")
    parser.add_argument("--kv-cache-gib", type=float, default=2, help="VLLM_CPU_KVCACHE_SPACE for --vllm-model")
    parser.add_argument("--vllm-log", type=Path, help="vLLM's log file (default: a temporary directory)")
    args = parser.parse_args(argv)
    if not args.model and not args.vllm_model:
        parser.error("--url needs --model")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.url:
        rows = bench(args.url, args.model, args)
    else:
        from bench.vllm_server import vllm_server

        name = args.model or args.vllm_model.resolve().name
        with vllm_server(args.vllm_model, name, cpus=args.cpus, kv_cache_gib=args.kv_cache_gib,
                         log_path=args.vllm_log) as url:
            rows = bench(url, name, args)
    sys.stdout.write(f"\n{args.tokens} tokens per request, {args.requests} requests per client, "
                     f"median of {args.repeats} runs\n\n{format_table(rows, args.tokens)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
