"""The engine's own CPUs (DAWET_ENGINE_CPUS): parsing, and a real stack whose engine process
keeps to them while Redis, the API and the worker keep off them."""
from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import psutil
import pytest
from pydantic import ValidationError

from conftest import ARTIFACTS, DEMO_MODEL, MODELS_FILE, stream_events, submit
from dawet.cpus import parse_cpu_list, split_cpus
from dawet.processes import Stack, free_port
from dawet.settings import Settings

USABLE = frozenset(os.sched_getaffinity(0))
ENGINE_CPU = max(USABLE)


@pytest.mark.parametrize("text, cpus", [("", set()), ("3", {3}), ("0-2", {0, 1, 2}),
                                        (" 0, 2-3 ", {0, 2, 3})])
def test_cpu_lists_read_as_linux_writes_them(text, cpus):
    assert parse_cpu_list(text) == cpus


@pytest.mark.parametrize("text", ["a", "3-1", "1-", "-1", "1-2-3", "1;2"])
def test_a_cpu_list_that_cannot_be_read_is_refused_with_the_part_named(text):
    with pytest.raises(ValidationError, match="is not a CPU or a range of CPUs"):
        Settings(engine_cpus=text)


def test_pinning_that_would_leave_one_side_without_a_cpu_pins_nothing():
    assert split_cpus(USABLE) is None  # nothing left for the other processes
    assert split_cpus(frozenset({max(USABLE) + 1})) is None  # a CPU this host does not have
    assert split_cpus(frozenset()) is None


@pytest.fixture(scope="module")
def pinned() -> Iterator[Stack]:
    if len(USABLE) < 2:
        pytest.skip("pinning needs two CPUs")
    settings = Settings(models_file=MODELS_FILE, default_model=DEMO_MODEL, api_port=free_port(),
                        api_workers=1, worker_concurrency=2, engine_cpus=str(ENGINE_CPU))
    log_dir = ARTIFACTS / "logs-cpus"
    log_dir.mkdir(parents=True, exist_ok=True)
    running = Stack(settings, log_dir=log_dir).start()
    yield running
    running.stop()


def test_the_engine_process_has_its_cpus_and_the_others_keep_off_them(pinned):
    with httpx.Client(base_url=pinned.api_url, timeout=30) as client:
        events = stream_events(submit(client, prompt="Halo", max_new_tokens=4)["stream_url"])
    assert events[-1]["type"] == "done"
    launched = [psutil.Process(child.process.pid) for child in pinned.children]
    children = launched + [p for parent in launched for p in parent.children(recursive=True)]
    engine = [p for p in children if "tasks.engine.host" in " ".join(p.cmdline())]
    others = [p for p in children if p not in engine]
    assert len(engine) == 1 and len(others) >= 4  # redis, worker, gunicorn and its worker
    assert _thread_cpus(engine[0]) == {frozenset({ENGINE_CPU})}
    assert {cpus for p in others for cpus in _thread_cpus(p)} == {USABLE - {ENGINE_CPU}}


def _thread_cpus(process: psutil.Process) -> set[frozenset[int]]:
    return {frozenset(os.sched_getaffinity(thread.id)) for thread in process.threads()}
