"""tasks/worker/metrics.py without a stack: in-flight counts, the engine-stats hook and job outcomes."""
from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import REGISTRY

from tasks.worker import metrics
from tasks.jobs.contract import ErrorBody, ErrorEvent, Job, SamplingParams


def _values(collector) -> dict[str, float]:
    return {family.name: family.samples[0].value for family in collector.collect()}


def test_a_job_waits_until_its_first_token_then_runs(monkeypatch):
    monkeypatch.setattr(metrics, "_engine_stats", None)
    clock, collector = SimpleNamespace(first_token=None), metrics.RuntimeCollector("unit-a")
    with metrics.in_flight(clock):
        assert _values(collector) == {"dawet_jobs_running": 0, "dawet_jobs_waiting": 1,
                                      "dawet_batch_size": 0}
        clock.first_token = 1.0
        assert _values(collector) == {"dawet_jobs_running": 1, "dawet_jobs_waiting": 0,
                                      "dawet_batch_size": 1}
    assert _values(collector)["dawet_jobs_running"] == 0


def test_an_engine_that_reports_stats_sets_batch_waiting_and_kv_cache(monkeypatch):
    monkeypatch.setattr(metrics, "_engine_stats", None)
    metrics.report_engine_stats(lambda: metrics.EngineStats(batch_size=3, waiting=2,
                                                            kv_cache_usage=0.25))
    assert _values(metrics.RuntimeCollector("unit-b")) == {
        "dawet_jobs_running": 0, "dawet_jobs_waiting": 2, "dawet_batch_size": 3,
        "dawet_kv_cache_usage_ratio": 0.25}


def test_a_failed_job_counts_as_an_error_and_adds_no_tokens():
    job = Job(model="unit-c", prompt_token_ids=[1, 2],
              params=SamplingParams(max_new_tokens=4, temperature=0.0, top_p=1.0))
    metrics.observe_job(job, ErrorEvent(ErrorBody("boom", "server_error", "generation_failed")))
    sample = REGISTRY.get_sample_value
    assert sample("dawet_jobs_total", {"model": "unit-c", "outcome": "error"}) == 1
    assert sample("dawet_generation_tokens_total", {"model": "unit-c"}) is None
