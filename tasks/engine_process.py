"""Run a worker's engine in a process of its own, as vLLM runs its engine core.

The batching scheduler runs Python between every torch op. Inside the Celery worker it shares
one GIL with Celery's threads, the event writer, the cancel listener and the step sinks, and
any of them holding the GIL (or descheduled while holding it) stalls the decode step for
everyone. So a worker starts its engine in a child process that holds only the model, the
scheduler, and the scheduler itself reads the pipe between forward passes (no thread per
request, no reader thread to hand the GIL to). Steps come back over the pipe; the worker's
side decodes them into text and events on its own cores. The model is loaded once, in the
child.

Messages are pickled tuples over one duplex pipe:
  worker → engine  (ModelSpec, EngineOptions) first; then ("submit", rid, prompt_ids, params),
                   ("stop", rid), ("stats",), ("close",)
  engine → worker  ("ready", EngineInfo) or ("failed", reason), once at start;
                   ("step", rid, token_id, finish), ("end", rid, error | None), ("stats", EngineStats),
                   and ("batch", [those]): one iteration's steps in one message
"""
from __future__ import annotations

import ctypes
import itertools
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection

from dawet.cpus import pin_process
from dawet.heap import freeze_startup_heap
from model_store.registry import ModelSpec
from tasks.contract import SamplingParams
from tasks.engine import StepSink, TokenStep
from tasks.metrics import EngineStats

logger = logging.getLogger(__name__)

# CPython lets a thread that wants the GIL wait up to this long (5 ms by default) while another
# runs Python. The scheduler runs Python most of the time, so threads beside it would wait that
# long at every hand-off; 1 ms measured faster and steadier (make bench). The worker's process
# sets it too: its reader thread hands steps to sinks beside Celery's threads.
GIL_SWITCH_SECONDS = 0.001
STATS_TIMEOUT_SECONDS = 1.0  # how long a metrics scrape waits for the engine's numbers
CANCEL_CHECK_SECONDS = 0.05  # how often the worker's side forwards cancels of waiting requests
PR_SET_PDEATHSIG = 1


class EngineLost(RuntimeError):
    """The engine process exited while requests were running."""


@dataclass(frozen=True)
class EngineOptions:
    """How to build the engine: everything the child needs besides the model's spec."""

    kind: str = "batching"  # batching | sequential
    max_batch_size: int = 32
    kv_cache_tokens: int = 65_536
    torch_threads: int = 0  # 0 keeps torch's default
    log_level: str = "INFO"
    cpus: frozenset[int] = frozenset()  # the CPUs the engine process keeps to; empty: any


@dataclass(frozen=True)
class EngineInfo:
    """What the loaded model is, for the worker's heartbeat and metrics."""

    backend: str
    device: str
    load_seconds: float
    model_loads: int


def configure_torch_threads(options: EngineOptions) -> None:
    """Torch's intra-op threads, set before the model loads."""
    if options.torch_threads:
        import torch

        torch.set_num_threads(options.torch_threads)


def build_engine(loaded, options: EngineOptions, after_steps=None, inbox=None):
    """The engine the options choose: continuous batching, or one job at a time. A batching
    engine calls `after_steps()` each time a forward pass has handed its steps to sinks, and
    reads `inbox` (tasks.batching.Inbox) at each iteration when given one."""
    from tasks.batching import BatchingEngine
    from tasks.sequential import SequentialEngine

    logger.info("engine: %s (max batch %d, KV budget %d tokens)", options.kind,
                options.max_batch_size, options.kv_cache_tokens)
    if options.kind == "sequential":
        return SequentialEngine(loaded)
    return BatchingEngine(loaded, options.max_batch_size, options.kv_cache_tokens, after_steps,
                          inbox)


def engine_options(settings, cpus: frozenset[int] = frozenset()) -> EngineOptions:
    """The engine options a worker's settings (dawet.settings.Settings) choose, with the CPUs
    the engine process keeps to (empty: any)."""
    return EngineOptions(settings.engine, settings.max_batch_size, settings.kv_cache_tokens,
                         settings.torch_threads, settings.log_level, cpus)


