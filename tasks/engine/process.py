"""Run a worker's engine in a process of its own, as vLLM runs its engine core: the client side.

The batching scheduler runs Python between every torch op. Inside the Celery worker it shares
one GIL with Celery's threads, the event writer, the cancel listener and the step sinks, and
any of them holding the GIL (or descheduled while holding it) stalls the decode step for
everyone. So a worker starts its engine in a child process (tasks/engine/host.py) that holds
only the model and the engine, whose loop reads the pipe between forward passes. Steps come back
over the pipe as typed messages (tasks/engine/protocol.py); this side decodes them into text and
events on its own cores. The model is loaded once, in the child.
"""
from __future__ import annotations

import itertools
import logging
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from model_store.registry import ModelSpec
from tasks.engine import protocol as msg
from tasks.engine.factory import EngineInfo, EngineOptions
from tasks.engine.interface import EngineStats, StepSink, TokenStep
from tasks.jobs.contract import SamplingParams

logger = logging.getLogger(__name__)

# CPython lets a thread that wants the GIL wait up to this long (5 ms by default) while another
# runs Python. The scheduler runs Python most of the time, so threads beside it would wait that
# long at every hand-off; 1 ms measured faster and steadier (make bench). The worker's process
# sets it too: its reader thread hands steps to sinks beside Celery's threads.
GIL_SWITCH_SECONDS = 0.001
STATS_TIMEOUT_SECONDS = 1.0  # how long a metrics scrape waits for the engine's numbers
CANCEL_CHECK_SECONDS = 0.05  # how often the worker's side forwards cancels of waiting requests


class EngineLost(RuntimeError):
    """The engine process exited while requests were running."""


@dataclass(eq=False)
class _Run:
    """A request in flight, seen from the worker's side."""

    sink: StepSink
    cancel: threading.Event
    finished: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    stop_sent: bool = False


