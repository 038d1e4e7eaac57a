"""The per-job event log on a real Redis: sequence numbers, replay, live follow, expiry."""
from __future__ import annotations

import threading

import pytest

from tasks.contract import (DoneEvent, FinishReason, Job, JobState, SamplingParams, StatusEvent,
                            TokenEvent, Usage)
from tasks.joblog import JobStore, Notifier, StreamIdle, follow

PARAMS = SamplingParams(max_new_tokens=4, temperature=0.0, top_p=1.0)


@pytest.fixture()
def store(redis_client) -> JobStore:
    return JobStore(redis_client, ttl_seconds=600)


def _new_job(store: JobStore) -> Job:
    job = Job(model="m", prompt_token_ids=[1], params=PARAMS)
    store.create(job)
    return job


def _done() -> DoneEvent:
    return DoneEvent(FinishReason.STOP, Usage(1, 1), {})


def test_appends_number_events_from_one_and_replay_from_any_point(store, redis_client):
    job = _new_job(store)
    seqs = [store.append(job.id, TokenEvent(t)) for t in "abc"]
    assert seqs == [1, 2, 3]
    assert [e["text"] for e in store.read(job.id, after=1)] == ["b", "c"]
    assert store.read(job.id, after=3) == []
    assert 0 < redis_client.ttl(f"dawet:job:{{{job.id}}}:log") <= 600
    assert store.load(job.id) == job


def test_follow_replays_then_follows_live_until_the_end(store, redis_client):
    job = _new_job(store)
    store.append(job.id, StatusEvent(JobState.QUEUED))
    notifier = Notifier(redis_client)
    seen: list[dict] = []
    reader = threading.Thread(target=lambda: seen.extend(follow(store, notifier, job.id, 0, 10)))
    reader.start()
    for text in ("x", "y"):
        store.append(job.id, TokenEvent(text))
    store.append(job.id, _done())
    reader.join(10)
    assert [e["seq"] for e in seen] == [1, 2, 3, 4] and seen[-1]["type"] == "done"


def test_follow_after_the_last_event_of_a_finished_job_ends_at_once(store, redis_client):
    job = _new_job(store)
    store.append(job.id, _done())
    assert list(follow(store, Notifier(redis_client), job.id, 1, idle_timeout=30)) == []


def test_follow_gives_up_on_a_silent_job(store, redis_client):
    job = _new_job(store)
    with pytest.raises(StreamIdle):
        list(follow(store, Notifier(redis_client), job.id, 0, idle_timeout=1))


def test_cancel_sets_a_flag_the_worker_reads(store):
    job = _new_job(store)
    assert not store.is_cancelled(job.id)
    store.cancel(job.id)
    assert store.is_cancelled(job.id)
