"""The engine in a process of its own: same tokens, cancels, errors, and no orphan when the
worker dies. Real child processes running the demo model on CPU."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from conftest import DEMO_MODEL, MODELS_FILE, ROOT, wait_until
from model_store.registry import load_registry
from tasks.jobs.contract import FinishReason, SamplingParams
from tasks.engine.interface import CANCELLED_STEP, TokenStep, iterate
from tasks.engine.factory import EngineOptions
from tasks.engine.process import EngineLost, EngineProcess

GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, top_p=1.0)
LONG = SamplingParams(max_new_tokens=1500, min_new_tokens=1500, temperature=0.0, top_p=1.0)
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13], [20, 21]]


@pytest.fixture(scope="module")
def spec():
    return load_registry(MODELS_FILE).get(DEMO_MODEL)


@pytest.fixture(scope="module")
def engine(spec) -> Iterator[EngineProcess]:
    """One slot, so a second request waits while the first runs."""
    process = EngineProcess(spec, EngineOptions(max_batch_size=1, torch_threads=1))
    yield process
    process.close()


def _tokens(steps) -> list[int | None]:
    return [step.token_id for step in steps]


def test_the_engine_process_yields_what_the_engine_yields_in_this_process(engine, spec):
    from model_store.loader import load_model
    from tasks.engine.sequential import SequentialEngine

    here = SequentialEngine(load_model(spec))
    assert [_tokens(iterate(engine, p, GREEDY)) for p in PROMPTS] == \
        [_tokens(iterate(here, p, GREEDY)) for p in PROMPTS]
    assert engine.info.model_loads == 1 and engine.info.device == "cpu"
    assert engine.info.backend == "transformers" and engine.info.load_seconds > 0


def test_the_one_at_a_time_engine_serves_from_its_own_process_too(spec):
    from model_store.loader import load_model
    from tasks.engine.sequential import SequentialEngine

    process = EngineProcess(spec, EngineOptions(kind="sequential", torch_threads=1))
    here = SequentialEngine(load_model(spec))
    assert [_tokens(iterate(process, p, GREEDY)) for p in PROMPTS] == \
        [_tokens(iterate(here, p, GREEDY)) for p in PROMPTS]
    running = iterate(process, PROMPTS[0], LONG)
    next(running)
    waiting = iterate(process, PROMPTS[1], GREEDY)
    wait_until(lambda: process.stats().waiting == 1, 5, "the request to wait its turn")
    running.close()
    assert list(waiting)[-1].finish is not None  # its turn came
    process.close()
    assert not _alive(process.pid)


def test_a_sink_that_stops_frees_the_slot_for_the_next_request(engine):
    seen: list[TokenStep] = []

    def stop_after_two(step: TokenStep) -> bool:
        seen.append(step)
        return len(seen) == 2

    engine.run(PROMPTS[0], LONG, threading.Event(), stop_after_two)
    assert len(seen) == 2  # no step reaches the sink once it said stop
    full = SamplingParams(max_new_tokens=12, min_new_tokens=12, temperature=0.0, top_p=1.0)
    assert len(_tokens(iterate(engine, PROMPTS[1], full))) == 12


def test_a_cancel_reaches_a_request_still_waiting_for_a_slot(engine):
    running = iterate(engine, PROMPTS[0], LONG)
    next(running)  # the only slot is taken
    cancel, waiting_steps = threading.Event(), []
    waiter = threading.Thread(target=engine.run, args=(PROMPTS[1], GREEDY, cancel,
                                                       waiting_steps.append))
    waiter.start()
    wait_until(lambda: engine.stats().waiting == 1, 5, "the request to wait for the slot")
    cancel.set()
    waiter.join(5)
    assert not waiter.is_alive() and waiting_steps == [CANCELLED_STEP]
    assert engine.stats().batch_size == 1  # the running request went on
    running.close()


def test_requests_in_flight_add_no_thread_to_the_engine_process(engine):
    """The scheduler reads the pipe itself: no thread per request to take its GIL."""
    idle_threads = _threads(engine.pid)
    first = iterate(engine, PROMPTS[0], LONG)
    next(first)  # the only slot is taken; the next two wait in the engine
    waiting = [iterate(engine, prompt, GREEDY) for prompt in PROMPTS[1:]]
    wait_until(lambda: engine.stats().waiting == 2, 5, "two requests to wait for the slot")
    assert _threads(engine.pid) == idle_threads
    first.close()
    assert all(list(steps)[-1].finish is not None for steps in waiting)  # both ran


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_an_engine_error_is_raised_by_run(engine):
    too_long = SamplingParams(max_new_tokens=100_000, temperature=0.0, top_p=1.0)
    with pytest.raises(ValueError, match="KV-cache budget"):
        engine.run(PROMPTS[0], too_long, threading.Event(), lambda step: None)


def test_a_model_that_cannot_load_fails_the_start(spec):
    broken = spec.model_copy(update={"path": str(ROOT / "var" / "no-such-model")})
    with pytest.raises(RuntimeError, match="the engine could not start"):
        EngineProcess(broken, EngineOptions(torch_threads=1))


def test_a_dead_engine_fails_running_requests_after_calling_on_lost(spec):
    lost = threading.Event()
    process = EngineProcess(spec, EngineOptions(torch_threads=1), on_lost=lost.set)
    steps = iterate(process, PROMPTS[0], LONG)
    next(steps)
    os.kill(process.pid, signal.SIGKILL)
    with pytest.raises(EngineLost):
        list(steps)
    assert lost.is_set()


def test_the_engine_process_dies_with_its_worker(tmp_path):
    """A worker killed outright (SIGKILL) leaves no engine process behind."""
    pid_file = tmp_path / "engine.pid"
    worker = subprocess.Popen([sys.executable, "-c", f"""
from model_store.registry import load_registry
from tasks.engine.factory import EngineOptions
from tasks.engine.process import EngineProcess
engine = EngineProcess(load_registry({str(MODELS_FILE)!r}).get({DEMO_MODEL!r}),
                       EngineOptions(torch_threads=1))
open({str(pid_file)!r}, "w").write(str(engine.pid))
time.sleep(600)
"""], cwd=ROOT)
    try:
        wait_until(lambda: pid_file.exists() and pid_file.read_text(), 120, "the engine to start")
        engine_pid = int(pid_file.read_text())
        worker.kill()
        worker.wait()
        wait_until(lambda: not _alive(engine_pid), 10, "the engine process to exit")
    finally:
        worker.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_finish_reasons_cross_the_pipe(engine):
    steps = list(iterate(engine, PROMPTS[2], SamplingParams(max_new_tokens=3, temperature=0.0,
                                                            top_p=1.0)))
    assert steps[-1].finish in (FinishReason.LENGTH, FinishReason.STOP)
    assert all(step.finish is None for step in steps[:-1])
