"""gunicorn hooks for the API. Worker processes share metric files, so /metrics sees them all:
each start gets a fresh directory (under TMPDIR), so no counts of an earlier run are added in.
Each worker freezes its startup heap once the app is loaded (dawet/heap.py).

Used as `gunicorn -c python:dawet.gunicorn_conf`; the other options come from the command line.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from dawet.heap import freeze_startup_heap
from dawet.settings import export_metrics_dir

_metrics_dir: Path | None = None

# Seconds an idle keep-alive connection stays open. A client streams a job over a WebSocket
# and then POSTs the next one on its pooled connection; with gunicorn's default of 2 s the
# server had often closed it meanwhile, and a POST racing that close failed with "Server
# disconnected without sending a response" (seen at 64 clients in make bench). Load
# balancers keep idle connections about a minute; this outlasts them.
keepalive = 75


def on_starting(server) -> None:
    """Export an empty metrics directory before any worker (or prometheus_client) starts."""
    global _metrics_dir
    _metrics_dir = Path(tempfile.mkdtemp(prefix="dawet-api-metrics-"))
    export_metrics_dir(_metrics_dir)


def post_worker_init(worker) -> None:
    """The app is loaded: start its batch dispatcher (api/batch_dispatcher.py), and keep the
    collector off its objects (dawet/heap.py)."""
    from api.batch_dispatcher import start_dispatcher

    start_dispatcher(worker.wsgi, lambda: worker.alive)
    freeze_startup_heap()


def child_exit(server, worker) -> None:
    """Drop a dead worker's live gauges (open streams) from the totals."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server) -> None:
    """Remove the metrics directory."""
    if _metrics_dir is not None:
        shutil.rmtree(_metrics_dir, ignore_errors=True)
