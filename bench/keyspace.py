"""Benchmark: no request costs more as Redis fills with history.

    make bench BENCH_ARGS='--keyspace'            # or BENCH_ARGS='--keyspace --quick'
    python -m bench --keyspace [--requests 200] [--clients 4] [--keys 200000] [--repeats 5]

Starts a stack as bench/pipeline.py does (its own Redis on a free port, one batching worker on
the demo model, the API), then times each path, one client at a time and from C clients at
once: GET /v1/models, GET /readyz, GET /metrics, GET /v1/jobs/<id> of a finished job and a
one-token POST /v1/chat/completions. Each is timed with Redis holding only the stack's own keys
("empty") and holding `--keys` more ("full"): `history:job:{i}` strings plus finished jobs'
hashes and log streams (`dawet:job:{<hex>}`, `dawet:job:{<hex>}:log`, one event each, a day's
TTL), as a day of traffic leaves behind. The history is written into a parking database of
the same Redis, where no request looks, and MOVEd into the stack's database for the full turns.
Each of `--repeats` repeats takes one turn of each state, in the order empty full, full empty,
..., so the host's drift hits both alike.
Prints each path's latency p50/p99 empty and full (over all turns), the median over repeats
of each repeat's ratio full/empty, and the SCAN and KEYS commands Redis ran meanwhile (INFO
commandstats): no request may walk the key space.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import logging
import os
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import redis

from bench.pipeline import Result, closed_loop, median, median_run, start_stack, table_head
from dawet.processes import Stack
from tasks.engine.process import GIL_SWITCH_SECONDS

logger = logging.getLogger("bench.keyspace")

MODEL = "dawet-demo"
TIMEOUT_SECONDS = 120.0
JSON_HEADERS = {"Content-Type": "application/json"}
PARK_DB = 15  # where the history waits during "empty" turns; the stack uses database 0
BATCH = 5000  # commands per pipelined round trip while filling or moving the history
SETTLE_REQUESTS = 8  # unmeasured requests per path and client count before each turn
DAY_SECONDS = 86_400  # Dawet's default job TTL: the old jobs expire as real ones do
# A finished job's hash and its one log event, about the size of a real short job's.
OLD_JOB = json.dumps({"model": MODEL, "prompt_token_ids": list(range(40)),
                      "params": {"max_new_tokens": 48, "temperature": 0.7}})
OLD_EVENT = json.dumps({"seq": 1, "type": "done", "finish_reason": "stop",
                        "usage": {"prompt_tokens": 40, "completion_tokens": 12}})
JOB_HEADER = "X-Dawet-Job-Id"  # the job behind an OpenAI-style completion
ONE_TOKEN_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Halo!"}],
                  "max_tokens": 1}


class ApiClient:
    """HTTP to the API over keep-alive connections, one per calling thread, as separate users
    would hold them (http.client, as bench/pipeline.py's clients: lighter than httpx)."""

    def __init__(self, base_url: str):
        address = urllib.parse.urlsplit(base_url)
        self._host, self._port = address.hostname, address.port
        self._local = threading.local()

    def open(self, method: str, path: str, body: dict | bytes | None = None
             ) -> http.client.HTTPResponse:
        """Send a request; the caller reads the response (all of it, to reuse the connection)."""
        if not hasattr(self._local, "conn"):
            self._local.conn = http.client.HTTPConnection(self._host, self._port,
                                                          timeout=TIMEOUT_SECONDS)
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        self._local.conn.request(method, path, body, JSON_HEADERS if body is not None else {})
        return self._local.conn.getresponse()

    def call(self, method: str, path: str, body: dict | bytes | None = None,
             expect: int | None = 200) -> tuple[http.client.HTTPResponse, bytes]:
        """Send a request and read its whole answer; fail unless its status is `expect`."""
        response = self.open(method, path, body)
        content = response.read()
        if expect is not None and response.status != expect:
            raise RuntimeError(f"{method} {path}: {response.status} {content[:300]!r}")
        return response, content


@contextlib.contextmanager
def running_stack(model: str, api_workers: int, max_batch: int = 16) -> Iterator[Stack]:
    """bench/pipeline.py's stack on one model: its own Redis on a free port, one batching worker
    with one torch thread (on 2 cores, more spin against the API), nothing pinned."""
    options = argparse.Namespace(models=[model], api_workers=api_workers, max_batch=max_batch,
                                 chunk_seconds=0.05, torch_threads=1, engine_cpus="")
    stack = start_stack(options, Path(tempfile.mkdtemp(prefix="dawet-bench-")))
    try:
        if not any(child.name == "redis" for child in stack.children):
            raise SystemExit("DAWET_REDIS_URL is set: the bench writes to Redis and runs only "
                             "on the Redis its stack starts; unset it")
        yield stack
    finally:
        stack.stop()


def setup_bench_process() -> None:
    """Logging, no hub access, and bench/pipeline.py's 1 ms GIL switch interval: the client
    threads share this process's GIL, and a thread back from a socket must not wait 5 ms."""
    sys.setswitchinterval(GIL_SWITCH_SECONDS)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def timed(request: Callable[[], object]) -> Callable[[int], tuple[int, float]]:
    """A closed_loop job that makes one request: (1 request, its latency in seconds)."""

    def run(_index: int) -> tuple[int, float]:
        started = time.perf_counter()
        request()
        return 1, time.perf_counter() - started

    return run


def measured_paths(client: ApiClient, job_id: str) -> dict[str, Callable[[], object]]:
    """Each path under test, as one request that must succeed."""
    return {
        "GET /v1/models": lambda: client.call("GET", "/v1/models"),
        "GET /readyz": lambda: client.call("GET", "/readyz"),
        "GET /metrics": lambda: client.call("GET", "/metrics"),
        "GET /v1/jobs/<id>": lambda: client.call("GET", f"/v1/jobs/{job_id}"),
        "POST /v1/chat/completions, 1 token": lambda: client.call(
            "POST", "/v1/chat/completions", ONE_TOKEN_CHAT),
    }


def history_keys(keys: int, old_jobs: int) -> Iterator[str]:
    """The history's key names: strings first, then each old job's hash and log stream
    (ids that look like uuid4 hex, fixed so every turn moves the same keys)."""
    for index in range(keys - 2 * old_jobs):
        yield f"history:job:{index}"
    for index in range(old_jobs):
        job_key = f"dawet:job:{{{hashlib.md5(str(index).encode()).hexdigest()}}}"
        yield job_key
        yield f"{job_key}:log"


def pipelined(client: redis.Redis, items: Iterable, command: Callable) -> None:
    """command(pipe, item) for every item, BATCH commands per round trip."""
    pipe = client.pipeline(transaction=False)
    for count, item in enumerate(items, 1):
        command(pipe, item)
        if count % BATCH == 0:
            pipe.execute()
    pipe.execute()


def write_history_key(pipe: redis.client.Pipeline, key: str) -> None:
    """A small string, or an old job's hash or one-event log, expiring like a real job's."""
    if key.startswith("history:"):
        pipe.set(key, "succeeded")
        return
    if key.endswith(":log"):
        pipe.xadd(key, {"event": OLD_EVENT}, id="1-0")
    else:
        pipe.hset(key, mapping={"job": OLD_JOB, "seq": 1, "ended": 1})
    pipe.expire(key, DAY_SECONDS)


def scan_and_keys_calls(client: redis.Redis) -> dict[str, int]:
    """How many SCAN and KEYS commands Redis has run since it started."""
    stats = client.info("commandstats")
    return {name: stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("scan", "keys")}


def measure_turn(paths: dict[str, Callable[[], object]], requests: int, clients: int
                 ) -> dict[tuple[str, int], Result]:
    """Every path from one client, then from `clients` at once; a Result per (path, clients)
    whose ttfts are the requests' latencies."""
    return {(name, c): closed_loop(c, max(1, requests // c), timed(request))
            for c in (1, clients) for name, request in paths.items()}


@dataclass
class Turns:
    """Each state's Results by (path, clients), one per turn; SCAN and KEYS calls during the
    turns; the database's size when full; what one SCAN walk of the history costs."""

    results: dict[str, dict[tuple[str, int], list[Result]]]
    scan_and_keys: dict[str, int]
    full_size: int
    scan_walk_ms: float = 0.0


class History:
    """The history's keys on the stack's Redis, written into PARK_DB (where no request looks)
    and MOVEd (TTLs kept) into the live database and back: every switch costs the same."""

    def __init__(self, live: redis.Redis, keys: list[str]):
        server = live.connection_pool.connection_kwargs  # (from_url(url, db=...) keeps /0)
        self.live, self.keys, self.shown = live, keys, False
        self.parked = redis.Redis(host=server["host"], port=server["port"], db=PARK_DB)
        started = time.perf_counter()
        pipelined(self.parked, keys, write_history_key)
        logger.info("%d history keys written in %.1fs", len(keys), time.perf_counter() - started)

    def show(self, shown: bool) -> None:
        """Move the history into the live database (shown) or out of it."""
        if shown != self.shown:
            source, target = (self.parked, 0) if shown else (self.live, PARK_DB)
            pipelined(source, self.keys, lambda pipe, key: pipe.move(key, target))
            self.shown = shown


def run_turns(stack: Stack, args: argparse.Namespace) -> Turns:
    """Take empty and full turns, in the order empty full, full empty, empty full... (a drift
    within a pair of turns then hits both states alike), each after a few unmeasured requests
    (settling after the MOVEs)."""
    client = ApiClient(stack.api_url)
    response, _ = client.call("POST", "/v1/chat/completions", ONE_TOKEN_CHAT)  # a job to GET
    paths = measured_paths(client, response.getheader(JOB_HEADER))
    live = redis.Redis.from_url(stack.settings.redis_url)
    history = History(live, list(history_keys(args.keys, args.old_jobs)))
    turns = Turns({"empty": {}, "full": {}}, scan_and_keys_calls(live), 0)
    for repeat in range(args.repeats):
        for state in ("empty", "full") if repeat % 2 == 0 else ("full", "empty"):
            history.show(state == "full")
            turns.full_size = max(turns.full_size, live.dbsize())
            measure_turn(paths, SETTLE_REQUESTS, args.clients)
            for key, result in measure_turn(paths, args.requests, args.clients).items():
                turns.results[state].setdefault(key, []).append(result)
            logger.info("repeat %d: %s measured", repeat + 1, state)
    after = scan_and_keys_calls(live)
    turns.scan_and_keys = {name: after[name] - calls for name, calls in turns.scan_and_keys.items()}
    history.show(False)
    turns.scan_walk_ms = scan_walk_ms(history.parked)  # after the count: it SCANs
    return turns


def scan_walk_ms(client: redis.Redis) -> float:
    """One SCAN walk of the client's database (COUNT 1000), in ms: what a request that looked
    for keys by pattern would pay, for scale against the table."""
    started = time.perf_counter()
    for _ in client.scan_iter(match="dawet:workers:*", count=1000):
        pass
    return 1000 * (time.perf_counter() - started)


def paired_ratios(empty_runs: list[Result], full_runs: list[Result], quantile: float
                  ) -> list[float]:
    """Full over empty at one percentile, repeat by repeat: a repeat's two turns are seconds
    apart, so the host's drift mostly cancels out of each ratio."""
    return [full.ttft_ms(quantile) / empty.ttft_ms(quantile)
            for empty, full in zip(empty_runs, full_runs)]


def format_table(turns: dict[str, dict[tuple[str, int], list[Result]]]) -> str:
    """A Markdown table: per path and client count, latency empty and full (over all turns),
    the median over repeats of each repeat's ratios, and every repeat's p50 ratio."""
    lines = table_head("| path | clients | empty p50 ms | empty p99 ms | full p50 ms "
                       "| full p99 ms | full / empty p50 | full / empty p99 "
                       "| p50 ratio by repeat |")
    for (name, clients), empty_runs in turns["empty"].items():
        full_runs = turns["full"][name, clients]
        empty, full = median_run(empty_runs), median_run(full_runs)
        p50s, p99s = (paired_ratios(empty_runs, full_runs, q) for q in (0.5, 0.99))
        lines.append(f"| {name} | {clients} | {empty.ttft_ms(0.5):.1f} | {empty.ttft_ms(0.99):.1f} "
                     f"| {full.ttft_ms(0.5):.1f} | {full.ttft_ms(0.99):.1f} "
                     f"| {median(p50s):.2f}x | {median(p99s):.2f}x "
                     f"| {' '.join(f'{ratio:.2f}' for ratio in p50s)} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench --keyspace", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keyspace", action="store_true", help="(what selects this bench)")
    parser.add_argument("--requests", type=int, default=200,
                        help="requests per path, state and client count in each turn")
    parser.add_argument("--clients", type=int, default=4,
                        help="clients at once in the concurrent runs")
    parser.add_argument("--keys", type=int, default=200_000, help="history keys in the full state")
    parser.add_argument("--old-jobs", type=int, default=20_000,
                        help="of those keys, old jobs (a hash and a log stream each)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="pairs of an empty and a full turn (ratios: their median)")
    parser.add_argument("--api-workers", type=int, default=2, help="DAWET_API_WORKERS")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 100 requests per path, 3 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.repeats = 100, 3
    return args


def main(argv: list[str] | None = None) -> int:
    """Start the stack, measure empty and full turns, print the table and SCAN/KEYS counts."""
    args = parse_args(argv)
    setup_bench_process()
    with running_stack(MODEL, args.api_workers) as stack:
        turns = run_turns(stack, args)
    calls = turns.scan_and_keys
    sys.stdout.write(
        f"\n{MODEL}, {args.requests} requests per path and client count per turn, "
        f"{args.repeats} turns each of empty and full (full: {turns.full_size:,} keys in the "
        f"database, {args.keys:,} of them history), percentiles over all turns, ratios: "
        f"median over repeats, {os.cpu_count()} CPUs, {args.api_workers} API processes\n\n"
        f"{format_table(turns.results)}\n\n"
        f"Redis commands during the turns: SCAN {calls['scan']}, KEYS {calls['keys']}; for "
        f"scale, one SCAN walk of the history takes {turns.scan_walk_ms:.0f} ms\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