class EngineProcess:
    """The Engine interface, served by a child process that owns the model.

    `on_lost` runs if the child dies. A worker passes one that exits at once, before any
    running job can be failed, so the jobs' leases lapse and they are re-run elsewhere.
    """

    def __init__(self, spec: ModelSpec, options: EngineOptions, on_lost=None,
                 start_timeout: float = 900.0):
        # A fresh interpreter (not a fork: CUDA must not be inherited, and not multiprocessing's
        # spawn, which re-imports the parent's main script) with one end of a socket pair.
        ours, theirs = socket.socketpair()
        self._process = subprocess.Popen([sys.executable, "-m", "tasks.engine.host",
                                          str(theirs.fileno())], pass_fds=[theirs.fileno()])
        theirs.close()
        self._conn = Connection(ours.detach())
        self._on_lost, self._closing = on_lost, False
        self._send_lock = threading.Lock()
        self._runs: dict[int, _Run] = {}
        self._ids = itertools.count(1)
        self._stats = EngineStats(0, 0, 0.0)
        self._stats_lock, self._stats_answered = threading.Lock(), threading.Event()
        self.last_progress = time.monotonic()  # when the engine last sent anything
        self._send(msg.Start(spec, options))
        try:
            self.info = self._await_ready(start_timeout)
        except BaseException:
            self._conn.close()
            raise
        threading.Thread(target=self._read, name="dawet-engine-reader", daemon=True).start()
        threading.Thread(target=self._watch_cancels, name="dawet-engine-cancels",
                         daemon=True).start()

    @property
    def pid(self) -> int:
        return self._process.pid

    def stalled_for(self) -> float:
        """Seconds since the engine last made progress while it holds requests; 0 if idle."""
        return time.monotonic() - self.last_progress if self._runs else 0.0

    def restart_stall_clock(self) -> None:
        """Count the engine's silence from now (the watcher was not running until now)."""
        self.last_progress = time.monotonic()

    def stats(self) -> EngineStats:
        """Batch size, waiting requests, KV-cache use and GPU memory, asked of the engine now
        (the last answer if it does not answer within STATS_TIMEOUT_SECONDS)."""
        with self._stats_lock:
            self._stats_answered.clear()
            try:
                self._send(msg.StatsRequest())
            except EngineLost:
                return self._stats
            self._stats_answered.wait(STATS_TIMEOUT_SECONDS)
            return self._stats

    def run(self, prompt_ids: list[int], params: SamplingParams, cancel: threading.Event,
            sink: StepSink) -> None:
        """Submit the request and wait for its end; steps reach `sink` on the reader thread."""
        rid, run = next(self._ids), _Run(sink, cancel)
        if not self._runs:
            self.last_progress = time.monotonic()  # idle until now: the clock starts here
        self._runs[rid] = run
        try:
            self._send(msg.Submit(rid, list(prompt_ids), params))
            run.finished.wait()
        finally:
            self._runs.pop(rid, None)
        if run.error is not None:
            raise run.error

    def close(self, timeout: float = 10.0) -> None:
        """Ask the engine process to stop, and wait for it."""
        self._closing = True
        try:
            self._send(msg.Close())
        except (OSError, EngineLost):
            pass  # already gone
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def _send(self, message: msg.ToEngine) -> None:
        with self._send_lock:
            try:
                self._conn.send(message)
            except (OSError, ValueError) as exc:
                raise EngineLost("the engine process is gone") from exc

    def _stop(self, rid: int, run: _Run) -> None:
        """Ask the engine to drop the request. If the engine is gone there is nothing to stop:
        the reader sees the pipe close and fails every run (raising here, on the reader
        thread, would end it before it could)."""
        if not run.stop_sent:
            run.stop_sent = True
            try:
                self._send(msg.Stop(rid))
            except EngineLost:
                pass

    def _watch_cancels(self) -> None:
        """Forward cancels of requests the engine holds. A running request's sink also sees
        its cancel at the next step; this reaches requests still waiting for a slot."""
        while not self._closing:
            time.sleep(CANCEL_CHECK_SECONDS)
            for rid, run in list(self._runs.items()):
                if run.cancel.is_set() and not run.finished.is_set():
                    self._stop(rid, run)

    def _await_ready(self, timeout: float) -> EngineInfo:
        """Wait for the child to load the model; raise with its reason if it could not."""
        if not self._conn.poll(timeout):
            self._process.kill()
            raise EngineLost(f"the engine process did not start within {timeout:.0f}s")
        try:
            answer = self._conn.recv()
        except (EOFError, OSError) as exc:
            raise EngineLost(f"the engine process exited (code {self._process.wait()})") from exc
        if isinstance(answer, msg.Failed):
            self._process.wait()
            raise RuntimeError(f"the engine could not start: {answer.reason}")
        return answer.info

    def _read(self) -> None:
        """Dispatch the engine's messages until it exits."""
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            self.last_progress = time.monotonic()
            if isinstance(message, msg.Stats):
                self._stats = message.stats
                self._stats_answered.set()
                continue
            for item in message.items:
                if isinstance(item, msg.Step):
                    self._deliver(item.rid, TokenStep(item.token_id, item.finish,
                                                      item.logprobs))
                else:
                    self._end(item.rid, item.error)
        if not self._closing:
            self._lost()

    def _deliver(self, rid: int, step: TokenStep) -> None:
        """Hand a step to its run's sink; stop the request in the engine if the sink says so."""
        run = self._runs.get(rid)
        if run is None or run.finished.is_set():
            return  # ended on this side already: late steps go nowhere
        try:
            stop = bool(run.sink(step))
        except Exception as exc:  # a failing sink ends its own request only
            run.error, stop = exc, True
        if stop or step.finish is not None:
            if step.finish is None:
                self._stop(rid, run)
            run.finished.set()

    def _end(self, rid: int, error: BaseException | None) -> None:
        run = self._runs.get(rid)
        if run is not None and not run.finished.is_set():
            run.error = error
            run.finished.set()

    def _lost(self) -> None:
        try:
            code = self._process.wait(1.0)
        except subprocess.TimeoutExpired:
            code = None
        logger.critical("the engine process exited (code %s)", code)
        if self._on_lost is not None:
            self._on_lost()
        for run in list(self._runs.values()):
            run.error = EngineLost("the engine process exited")
            run.finished.set()


