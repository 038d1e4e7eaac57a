"""The job runner's boundaries: a failing engine ends the job with an error event, once; a job
cancelled before it starts ends cancelled without reaching the engine."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
import redis

from conftest import MODELS_FILE, token_text
from model_store.registry import load_registry
from model_store.tokenizer import ChatTokenizer
from tasks.jobs.contract import FinishReason, Job, SamplingParams, TokenEvent
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


class ScriptedEngine:
    """Writes a fixed reply: after a prompt that already ends with its first k tokens (a
    continued reply), its tokens from k on, within the request's max_new_tokens."""

    def __init__(self, prompt: list[int], reply: list[int]):
        self.prompt, self.reply, self.prompts = prompt, reply, []

    def run(self, prompt_ids: list[int], params: SamplingParams, cancel: threading.Event,
            sink: StepSink) -> None:
        self.prompts.append(prompt_ids)
        done = len(prompt_ids) - len(self.prompt)
        assert prompt_ids[:len(self.prompt)] == self.prompt and \
            prompt_ids[len(self.prompt):] == self.reply[:done]
        rest = self.reply[done:done + params.max_new_tokens]
        for index, token in enumerate(rest):
            last = index == len(rest) - 1
            if sink(TokenStep(token, FinishReason.LENGTH if last else None)):
                return


def _continued(store: JobStore, tokenizer: ChatTokenizer, engine: ScriptedEngine,
               params: SamplingParams, delivered_events: int) -> list[dict]:
    """Run a job whose earlier attempt delivered its first token events, as attempt 2."""
    reference = Job(model="m", prompt_token_ids=engine.prompt, params=params)
    store.create(reference)
    JobRunner(store, engine, tokenizer, "w").run(reference)  # per token: one event each
    earlier = [e for e in store.read(reference.id) if e["type"] == "token"][:delivered_events]
    job = Job(model="m", prompt_token_ids=engine.prompt, params=params)
    store.create(job)
    for event in earlier:
        store.append(job.id, TokenEvent(event["text"], tuple(event["ids"])))
    store.redis.hset(f"dawet:job:{{{job.id}}}", "fence", 2)  # as a second claim leaves it
    JobRunner(store, engine, tokenizer, "w").run(job, fence=2)
    return store.read(reference.id), store.read(job.id)


@pytest.mark.parametrize("delivered", [1, 5, 11])
def test_a_new_attempt_continues_the_reply_from_the_delivered_tokens(redis_client, tokenizer,
                                                                     delivered):
    prompt = tokenizer.encode("Halo")
    engine = ScriptedEngine(prompt, tokenizer.encode(" apa kabar, teman? Baik sekali, terima kasih"))
    params = SamplingParams(max_new_tokens=12, min_new_tokens=12, temperature=0.0, top_p=1.0)
    reference, continued = _continued(JobStore(redis_client, 600), tokenizer, engine, params,
                                      delivered)
    assert token_text(continued) == token_text(reference)
    assert continued[-1]["usage"] == reference[-1]["usage"]
    assert continued[-1]["finish_reason"] == "length"
    carried = [e["ids"] for e in continued if e["type"] == "token"][:delivered]
    assert engine.prompts[-1] == prompt + [i for ids in carried for i in ids]


def test_a_stop_sequence_across_the_seam_ends_the_continued_reply(redis_client, tokenizer):
    prompt = tokenizer.encode("Halo")
    reply = tokenizer.encode(" apa kabar, teman? Baik sekali")
    engine = ScriptedEngine(prompt, reply)
    pieces = [tokenizer.decode(reply[:i]) for i in range(len(reply) + 1)]
    cut = next(i for i in range(2, len(reply)) if pieces[i] != pieces[i - 1])
    stop = pieces[cut][len(pieces[cut - 1]) - 1:]  # starts before token `cut`, ends in it
    params = SamplingParams(max_new_tokens=12, temperature=0.0, top_p=1.0, stop=(stop,))
    reference, continued = _continued(JobStore(redis_client, 600), tokenizer, engine, params,
                                      cut - 1)
    assert token_text(continued) == token_text(reference) == pieces[cut - 1][:-1]
    assert continued[-1]["finish_reason"] == reference[-1]["finish_reason"] == "stop_sequence"


def test_a_reply_whose_tokens_were_all_delivered_ends_without_the_engine(redis_client,
                                                                         tokenizer):
    prompt = tokenizer.encode("Halo")
    engine = ScriptedEngine(prompt, tokenizer.encode(" apa kabar, teman?"))
    params = SamplingParams(max_new_tokens=4, temperature=0.0, top_p=1.0)
    reference, continued = _continued(JobStore(redis_client, 600), tokenizer, engine, params, 4)
    assert len(engine.prompts) == 1  # only the reference run reached it
    assert token_text(continued) == token_text(reference)
    assert continued[-1]["usage"]["completion_tokens"] == 4
