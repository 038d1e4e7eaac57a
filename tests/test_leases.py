"""Job leases on a real Redis: one holder at a time, renewal, and one restart per lapsed job."""
from __future__ import annotations

import time

import pytest
import redis

from conftest import DEMO_MODEL
from tasks.jobs.contract import (DoneEvent, FinishReason, Job, JobState, JobView, SamplingParams,
                            StatusEvent, TokenEvent, Usage)
from tasks.jobs.log import JobStore
from tasks.jobs.leases import LEASES_KEY, LeaseBook, LeaseKeeper, Reaper

PARAMS = SamplingParams(max_new_tokens=4, temperature=0.0, top_p=1.0)


@pytest.fixture()
def redis_client(stack) -> redis.Redis:
    """A database of the test Redis that no worker uses, so no real reaper takes our leases."""
    client = redis.Redis.from_url(stack.settings.redis_url.rsplit("/", 1)[0] + "/9",
                                  decode_responses=True)
    client.flushdb()
    return client


@pytest.fixture()
def store(redis_client) -> JobStore:
    return JobStore(redis_client, 600)


def _queued_job(store: JobStore) -> Job:
    job = Job(model=DEMO_MODEL, prompt_token_ids=[1, 2], params=PARAMS)
    store.create(job)
    store.append(job.id, StatusEvent(JobState.QUEUED))
    return job


def test_only_one_worker_holds_a_live_lease(redis_client, store):
    job = _queued_job(store)
    first, second = (LeaseBook(redis_client, name, 0.3) for name in ("w1", "w2"))
    assert first.claim(job.id) and not second.claim(job.id)
    assert first.renew([job.id]) == set() and second.renew([job.id]) == {job.id}
    time.sleep(0.4)
    assert second.claim(job.id), "a lapsed lease may be taken over"
    assert first.renew([job.id]) == {job.id}
    first.release(job.id)  # not its lease any more: a no-op
    assert redis_client.zscore(LEASES_KEY, job.id) is not None
    second.release(job.id)
    assert redis_client.zscore(LEASES_KEY, job.id) is None


def test_a_lapsed_job_is_restarted_once_and_a_finished_one_never(redis_client, store):
    running, finished = _queued_job(store), _queued_job(store)
    book = LeaseBook(redis_client, "dead-worker", 0.2)
    for job in (running, finished):
        assert book.claim(job.id)
        store.append(job.id, StatusEvent(JobState.STARTED, "dead-worker"))
        store.append(job.id, TokenEvent("half a rep"))
    store.append(finished.id, DoneEvent(FinishReason.LENGTH, Usage(2, 4), {}))
    sent: list[str] = []
    reapers = [Reaper(LeaseBook(redis_client, f"r{i}", 1), store, lambda j: sent.append(j.id))
               for i in range(3)]
    time.sleep(0.3)
    restarted = [job_id for reaper in reapers for job_id in reaper.reap()]
    assert restarted == [running.id] and sent == [running.id]
    view = JobView(running.id)
    for event in store.read(running.id):
        view.apply(event)
    assert view.state is JobState.RESTARTED and view.text == ""
    assert store.read(finished.id)[-1]["type"] == "done"


def test_a_job_whose_resend_fails_is_reaped_again(redis_client, store):
    job = _queued_job(store)
    book = LeaseBook(redis_client, "w", 0.1)
    book.claim(job.id)
    time.sleep(0.2)

    def broker_down(_job):
        raise ConnectionError("broker down")

    assert Reaper(book, store, broker_down).reap() == []
    sent: list[str] = []
    assert Reaper(book, store, lambda j: sent.append(j.id)).reap() == [job.id] == sent


def test_the_keeper_renews_held_leases_so_they_do_not_lapse(redis_client, store):
    job = _queued_job(store)
    sent: list[str] = []
    book = LeaseBook(redis_client, "keeper", 0.5)
    keeper = LeaseKeeper(book, Reaper(book, store, lambda j: sent.append(j.id)), 0.1)
    keeper.start()
    try:
        with keeper.hold(job.id) as held:
            assert held
            time.sleep(1.2)
            assert not LeaseBook(redis_client, "other", 0.5).claim(job.id)
    finally:
        keeper.stop()
    assert sent == [] and redis_client.zscore(LEASES_KEY, job.id) is None
