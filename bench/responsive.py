"""Benchmark: the API's event loop stays responsive while it works through huge prompts.

    make bench BENCH_ARGS='--responsive'          # or BENCH_ARGS='--responsive --quick'
    python -m bench --responsive [--short-clients 3] [--rounds 10] [--seconds 10] [--big-clients 2]
                                 [--repeats 3]

One API process (DAWET_API_WORKERS=1: one gevent loop serves every request) and one worker on
the demo model, started as bench/pipeline.py does. Short requests: `--short-clients` clients,
each streaming chat completions of `--tokens` tokens back to back until it has made `--rounds`
and `--seconds` have passed; TTFT runs from sending a request to its first chunk with content.
Phase A runs them alone; phase B runs them while `--big-clients` other clients keep POSTing
prompts of about 950 KB (under the 1,000,000-byte DAWET_MAX_REQUEST_BYTES), in turn as a chat
message and as a /v1/completions prompt. The demo model's context is 2,048 tokens, so the API
refuses each big one (400 context_length_exceeded), but only after parsing it, rendering the
chat template and tokenizing it: the work the short requests wait behind if it holds the loop.
A and B take turns `--repeats` times, so the host's drift hits both. Prints the short requests'
TTFT p50/p99 in A and in B (over all turns), the ratios B/A, and the big requests answered per
second in B with their statuses.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from bench.keyspace import ApiClient, running_stack, setup_bench_process
from bench.openai_load import sse_events
from bench.pipeline import ROOT, Result, median_run, table_head
from dawet.settings import Settings

logger = logging.getLogger("bench.responsive")

MODEL = "dawet-demo"
MAX_REQUEST_BYTES = Settings.model_fields["max_request_bytes"].default  # 1,000,000
BIG_TEXT_BYTES = 950_000  # leaves room for the JSON around it under MAX_REQUEST_BYTES
CORPUS = ROOT / "model_store" / "demo" / "corpus"
BIG_VARIANTS = 4  # distinct texts per route, so no two requests in a row send the same prompt


def corpus_words() -> list[str]:
    """The demo corpus's words, English and Indonesian: text the tokenizer was trained on."""
    text = " ".join(path.read_text() for path in sorted(CORPUS.glob("*_chat.jsonl")))
    return sorted(set(re.findall(r"[A-Za-z']+", text)) - {"content", "role", "messages"})


def big_text(words: list[str], seed: int) -> str:
    """About BIG_TEXT_BYTES of words drawn at random, in sentences."""
    rng, parts, size = random.Random(seed), [], 0
    while size < BIG_TEXT_BYTES:
        sentence = " ".join(rng.choices(words, k=rng.randint(5, 20))).capitalize() + ". "
        parts.append(sentence)
        size += len(sentence)
    return "".join(parts)[:BIG_TEXT_BYTES]


def big_bodies(words: list[str]) -> list[tuple[str, bytes]]:
    """(path, JSON body) pairs, chat and text completions in turn, each with a text of its own."""
    bodies = []
    for seed in range(BIG_VARIANTS):
        text = big_text(words, seed)
        bodies.append(("/v1/chat/completions", {"model": MODEL, "max_tokens": 4,
                                                "messages": [{"role": "user", "content": text}]}))
        bodies.append(("/v1/completions", {"model": MODEL, "max_tokens": 4, "prompt": text}))
    encoded = [(path, json.dumps(body).encode()) for path, body in bodies]
    assert all(len(body) < MAX_REQUEST_BYTES for _, body in encoded), "a big body is too big"
    return encoded


def short_chat(tokens: int, index: int) -> dict:
    """A streaming chat completion of exactly `tokens` tokens, seeded by its index."""
    return {"model": MODEL, "messages": [{"role": "user", "content": f"Halo! Masak apa {index}?"}],
            "max_tokens": tokens, "min_tokens": tokens, "temperature": 0.7, "seed": index,
            "stream": True}


def chat_ttft(client: ApiClient, body: dict) -> float:
    """Stream one chat completion to its end; seconds from sending it to its first content."""
    started = time.perf_counter()
    response = client.open("POST", "/v1/chat/completions", body)
    if response.status != 200:
        raise RuntimeError(f"POST /v1/chat/completions: {response.status} "
                           f"{response.read()[:300]!r}")
    ttft = None
    for event in sse_events(response):
        for choice in event.get("choices") or ():
            if ttft is None and choice["delta"].get("content"):
                ttft = time.perf_counter() - started
    if ttft is None:
        raise RuntimeError(f"no content in the stream of request seed={body['seed']}")
    return ttft


def short_requests(client: ApiClient, args: argparse.Namespace) -> Result:
    """The short clients, each streaming back to back until it has made `--rounds` requests
    and `--seconds` have passed: enough samples when the loop is slow, and a phase B long
    enough to count the big requests when it is fast. A Result whose ttfts are their TTFTs."""
    deadline = time.perf_counter() + args.seconds

    def one_client(number: int) -> list[float]:
        ttfts: list[float] = []
        while len(ttfts) < args.rounds or time.perf_counter() < deadline:
            body = short_chat(args.tokens, number * 10**4 + len(ttfts))
            ttfts.append(chat_ttft(client, body))
        return ttfts

    started = time.perf_counter()
    with ThreadPoolExecutor(args.short_clients) as pool:
        ttfts = [ttft for done in pool.map(one_client, range(args.short_clients)) for ttft in done]
    return Result(args.tokens * len(ttfts), time.perf_counter() - started, ttfts)


