"""Read Prometheus text from the running stack: the API's /metrics and each worker's."""
from __future__ import annotations

import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from dawet.processes import Stack


def worker_metrics_url(stack: Stack, index: int = 0) -> str:
    return f"http://{stack.settings.worker_metrics_host}:{stack.worker_metrics_ports[index]}/metrics"


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample at `url`, keyed by (name, labels)."""
    response = httpx.get(url, timeout=10)
    response.raise_for_status()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    """The sample's value; 0.0 when it does not exist yet (a counter never touched)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait_for_idle_worker(stack: Stack, model: str, timeout: float = 60) -> dict:
    """Scrape the worker until it holds no job, so counters stay still between two scrapes."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(worker_metrics_url(stack))
        busy = value(samples, "dawet_jobs_running", model=model) + value(
            samples, "dawet_jobs_waiting", model=model)
        if busy == 0 or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)
