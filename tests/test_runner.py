"""The job runner's boundary: a failing engine ends the job with an error event, once."""
from __future__ import annotations

import threading
from pathlib import Path

from conftest import MODELS_FILE
from model_store.registry import load_registry
from model_store.tokenizer import ChatTokenizer
from tasks.contract import Job, SamplingParams
from tasks.engine import StepSink, TokenStep
from tasks.joblog import JobStore
from tasks.runner import JobRunner


class FailingEngine:
    """Yields one token, then fails the way a lost device would."""

    def run(self, prompt_ids: list[int], params: SamplingParams, cancel: threading.Event,
            sink: StepSink) -> None:
        sink(TokenStep(prompt_ids[0]))
        raise RuntimeError("device lost")


def test_a_failing_engine_ends_the_job_with_one_error_and_a_rerun_is_skipped(redis_client):
    store = JobStore(redis_client, 600)
    tokenizer = ChatTokenizer(Path(load_registry(MODELS_FILE).default.path))
    job = Job(model="m", prompt_token_ids=tokenizer.encode("Halo"),
              params=SamplingParams(max_new_tokens=4, temperature=0.0, top_p=1.0))
    store.create(job)
    runner = JobRunner(store, FailingEngine(), tokenizer, "test-worker")
    runner.run(job)
    runner.run(job)  # a redelivered task must not run the finished job again
    events = store.read(job.id)
    assert [e["type"] for e in events] == ["status", "token", "error"]
    assert events[-1]["error"] == {"message": "generation failed: RuntimeError",
                                   "type": "server_error", "code": "generation_failed",
                                   "param": None}