def start_engine(spec: ModelSpec, options: EngineOptions, own_process: bool = True,
                 on_lost=None, after_steps=None, inbox=None):
    """Load the model and start its engine: (engine, EngineInfo). `own_process` runs it in a
    child process (EngineProcess); otherwise it runs on this process's threads."""
    if own_process:
        engine = EngineProcess(spec, options, on_lost)
        return engine, engine.info
    from model_store.loader import load_count, load_model

    configure_torch_threads(options)
    loaded = load_model(spec)
    info = EngineInfo(loaded.backend.value, str(loaded.device), loaded.load_seconds, load_count())
    return build_engine(loaded, options, after_steps, inbox), info


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
        self._process = subprocess.Popen([sys.executable, "-m", "tasks.engine_process",
                                          str(theirs.fileno())], pass_fds=[theirs.fileno()])
        theirs.close()
        self._conn = Connection(ours.detach())
        self._on_lost, self._closing = on_lost, False
        self._send_lock = threading.Lock()
        self._runs: dict[int, _Run] = {}
        self._ids = itertools.count(1)
        self._stats = EngineStats(0, 0, 0.0)
        self._stats_lock, self._stats_answered = threading.Lock(), threading.Event()
        self._send((spec, options))
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

    def stats(self) -> EngineStats:
        """Batch size, waiting requests, KV-cache use and GPU memory, asked of the engine now
        (the last answer if it does not answer within STATS_TIMEOUT_SECONDS)."""
        with self._stats_lock:
            self._stats_answered.clear()
            try:
                self._send(("stats",))
            except EngineLost:
                return self._stats
            self._stats_answered.wait(STATS_TIMEOUT_SECONDS)
            return self._stats

    def run(self, prompt_ids: list[int], params: SamplingParams, cancel: threading.Event,
            sink: StepSink) -> None:
        """Submit the request and wait for its end; steps reach `sink` on the reader thread."""
        rid, run = next(self._ids), _Run(sink, cancel)
        self._runs[rid] = run
        try:
            self._send(("submit", rid, list(prompt_ids), params))
            run.finished.wait()
        finally:
            self._runs.pop(rid, None)
        if run.error is not None:
            raise run.error

    def close(self, timeout: float = 10.0) -> None:
        """Ask the engine process to stop, and wait for it."""
        self._closing = True
        try:
            self._send(("close",))
        except (OSError, EngineLost):
            pass  # already gone
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def _send(self, message: tuple) -> None:
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
                self._send(("stop", rid))
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
            kind, detail = self._conn.recv()
        except (EOFError, OSError) as exc:
            raise EngineLost(f"the engine process exited (code {self._process.wait()})") from exc
        if kind != "ready":
            self._process.wait()
            raise RuntimeError(f"the engine could not start: {detail}")
        return detail

    def _read(self) -> None:
        """Dispatch the engine's messages until it exits."""
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            for kind, *body in message[1] if message[0] == "batch" else [message]:
                self._dispatch(kind, body)
        if not self._closing:
            self._lost()

    def _dispatch(self, kind: str, body: list) -> None:
        if kind == "step":
            self._deliver(body[0], TokenStep(body[1], body[2]))
        elif kind == "end":
            self._end(body[0], body[1])
        elif kind == "stats":
            self._stats = body[0]
            self._stats_answered.set()

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


class _Outbox:
    """The child's end of the pipe. A batching engine's steps wait in a list until `flush()`,
    which it calls after each forward pass, so a decode step of N rows is one message, not N."""

    def __init__(self, conn, batched: bool):
        self._conn, self._batched = conn, batched
        self._lock = threading.Lock()
        self._pending: list[tuple] = []

    def step(self, rid: int, step: TokenStep) -> None:
        message = ("step", rid, step.token_id, step.finish)
        if not self._batched:
            self.send(message)
            return
        with self._lock:
            self._pending.append(message)

    def end(self, rid: int, error: BaseException | None) -> None:
        """A request ended: send at once, after the steps before it."""
        with self._lock:
            self._pending.append(("end", rid, error))
        self.flush()

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
            if pending:
                self._conn.send(("batch", pending))

    def send(self, message: tuple) -> None:
        with self._lock:
            self._conn.send(message)


