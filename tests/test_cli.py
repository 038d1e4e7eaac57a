"""`dawet run` starts Redis, a worker and the API, and Ctrl-C leaves no process behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import psutil

from conftest import MODELS_FILE, ROOT
from dawet.processes import free_port


def test_dawet_run_serves_and_stops_cleanly_on_ctrl_c():
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAWET_")}
    env |= {"DAWET_API_PORT": str(port), "DAWET_MODELS_FILE": str(MODELS_FILE),
            "DAWET_API_WORKERS": "1", "PYTHONUNBUFFERED": "1"}
    launcher = subprocess.Popen([sys.executable, "-m", "dawet.cli", "run"], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output = _read_until(launcher, "Press Ctrl-C to stop.")
        assert f"http://127.0.0.1:{port}/v1/generate" in output
        children = psutil.Process(launcher.pid).children(recursive=True)
        names = " ".join(" ".join(c.cmdline()) for c in children)
        assert "redis-server" in names and "celery" in names and "gunicorn" in names
        assert httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
        launcher.send_signal(signal.SIGINT)
        assert launcher.wait(60) == 0
        assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    finally:
        launcher.kill()


def _read_until(process: subprocess.Popen, marker: str) -> str:
    lines = []
    for line in process.stdout:
        lines.append(line)
        if marker in line:
            return "".join(lines)
    raise AssertionError("dawet run exited early:\n" + "".join(lines[-40:]))
