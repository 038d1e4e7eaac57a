"""A core of its own for the engine process: which CPUs it runs on, and the rest for the others.

The decode loop is one thread that wants a whole core. Beside it the worker, Redis, the API
(and on a test host the clients) wake hundreds of times a second, and the kernel puts some of
them on the engine's core: measured under the bench's C = 16 load on 2 cores, the engine sat
runnable but preempted 9-11 % of the time. With DAWET_ENGINE_CPUS the engine process keeps to
those CPUs and the processes Dawet starts beside it keep off them.
"""
from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def parse_cpu_list(text: str) -> frozenset[int]:
    """CPUs written as Linux writes them ("1", "0-3", "0,2-3"); empty text is no CPU."""
    cpus: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        first, dash, last = part.partition("-")
        last = last if dash else first
        if not (first.isdigit() and last.isdigit()) or int(last) < int(first):
            raise ValueError(f"{part!r} is not a CPU or a range of CPUs like 2 or 2-3")
        cpus.update(range(int(first), int(last) + 1))
    return frozenset(cpus)


def split_cpus(engine_cpus: frozenset[int]) -> tuple[frozenset[int], frozenset[int]] | None:
    """(the engine's CPUs, everyone else's) among those this process may use; None when that
    leaves either side without a CPU (then nothing is pinned). Read it before pinning this
    process: afterwards it may use the others' CPUs only."""
    usable = frozenset(os.sched_getaffinity(0))
    engine, others = engine_cpus & usable, usable - engine_cpus
    if engine_cpus and not (engine and others):
        logger.warning("engine CPUs %s leave no CPU to one side of %s; not pinning",
                       sorted(engine_cpus), sorted(usable))
    return (engine, others) if engine and others else None


def pin_process(cpus: frozenset[int]) -> None:
    """Keep every thread of this process (and the threads and children they start) to `cpus`."""
    for thread in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(thread), cpus)
        except ProcessLookupError:
            pass  # the thread ended meanwhile
