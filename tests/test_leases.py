"""Job leases on a real Redis: one holder at a time, renewal, and one restart per lapsed job."""
from __future__ import annotations

import time

import pytest
import redis

from conftest import DEMO_MODEL, wait_until
from tasks.jobs.contract import (DoneEvent, FinishReason, Job, JobState, JobView, SamplingParams,
                            StatusEvent, TokenEvent, Usage)
from tasks.jobs.log import EventWriter, JobStore, StaleAttempt
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
    events = store.read(running.id)
    view = JobView(running.id)
    for event in events:
        view.apply(event)
    assert view.state is JobState.RESTARTED and view.text == "half a rep"  # the reply goes on
    assert events[-1]["resumes_after"] == events[-2]["seq"]
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


def test_a_reaper_that_dies_before_it_resends_leaves_the_job_to_the_next(redis_client, store):
    job = _queued_job(store)
    assert LeaseBook(redis_client, "dead-worker", 0.2).claim(job.id)
    time.sleep(0.3)
    ((taken, _, _),) = LeaseBook(redis_client, "dying", 0.2).reap()  # then it dies
    assert taken == job.id
    sent: list[str] = []
    reaper = Reaper(LeaseBook(redis_client, "next", 0.2), store, lambda j: sent.append(j.id))
    assert reaper.reap() == [] and sent == []  # the dying reaper's hold is still live
    restarted: list[str] = []  # reaping often, as workers do (a long silence moves leases on)
    wait_until(lambda: restarted.extend(reaper.reap()) or restarted, 2, "the hold to lapse",
               interval=0.05)
    assert restarted == [job.id] == sent
    assert redis_client.zscore(LEASES_KEY, job.id) is None  # the hold given up once re-sent
    states = [e["state"] for e in store.read(job.id)]
    assert states == ["queued", "restarted"]
    assert LeaseBook(redis_client, "new-worker", 0.2).claim(job.id)


def test_a_resent_job_may_be_claimed_before_its_reaper_lets_go(redis_client, store):
    job = _queued_job(store)
    assert LeaseBook(redis_client, "dead-worker", 0.2).claim(job.id)
    time.sleep(0.3)
    quick = LeaseBook(redis_client, "quick", 5)
    reaper = Reaper(LeaseBook(redis_client, "reaper-worker", 5), store,
                    lambda j: quick.claim(j.id))  # picked up at once, hold still live
    assert reaper.reap() == [job.id]
    assert redis_client.hget("dawet:lease-owners", job.id) == "quick"  # settle left it alone
    assert redis_client.zscore(LEASES_KEY, job.id) is not None


def test_the_keeper_renews_held_leases_so_they_do_not_lapse(redis_client, store):
    job = _queued_job(store)
    sent: list[str] = []
    book = LeaseBook(redis_client, "keeper", 0.5)
    keeper = LeaseKeeper(book, Reaper(book, store, lambda j: sent.append(j.id)), 0.1)
    keeper.start()
    try:
        with keeper.hold(job.id) as fence:
            assert fence == 1
            time.sleep(1.2)
            assert not LeaseBook(redis_client, "other", 0.5).claim(job.id)
    finally:
        keeper.stop()
    assert sent == [] and redis_client.zscore(LEASES_KEY, job.id) is None


def test_a_reaped_attempt_is_fenced_out_and_nothing_is_written_after_the_end(redis_client,
                                                                            store):
    job = _queued_job(store)
    stale = LeaseBook(redis_client, "frozen", 0.1)
    first = stale.claim(job.id)
    assert store.start(job.id, StatusEvent(JobState.STARTED, "frozen"), first).fenced is False
    assert store.append(job.id, TokenEvent("old "), first) is not None
    time.sleep(0.2)
    Reaper(LeaseBook(redis_client, "reaper", 1), store, lambda j: None).reap()
    assert store.append(job.id, TokenEvent("stale"), first) is None  # fenced at the reap
    second = LeaseBook(redis_client, "survivor", 5).claim(job.id)
    assert second > first
    assert store.start(job.id, StatusEvent(JobState.STARTED, "frozen"), first).fenced
    assert store.append(job.id, TokenEvent("new"), second) is not None
    writer = EventWriter(store)
    writer.send(job.id, first, TokenEvent("stale again"))
    with pytest.raises(StaleAttempt):
        writer.flush(job.id, first)
    assert store.append(job.id, DoneEvent(FinishReason.STOP, Usage(2, 1), {}), second)
    assert redis_client.zscore(LEASES_KEY, job.id) is None  # released with the end, at once
    assert store.append(job.id, TokenEvent("late"), second) is None
    assert store.append(job.id, StatusEvent(JobState.RESTARTED)) is None
    assert [e.get("text") or e.get("state") or e["type"] for e in store.read(job.id)] == \
        ["queued", "started", "old ", "restarted", "new", "done"]


def test_a_job_that_loses_its_worker_max_attempts_times_ends_with_worker_lost(redis_client,
                                                                             store):
    job = _queued_job(store)
    sent: list[str] = []
    reaper = Reaper(LeaseBook(redis_client, "reaper", 1), store, lambda j: sent.append(j.id),
                    max_attempts=2)
    for attempt in (1, 2):
        assert LeaseBook(redis_client, f"dies-{attempt}", 0.1).claim(job.id)
        time.sleep(0.2)
        reaper.reap()
    assert sent == [job.id]  # restarted once, then ended
    last = store.read(job.id)[-1]
    assert last["type"] == "error" and last["error"]["code"] == "worker_lost"
    late = LeaseBook(redis_client, "late", 1).claim(job.id)
    assert store.start(job.id, StatusEvent(JobState.STARTED, "late"), late).ended_before


def test_the_lease_thread_survives_an_unexpected_error_and_counts_it(redis_client, store):
    job = _queued_job(store)
    book = LeaseBook(redis_client, "keeper", 0.5)

    class BrokenOnce(Reaper):
        failures = 2

        def reap(self):
            if self.failures:
                self.failures -= 1
                raise ValueError("a bug in the reaper")
            return super().reap()

    before = _survived("leases")
    keeper = LeaseKeeper(book, BrokenOnce(book, store, lambda j: None), 0.1)
    keeper.start()
    try:
        with keeper.hold(job.id):
            time.sleep(1.2)  # past the lease: only a living thread keeps it
            assert not LeaseBook(redis_client, "other", 0.5).claim(job.id)
    finally:
        keeper.stop()
    assert _survived("leases") == before + 2


def _survived(thread: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("dawet_background_errors_total", {"thread": thread}) or 0.0