def serve(conn: Connection) -> None:
    """The engine process: load the model, report ready, then serve requests until closed."""
    _detach_from_signals()
    sys.setswitchinterval(GIL_SWITCH_SECONDS)
    spec, options = conn.recv()
    logging.basicConfig(level=options.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if options.cpus:
        pin_process(options.cpus)  # before torch starts threads: they inherit it
    batching = options.kind == "batching"
    outbox = _Outbox(conn, batched=batching)
    inbox = _Inbox(conn, outbox, _submit_to_batch if batching else _run_on_a_thread)
    try:
        engine, info = start_engine(spec, options, own_process=False, after_steps=outbox.flush,
                                    inbox=inbox if batching else None)
    except Exception as exc:  # reported to the worker, which fails its start with it
        logger.exception("could not start the engine")
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    freeze_startup_heap()
    outbox.send(("ready", info))
    if batching:
        engine.join()  # its scheduler reads the inbox until the worker closes it
        return
    while not inbox.closed:
        inbox(engine, idle=True)


def _detach_from_signals() -> None:
    """The worker decides when the engine stops: ignore a terminal's Ctrl-C or a group's
    SIGTERM (the worker drains its jobs first), and die with the worker if it is killed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        ctypes.CDLL("libc.so.6").prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the closed pipe still ends the process


class _Inbox:
    """The engine's end of the pipe: submissions, stops, stats requests and close.

    A batching engine's scheduler reads it itself between forward passes. A reader thread and
    a thread per request (which the one-at-a-time engine still needs) took the GIL from the
    scheduler mid-step: under the bench's C = 16 load its prefills spent 35 % of their wall
    time off the CPU with them, 16 % without. `start` hands a request to the engine:
    _submit_to_batch or _run_on_a_thread.
    """

    def __init__(self, conn, outbox: _Outbox, start):
        self._conn, self._outbox, self._start = conn, outbox, start
        self._cancels: dict[int, threading.Event] = {}
        self.closed = False

    def __call__(self, engine, idle: bool) -> None:
        """Handle every message that has arrived; while idle, wait for the first."""
        try:
            if idle:
                self._conn.poll(None)
            while self._conn.poll(0):
                self._handle(engine, *self._conn.recv())
        except (EOFError, OSError):
            os._exit(0)  # the worker is gone: nobody is left to read steps

    def _handle(self, engine, kind: str, *body) -> None:
        if kind == "submit":
            self._submit(engine, *body)
        elif kind == "stop" and body[0] in self._cancels:
            self._cancels[body[0]].set()
        elif kind == "stats":
            self._outbox.send(("stats", _stats_of(engine)))
        elif kind == "close":
            self.closed = True
            engine.close()

    def _submit(self, engine, rid: int, prompt_ids: list[int], params: SamplingParams) -> None:
        self._cancels[rid] = threading.Event()

        def sink(step: TokenStep) -> None:
            self._outbox.step(rid, step)

        def on_end(error: BaseException | None) -> None:
            self._cancels.pop(rid, None)
            self._outbox.end(rid, None if error is None else _picklable(error))

        try:
            self._start(engine, prompt_ids, params, self._cancels[rid], sink, on_end)
        except Exception as exc:  # it can never run: handed to the worker's run(), which raises
            on_end(exc)


def _submit_to_batch(engine, prompt_ids, params, cancel, sink, on_end) -> None:
    engine.submit(prompt_ids, params, cancel, sink, on_end)


def _run_on_a_thread(engine, prompt_ids, params, cancel, sink, on_end) -> None:
    """The one-at-a-time engine runs each request on its caller's thread: give it one."""

    def run() -> None:
        error = None
        try:
            engine.run(prompt_ids, params, cancel, sink)
        except Exception as exc:  # handed to the worker's run(), which raises it
            error = exc
        on_end(error)

    threading.Thread(target=run, name="dawet-request", daemon=True).start()


def _picklable(exc: Exception) -> Exception:
    try:
        pickle.dumps(exc)
        return exc
    except Exception:  # noqa: BLE001 - any pickling failure: keep the message
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _stats_of(engine) -> EngineStats:
    from tasks.metrics import cuda_memory_allocated

    return replace(engine.stats(), gpu_memory_bytes=cuda_memory_allocated())


if __name__ == "__main__":
    # Run the module's importable copy, so what is pickled names tasks.engine_process, not __main__.
    from tasks.engine_process import serve as serve_imported

    serve_imported(Connection(int(sys.argv[1])))
