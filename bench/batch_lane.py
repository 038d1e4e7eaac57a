"""Benchmark: interactive requests' TTFT with and without a batch running beside them.

    make bench BENCH_ARGS='--batch-lane'          # or BENCH_ARGS='--batch-lane --quick'
    python -m bench --batch-lane [--short-clients 3] [--rounds 10] [--seconds 10] [--tokens 16]
                                 [--batch-lines 3000] [--batch-tokens 64] [--in-flight N]
                                 [--repeats 3]

One API process and one worker on the demo model, started as bench/keyspace.py's
running_stack does, with `--in-flight` batch lines in flight at most (default:
DAWET_BATCH_MAX_IN_FLIGHT's). Short
requests are bench/responsive.py's: `--short-clients` clients, each streaming chat completions
of `--tokens` tokens back to back for at least `--rounds` requests and `--seconds`; TTFT runs
from sending a request to its first chunk with content. Phase A runs them alone. Phase B runs
them while a batch of `--batch-lines` chat requests of `--batch-tokens` tokens each runs: the
batch is created before the phase, which starts once its first lines are done (so its lines
fill their slots), and it is cancelled after. A and B take turns `--repeats` times. Prints the
short requests' TTFT p50/p99 in A and in B, the ratios B / A (the target: p50 within 1.5x),
and the batch lines completed per second during B.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time

from openai import OpenAI

from bench.keyspace import ApiClient, running_stack, setup_bench_process
from bench.pipeline import Result
from bench.responsive import (chat_ttft, parsed_phases, phase_arguments, short_chat,
                              short_requests, ttft_table)
from dawet.settings import Settings

logger = logging.getLogger("bench.batch_lane")

MODEL = "dawet-demo"
TARGET_RATIO = 1.5


def batch_file(sdk: OpenAI, lines: int, tokens: int) -> str:
    """Upload the batch's requests once; the file's id."""
    requests = [{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
                 "body": {"model": MODEL, "max_tokens": tokens, "min_tokens": tokens,
                          "temperature": 0.7, "seed": i,
                          "messages": [{"role": "user", "content": f"Ceritakan resep {i}."}]}}
                for i in range(lines)]
    content = "".join(json.dumps(request) + "\n" for request in requests).encode()
    return sdk.files.create(file=("bench.jsonl", content), purpose="batch").id


def with_batch(client: ApiClient, sdk: OpenAI, file_id: str,
               args: argparse.Namespace) -> tuple[Result, float]:
    """Phase B: the short requests while a batch runs; and its lines completed per second."""
    batch = sdk.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                               completion_window="24h")
    while sdk.batches.retrieve(batch.id).request_counts.completed < args.in_flight:
        time.sleep(0.2)
    before, started = sdk.batches.retrieve(batch.id).request_counts.completed, time.perf_counter()
    short = short_requests(client, args)
    during = sdk.batches.retrieve(batch.id)
    rate = (during.request_counts.completed - before) / (time.perf_counter() - started)
    if during.status != "in_progress":
        raise SystemExit(f"the batch ended ({during.status}) before phase B did: "
                         "raise --batch-lines")
    sdk.batches.cancel(batch.id)
    while sdk.batches.retrieve(batch.id).status != "cancelled":
        time.sleep(0.2)
    return short, rate


def format_table(quiet: list[Result], busy: list[Result], rates: list[float]) -> str:
    """A Markdown table: TTFT alone (A) and beside a batch (B), the ratios, the batch's rate."""
    lines, p50 = ttft_table(quiet, busy, "batch lines/s in B", f"{sum(rates) / len(rates):.1f}", 2)
    verdict = "met" if p50 <= TARGET_RATIO else "NOT met"
    lines.append(f"\nTTFT p50 B / A = {p50:.2f}x: target <= {TARGET_RATIO}x {verdict}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench --batch-lane", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-lane", action="store_true", help="(what selects this bench)")
    phase_arguments(parser, tokens=16)
    parser.add_argument("--batch-lines", type=int, default=3000)
    parser.add_argument("--batch-tokens", type=int, default=64)
    parser.add_argument("--in-flight", type=int,
                        default=Settings.model_fields["batch_max_in_flight"].default,
                        help="DAWET_BATCH_MAX_IN_FLIGHT for the stack")
    return parsed_phases(parser, argv)


def main(argv: list[str] | None = None) -> int:
    """Start one API process and a worker, alternate phases A and B, print the table."""
    args = parse_args(argv)
    setup_bench_process()
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # the openai client's every request
    os.environ.setdefault("DAWET_FILES_DIR", tempfile.mkdtemp(prefix="dawet-bench-files-"))
    os.environ["DAWET_BATCH_MAX_IN_FLIGHT"] = str(args.in_flight)  # the stack's settings read it
    quiet, busy, rates = [], [], []
    with running_stack(MODEL, api_workers=1) as stack:
        client = ApiClient(stack.api_url)
        sdk = OpenAI(base_url=f"{stack.api_url}/v1", api_key="unused", max_retries=0)
        chat_ttft(client, short_chat(args.tokens, 10**6))  # the API loads the tokenizer
        file_id = batch_file(sdk, args.batch_lines, args.batch_tokens)
        for repeat in range(args.repeats):
            quiet.append(short_requests(client, args))
            short, rate = with_batch(client, sdk, file_id, args)
            busy.append(short)
            rates.append(rate)
            logger.info("turn %d: A and B measured", repeat + 1)
    sys.stdout.write(
        f"\n{MODEL}, 1 API process, 1 worker (16 slots), {args.short_clients} short clients "
        f"streaming chat completions of {args.tokens} tokens, at least {args.rounds} each and "
        f"{args.seconds:g} s per phase; B beside a batch of {args.batch_lines} lines of "
        f"{args.batch_tokens} tokens ({args.in_flight} lines in flight at most); "
        f"{args.repeats} turns of A and B, {os.cpu_count()} CPUs\n\n"
        f"{format_table(quiet, busy, rates)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