def keep_posting(client: ApiClient, bodies: list[tuple[str, bytes]], first: int,
                 stop: threading.Event) -> Counter:
    """POST big bodies back to back, starting at bodies[first], until `stop`; count the answers
    by status and error code."""
    answers: Counter = Counter()
    index = first
    while not stop.is_set():
        path, body = bodies[index % len(bodies)]
        response, content = client.call("POST", path, body, expect=None)
        code = "" if response.status == 200 else json.loads(content)["error"]["code"]
        answers[f"{response.status} {code}".strip()] += 1
        index += 1
    return answers


@dataclass
class BigLoad:
    """What the big clients got through during one phase B."""

    answers: Counter
    seconds: float


def with_big_requests(client: ApiClient, bodies: list[tuple[str, bytes]],
                      args: argparse.Namespace) -> tuple[Result, BigLoad]:
    """Phase B: the short requests while the big clients post, from before the first short
    request until the last big one in flight when the short ones ended is answered."""
    stop = threading.Event()
    started = time.perf_counter()
    with ThreadPoolExecutor(args.big_clients) as pool:
        posting = [pool.submit(keep_posting, client, bodies, number * 3, stop)
                   for number in range(args.big_clients)]
        try:
            short = short_requests(client, args)
        finally:
            stop.set()
        answers = sum((future.result() for future in posting), Counter())
    return short, BigLoad(answers, time.perf_counter() - started)


def warm_up(client: ApiClient, bodies: list[tuple[str, bytes]], args: argparse.Namespace) -> None:
    """One short and one big request of each route: the API loads the tokenizer on first use."""
    chat_ttft(client, short_chat(args.tokens, 10**6))
    for path, body in bodies[:2]:
        client.call("POST", path, body, expect=None)


def ttft_table(quiet: list[Result], busy: list[Result], more_heads: str, more_cells: str,
               digits: int) -> tuple[list[str], float]:
    """An A/B bench's Markdown table (short requests' TTFT alone, A, and beside the load, B,
    and the ratios to `digits` decimals) with more columns; and the p50 ratio."""
    alone, beside = median_run(quiet), median_run(busy)
    p50, p99 = (beside.ttft_ms(q) / alone.ttft_ms(q) for q in (0.5, 0.99))
    lines = table_head("| short requests A + B | TTFT A p50 ms | TTFT A p99 ms | TTFT B p50 ms "
                       f"| TTFT B p99 ms | B / A p50 | B / A p99 | {more_heads} |")
    lines.append(f"| {len(alone.ttfts)} + {len(beside.ttfts)} | {alone.ttft_ms(0.5):.0f} "
                 f"| {alone.ttft_ms(0.99):.0f} | {beside.ttft_ms(0.5):.0f} "
                 f"| {beside.ttft_ms(0.99):.0f} | {p50:.{digits}f}x | {p99:.{digits}f}x "
                 f"| {more_cells} |")
    return lines, p50


def format_table(quiet: list[Result], busy: list[Result], big: list[BigLoad]) -> str:
    """A Markdown table: short requests' TTFT alone (A) and beside big requests (B), ratios,
    and how fast the big requests were answered."""
    answers = sum((load.answers for load in big), Counter())
    per_second = sum(answers.values()) / sum(load.seconds for load in big)
    statuses = ", ".join(f"{count} x {answer}" for answer, count in answers.most_common())
    lines, _ = ttft_table(quiet, busy, "big requests/s in B | big answers",
                          f"{per_second:.1f} | {statuses}", 1)
    return "\n".join(lines)


def phase_arguments(parser: argparse.ArgumentParser, tokens: int) -> None:
    """An A/B bench's arguments: its short requests, its phases and a smoke run."""
    parser.add_argument("--short-clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10,
                        help="short requests per client per phase, at least")
    parser.add_argument("--seconds", type=float, default=10, help="length of a phase, at least")
    parser.add_argument("--tokens", type=int, default=tokens, help="tokens per short request")
    parser.add_argument("--repeats", type=int, default=3, help="A and B phases, alternated")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: phases of 5 requests per client and 5 s, one A and one B")


def parsed_phases(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds, args.repeats = 5, 5, 1
    return args


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench --responsive", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--responsive", action="store_true", help="(what selects this bench)")
    phase_arguments(parser, tokens=4)
    parser.add_argument("--big-clients", type=int, default=2)
    return parsed_phases(parser, argv)


def main(argv: list[str] | None = None) -> int:
    """Start one API process and a worker, alternate phases A and B, print the table."""
    args = parse_args(argv)
    setup_bench_process()
    bodies = big_bodies(corpus_words())
    quiet, busy, big = [], [], []
    with running_stack(MODEL, api_workers=1) as stack:
        client = ApiClient(stack.api_url)
        warm_up(client, bodies, args)
        for repeat in range(args.repeats):
            quiet.append(short_requests(client, args))
            short, load = with_big_requests(client, bodies, args)
            busy.append(short)
            big.append(load)
            logger.info("turn %d: A and B measured", repeat + 1)
    sys.stdout.write(
        f"\n{MODEL}, 1 API process, {args.short_clients} short clients streaming chat "
        f"completions of {args.tokens} tokens, at least {args.rounds} each and {args.seconds:g} s "
        f"per phase, {args.big_clients} big clients "
        f"(bodies of {min(len(b) for _, b in bodies):,}-{max(len(b) for _, b in bodies):,} "
        f"bytes), {args.repeats} turns of A and B, {os.cpu_count()} CPUs\n\n"
        f"{format_table(quiet, busy, big)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
