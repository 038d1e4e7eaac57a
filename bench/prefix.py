"""Prefix caching: a conversation's next turn after a long history, against a short prompt.

    python -m bench --prefix [--repeats 10] [--history-tokens 1500]

Two stacks side by side on dawet-bench-4m (`dawet run`'s defaults), one with the prefix cache
(DAWET_PREFIX_CACHE_TOKENS's default) and one without (0). Each repeat, on each side in turn
(alternating which goes first), through the official openai client:
  short   a one-line chat message: its time to the first content chunk
  turn    a conversation with a system prompt of about `--history-tokens` tokens (new text each
          repeat): the first turn is sent and read to its end untimed, then the second turn
          (system, user, the assistant's reply, a new user message) is timed to its first chunk
Reported: each side's median TTFTs and the ratio turn / short; the issue's target is 1.5x.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from bench.engine_forward import settings_stack
from bench.pipeline import ROOT, median, parse_repeats, repeats_parser, table_head
from bench.responsive import corpus_words

logger = logging.getLogger("bench.prefix")

MODEL = "dawet-bench-4m"
SIDES = {"cached": {}, "uncached": {"prefix_cache_tokens": 0}}


def history_text(tokenizer, words: list[str], tokens: int, seed: int) -> str:
    """Sentences of corpus words, about `tokens` tokens long."""
    rng, text = random.Random(seed), ""
    while len(tokenizer.encode(text)) < tokens:
        text += " ".join(rng.choices(words, k=12)).capitalize() + ". "
    return text


def first_chunk_seconds(client, messages: list[dict], max_tokens: int) -> tuple[float, str]:
    """Time to the first chunk with content, and the whole reply."""
    started, first, parts = time.perf_counter(), None, []
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                                max_tokens=max_tokens, temperature=0.0):
        text = chunk.choices[0].delta.content if chunk.choices else None
        if text:
            first = first or time.perf_counter() - started
            parts.append(text)
    return first, "".join(parts)


def one_repeat(client, history: str) -> dict[str, float]:
    short, _ = first_chunk_seconds(client, [{"role": "user", "content": "Halo, apa kabar?"}], 8)
    conversation = [{"role": "system", "content": history},
                    {"role": "user", "content": "Ceritakan tentang pasar."}]
    _, reply = first_chunk_seconds(client, conversation, 32)
    conversation += [{"role": "assistant", "content": reply},
                     {"role": "user", "content": "Terima kasih. Lalu?"}]
    turn, _ = first_chunk_seconds(client, conversation, 8)
    return {"short": short, "turn": turn}


def format_table(results: dict[str, list[dict]]) -> str:
    lines = table_head("| side | short TTFT p50 ms | next-turn TTFT p50 ms | turn / short |")
    for side, runs in results.items():
        short = median([r["short"] for r in runs])
        turn = median([r["turn"] for r in runs])
        lines.append(f"| {side} | {1000 * short:.0f} | {1000 * turn:.0f} | {turn / short:.2f}x |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = repeats_parser("prefix", __doc__, repeats=10)
    parser.add_argument("--history-tokens", type=int, default=1500)
    return parse_repeats(parser, argv)


def main(argv: list[str] | None = None) -> int:
    import openai
    from transformers import AutoTokenizer

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "var/models" / MODEL)
    words = corpus_words()
    folder = Path(tempfile.mkdtemp(prefix="dawet-bench-prefix-"))
    results: dict[str, list[dict]] = {side: [] for side in SIDES}
    with ExitStack() as stacks:
        clients = {side: openai.OpenAI(base_url=stacks.enter_context(settings_stack(
            folder, side, models_file=ROOT / "models.toml", default_model=MODEL, **settings))
            + "/v1", api_key="unused") for side, settings in SIDES.items()}
        for side, client in clients.items():  # warm-up
            one_repeat(client, history_text(tokenizer, words, args.history_tokens, -1))
        for repeat in range(args.repeats):
            history = history_text(tokenizer, words, args.history_tokens, repeat)
            for side in list(SIDES) if repeat % 2 == 0 else list(SIDES)[::-1]:
                results[side].append(one_repeat(clients[side], history))
            logger.info("repeat %d: %s", repeat, results)
    sys.stdout.write(f"\n{MODEL}: a next turn after a {args.history_tokens}-token history "
                     f"against a short prompt; medians of {args.repeats} repeats (logs: {folder})"
                     f"\n\n{format_table(results)}\n")
    return 0
