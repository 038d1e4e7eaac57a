"""Overload test: offer ten times a worker's capacity for a bounded time, then count outcomes.

    python -m bench.load [--seconds 30] [--factor 10] [--url http://127.0.0.1:8000]

Without --url it starts its own stack (embedded Redis, one demo worker, the API) with a small
queue limit, measures the worker's capacity in jobs per second, submits jobs open-loop at
`factor` times that rate, waits for every admitted job to end, and prints admitted, rejected,
completed, failed and lost counts. A job is lost if it was admitted (202) but never reached
`done` or `error`. Exit status 1 when any job is lost.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from dawet.processes import Stack, free_port
from dawet.settings import Settings

logger = logging.getLogger("dawet.load")

MODEL = "dawet-demo"
JOB = {"model": MODEL, "prompt": "Nasi goreng adalah", "min_new_tokens": 32,
       "max_new_tokens": 32, "temperature": 0.7}
ENDED = {"succeeded", "failed", "cancelled", "expired"}


@dataclass
class Tally:
    """What happened to each submission."""

    admitted: list[str] = field(default_factory=list)
    submissions: Counter = field(default_factory=Counter)  # by HTTP status
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, outcome: int | str, job_id: str | None = None) -> None:
        """Count one submission's outcome (from any thread)."""
        with self._lock:
            self.submissions[outcome] += 1
            if job_id is not None:
                self.admitted.append(job_id)

    @property
    def rejected(self) -> int:
        return self.submissions[429]


def submit(client: httpx.Client, tally: Tally, attempts: int = 3) -> None:
    """POST one job and record whether it was admitted; a connection that drops before the
    answer is retried with the same Idempotency-Key, so a retry never makes a second job."""
    headers = {"Idempotency-Key": uuid.uuid4().hex}
    for _ in range(attempts):
        try:
            response = client.post("/v1/generate", json=JOB, headers=headers)
            break
        except httpx.TransportError as exc:
            tally.record(f"retried:{type(exc).__name__}")
    else:
        tally.record("no_response")
        return
    admitted = response.status_code == 202
    tally.record(response.status_code, response.json()["id"] if admitted else None)


def wait_for_end(client: httpx.Client, job_ids: list[str], timeout: float) -> Counter:
    """Poll until every job has ended or the timeout passes; count final states."""
    pending, states = set(job_ids), Counter()
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for job_id in sorted(pending):
            response = client.get(f"/v1/jobs/{job_id}")
            state = response.json().get("state") if response.status_code == 200 else None
            if state in ENDED:
                states[state] += 1
                pending.discard(job_id)
        time.sleep(0.5 if pending else 0)
    states["lost"] = len(pending)
    return states


def capacity(client: httpx.Client, concurrency: int) -> float:
    """Jobs per second one worker completes when given `concurrency` jobs at once."""
    tally = Tally()
    started = time.monotonic()
    for _ in range(concurrency * 2):
        submit(client, tally)
    wait_for_end(client, tally.admitted, 120)
    return len(tally.admitted) / (time.monotonic() - started)


def drive(client: httpx.Client, rate: float, seconds: float) -> Tally:
    """Submit jobs open-loop at `rate` per second for `seconds`."""
    tally = Tally()
    with ThreadPoolExecutor(32) as pool:
        started = time.monotonic()
        sent = 0
        while (elapsed := time.monotonic() - started) < seconds:
            due = int(elapsed * rate) + 1
            for _ in range(due - sent):
                pool.submit(submit, client, tally)
            sent = due
            time.sleep(min(0.05, 1 / rate))
    return tally


def run(url: str, seconds: float, factor: float, concurrency: int,
        chaos: tuple[float, Callable[[], None]] | None = None) -> int:
    """Measure, overload (running `chaos` after its delay), drain and report; 1 if any
    admitted job was lost."""
    limits = httpx.Limits(max_connections=64)
    with httpx.Client(base_url=url, timeout=30, limits=limits) as client:
        per_second = capacity(client, concurrency)
        rate = per_second * factor
        logger.info("capacity %.2f jobs/s; offering %.1f jobs/s for %.0f s", per_second, rate,
                    seconds)
        if chaos is not None:
            threading.Timer(*chaos).start()
        tally = drive(client, rate, seconds)
        states = wait_for_end(client, tally.admitted, timeout=300)
    offered = sum(n for outcome, n in tally.submissions.items()
                  if not str(outcome).startswith("retried"))
    print(f"capacity_jobs_per_s={per_second:.2f} offered_jobs_per_s={rate:.1f} "
          f"seconds={seconds:.0f}")
    print(f"offered={offered} admitted={len(tally.admitted)} rejected={tally.rejected} "
          f"completed={states['succeeded']} failed={states['failed'] + states['expired']} "
          f"lost={states['lost']}")
    print(f"responses={dict(tally.submissions)}")
    return 1 if states["lost"] else 0


def main(argv: list[str] | None = None) -> int:
    """Parse arguments; start a stack unless --url names one."""
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--factor", type=float, default=10.0)
    parser.add_argument("--url", help="a running Dawet API (default: start one)")
    parser.add_argument("--concurrency", type=int, default=4, help="jobs a worker runs at once")
    parser.add_argument("--max-queued", type=int, default=16, help="queue limit of own stack")
    parser.add_argument("--workers", type=int, default=1, help="workers of own stack")
    parser.add_argument("--kill-after", type=float, help="SIGKILL own stack's first worker "
                        "this many seconds into the overload (needs --workers 2 or more)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.url:
        return run(args.url, args.seconds, args.factor, args.concurrency)
    settings = Settings(default_model=MODEL, api_port=free_port(), api_workers=2,
                        worker_concurrency=args.concurrency, max_queued_jobs=args.max_queued)
    with tempfile.TemporaryDirectory(prefix="dawet-load-") as logs:
        stack = Stack(settings, models=[MODEL] * args.workers, log_dir=Path(logs)).start()
        chaos = None if args.kill_after is None else (args.kill_after, lambda: _kill(stack))
        try:
            return run(stack.api_url, args.seconds, args.factor,
                       args.concurrency * args.workers, chaos)
        finally:
            stack.stop()


def _kill(stack: Stack) -> None:
    """SIGKILL the stack's first worker, as a crash would."""
    logger.warning("killing worker0 (SIGKILL)")
    stack.child("worker0").process.send_signal(signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
