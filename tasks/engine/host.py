"""The engine process: the child's loop that owns the model and serves the worker's pipe.

Started by tasks/engine/process.py as `python -m tasks.engine.host FD`. It reads Start, loads
the model, answers Ready (or Failed), then serves Submit, Stop, StatsRequest and Close
(tasks/engine/protocol.py) until the worker closes it or goes away.
"""
from __future__ import annotations

import ctypes
import logging
import os
import pickle
import signal
import sys
import threading
from dataclasses import replace
from multiprocessing.connection import Connection

from dawet.cpus import pin_process
from dawet.heap import freeze_startup_heap
from tasks.engine import protocol as msg
from tasks.engine.factory import start_engine
from tasks.engine.interface import EngineStats, TokenStep
from tasks.engine.process import GIL_SWITCH_SECONDS

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


class _Outbox:
    """The child's end of the pipe. A batching engine's steps wait in a list until `flush()`,
    which it calls after each forward pass, so a decode step of N rows is one message, not N."""

    def __init__(self, conn, batched: bool):
        self._conn, self._batched = conn, batched
        self._lock = threading.Lock()
        self._pending: list[msg.Step | msg.End] = []

    def step(self, rid: int, step: TokenStep) -> None:
        message = msg.Step(rid, step.token_id, step.finish, step.logprobs)
        if not self._batched:
            self.send(msg.Steps([message]))
            return
        with self._lock:
            self._pending.append(message)

    def end(self, rid: int, error: BaseException | None) -> None:
        """A request ended: send at once, after the steps before it."""
        with self._lock:
            self._pending.append(msg.End(rid, error))
        self.flush()

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
            if pending:
                self._conn.send(msg.Steps(pending))

    def send(self, message: msg.FromEngine) -> None:
        with self._lock:
            self._conn.send(message)


def serve(conn: Connection) -> None:
    """The engine process: load the model, report ready, then serve requests until closed."""
    _detach_from_signals()
    sys.setswitchinterval(GIL_SWITCH_SECONDS)
    start: msg.Start = conn.recv()
    spec, options = start.spec, start.options
    logging.basicConfig(level=options.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if options.cpus:
        pin_process(options.cpus)  # before torch starts threads: they inherit it
    own_loop = options.runs_own_loop
    outbox = _Outbox(conn, batched=own_loop)
    inbox = _Inbox(conn, outbox, _submit_to_loop if own_loop else _run_on_a_thread)
    try:
        engine, info = start_engine(spec, options, own_process=False, after_steps=outbox.flush,
                                    inbox=inbox if own_loop else None)
    except Exception as exc:  # reported to the worker, which fails its start with it
        logger.exception("could not start the engine")
        conn.send(msg.Failed(f"{type(exc).__name__}: {exc}"))
        return
    freeze_startup_heap()
    outbox.send(msg.Ready(info))
    if own_loop:
        engine.join()  # its loop, here or on its thread, reads the inbox until closed
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

    An engine with a loop of its own (batching, vllm) reads it itself between forward passes. A reader thread and
    a thread per request (which the one-at-a-time engine still needs) took the GIL from the
    scheduler mid-step: under the bench's C = 16 load its prefills spent 35 % of their wall
    time off the CPU with them, 16 % without. `start` hands a request to the engine:
    _submit_to_loop or _run_on_a_thread.
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
                self._handle(engine, self._conn.recv())
        except (EOFError, OSError):
            os._exit(0)  # the worker is gone: nobody is left to read steps

    def _handle(self, engine, message: msg.ToEngine) -> None:
        if isinstance(message, msg.Submit):
            self._submit(engine, message)
        elif isinstance(message, msg.Stop) and message.rid in self._cancels:
            self._cancels[message.rid].set()
        elif isinstance(message, msg.StatsRequest):
            self._outbox.send(msg.Stats(_stats_of(engine)))
        elif isinstance(message, msg.Close):
            self.closed = True
            engine.close()

    def _submit(self, engine, submit: msg.Submit) -> None:
        rid = submit.rid
        self._cancels[rid] = threading.Event()

        def sink(step: TokenStep) -> None:
            self._outbox.step(rid, step)

        def on_end(error: BaseException | None) -> None:
            self._cancels.pop(rid, None)
            self._outbox.end(rid, None if error is None else _picklable(error))

        try:
            self._start(engine, submit.prompt_ids, submit.params, self._cancels[rid], sink, on_end)
        except Exception as exc:  # it can never run: handed to the worker's run(), which raises
            on_end(exc)


def _submit_to_loop(engine, prompt_ids, params, cancel, sink, on_end) -> None:
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
    from tasks.engine.interface import cuda_memory_allocated

    return replace(engine.stats(), gpu_memory_bytes=cuda_memory_allocated())


if __name__ == "__main__":
    # Run the module's importable copy, so what is pickled names tasks.engine.host, not __main__.
    from tasks.engine.host import serve as serve_imported

    serve_imported(Connection(int(sys.argv[1])))
