"""The job runner's boundaries: a failing engine ends the job with an error event, once; a job
cancelled before it starts ends cancelled without reaching the engine."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
import redis

from conftest import MODELS_FILE
from model_store.registry import load_registry
from model_store.tokenizer import ChatTokenizer
from tasks.jobs.contract import Job, SamplingParams
from tasks.engine.interface import StepSink, TokenStep
from tasks.jobs.log import CancelListener, JobStore
from tasks.worker.runner import JobRunner


class FailingEngine:
    """Yields one token, then fails the way a lost device would."""

    def run(self, prompt_ids: list[int], params: SamplingParams, cancel: threading.Event,
            sink: StepSink) -> None:
        sink(TokenStep(prompt_ids[0]))
        raise RuntimeError("device lost")


class UnusedEngine:
    """An engine that no job may reach."""

    def run(self, *args) -> None:
        raise AssertionError("the engine ran a job cancelled before its start")


@pytest.fixture()
def tokenizer() -> ChatTokenizer:
    return ChatTokenizer(Path(load_registry(MODELS_FILE).default.path))


def _new_job(store: JobStore, tokenizer: ChatTokenizer) -> Job:
    job = Job(model="m", prompt_token_ids=tokenizer.encode("Halo"),
              params=SamplingParams(max_new_tokens=4, temperature=0.0, top_p=1.0))
    store.create(job)
    return job


def test_a_failing_engine_ends_the_job_with_one_error_and_a_rerun_is_skipped(redis_client,
                                                                             tokenizer):
    store = JobStore(redis_client, 600)
    job = _new_job(store, tokenizer)
    runner = JobRunner(store, FailingEngine(), tokenizer, "test-worker")
    runner.run(job)
    runner.run(job)  # a redelivered task must not run the finished job again
    events = store.read(job.id)
    assert [e["type"] for e in events] == ["status", "token", "error"]
    assert events[-1]["error"] == {"message": "generation failed: RuntimeError",
                                   "type": "server_error", "code": "generation_failed",
                                   "param": None}


@pytest.mark.parametrize("listening", [True, False], ids=["cancel-listener", "no-listener"])
def test_a_job_cancelled_before_its_start_ends_cancelled_without_the_engine(stack, redis_client,
                                                                            tokenizer, listening):
    store = JobStore(redis_client, 600)
    cancels = CancelListener(redis.Redis.from_url(stack.settings.redis_url), store, 0.2)
    job = _new_job(store, tokenizer)
    store.cancel(job.id)
    try:
        JobRunner(store, UnusedEngine(), tokenizer, "test-worker",
                  cancels=cancels if listening else None).run(job)
    finally:
        cancels.close()
    events = store.read(job.id)
    assert [e["type"] for e in events] == ["status", "done"]
    assert events[-1]["finish_reason"] == "cancelled"
    assert events[-1]["usage"]["completion_tokens"] == 0
