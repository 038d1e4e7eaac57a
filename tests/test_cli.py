"""`dawet run` starts Redis, a worker and the API, Ctrl-C leaves no process behind, and the next
run still has the jobs of the last (its Redis keeps an append-only file)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import psutil

from conftest import MODELS_FILE, ROOT
from dawet.processes import free_port


def test_dawet_run_serves_stops_cleanly_on_ctrl_c_and_keeps_its_jobs(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAWET_")}
    env |= {"DAWET_API_PORT": str(port), "DAWET_MODELS_FILE": str(MODELS_FILE),
            "DAWET_API_WORKERS": "1", "PYTHONUNBUFFERED": "1",
            "DAWET_REDIS_DATA_DIR": str(tmp_path / "redis")}
    job = _run_once(env, port, lambda api: api.post("/v1/generate", json={
        "prompt": "Halo", "max_new_tokens": 4}).json())
    view = _run_once(env, port, lambda api: api.get(f"/v1/jobs/{job['id']}").json())
    assert view["id"] == job["id"]
    assert (tmp_path / "redis" / "appendonlydir").is_dir()


def _run_once(env: dict[str, str], port: int, use):
    """`dawet run` until ready, `use(api client)`, then Ctrl-C: no process may be left."""
    launcher = subprocess.Popen([sys.executable, "-m", "dawet.cli", "run"], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output = _read_until(launcher, "Press Ctrl-C to stop.")
        assert f"http://127.0.0.1:{port}/v1/generate" in output
        children = psutil.Process(launcher.pid).children(recursive=True)
        names = " ".join(" ".join(c.cmdline()) for c in children)
        assert "redis-server" in names and "celery" in names and "gunicorn" in names
        assert httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as api:
            answer = use(api)
        launcher.send_signal(signal.SIGINT)
        assert launcher.wait(60) == 0
        assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        return answer
    finally:
        launcher.kill()


def _read_until(process: subprocess.Popen, marker: str) -> str:
    lines = []
    for line in process.stdout:
        lines.append(line)
        if marker in line:
            return "".join(lines)
    raise AssertionError("dawet run exited early:\n" + "".join(lines[-40:]))
