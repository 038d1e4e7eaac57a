"""The per-job event log on a real Redis: sequence numbers, replay, live follow, expiry."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import redis

from conftest import wait_until
from tasks.jobs.contract import (DoneEvent, FinishReason, Job, JobState, SamplingParams, StatusEvent,
                            TokenEvent, Usage)
from tasks.jobs.feed import JobFeed, JobNotFound, StreamIdle, follow
from tasks.jobs.log import (CancelListener, EventWriteFailed, EventWriter, JobStore,
                          wake_channel)

PARAMS = SamplingParams(max_new_tokens=4, temperature=0.0, top_p=1.0)


@pytest.fixture()
def store(redis_client) -> JobStore:
    return JobStore(redis_client, ttl_seconds=600)


@pytest.fixture()
def feed(stack) -> Iterator[JobFeed]:
    """A feed on a client of its own, closed after the test (as tasks/jobs/feed.py asks)."""
    opened = JobFeed(redis.Redis.from_url(stack.settings.redis_url))
    yield opened
    opened.close()


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


def test_pipelined_appends_survive_redis_losing_its_scripts(store, redis_client):
    redis_client.script_flush()  # as after a Redis restart
    job = Job(model="m", prompt_token_ids=[1], params=PARAMS)
    store.create(job, StatusEvent(JobState.QUEUED))
    redis_client.script_flush()
    store.append_many([(job.id, 0, TokenEvent("a")), (job.id, 0, TokenEvent("b"))])
    assert [(e["seq"], e["type"]) for e in store.read(job.id)] == \
        [(1, "status"), (2, "token"), (3, "token")]


def test_follow_replays_then_follows_live_until_the_end(store, feed):
    job = _new_job(store)
    store.append(job.id, StatusEvent(JobState.QUEUED))
    seen: list[dict] = []
    reader = threading.Thread(target=lambda: seen.extend(follow(store, feed, job.id, 0, 10)))
    reader.start()
    for text in ("x", "y"):
        store.append(job.id, TokenEvent(text))
    store.append(job.id, _done())
    reader.join(10)
    assert [e["seq"] for e in seen] == [1, 2, 3, 4] and seen[-1]["type"] == "done"


def test_follow_after_the_last_event_of_a_finished_job_ends_at_once(store, feed):
    job = _new_job(store)
    store.append(job.id, _done())
    assert list(follow(store, feed, job.id, 1, idle_timeout=30)) == []


def test_follow_gives_up_on_a_silent_running_job_but_not_on_a_queued_one(store, feed):
    job = _new_job(store)
    store.append(job.id, StatusEvent(JobState.QUEUED))
    seen: list[dict] = []
    failed: list[BaseException] = []

    def read() -> None:
        try:
            seen.extend(follow(store, feed, job.id, 0, idle_timeout=1))
        except StreamIdle as exc:
            failed.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(2.5)  # queued for longer than the timeout: that is the queue, not silence
    assert not failed and [e["state"] for e in seen] == ["queued"]
    store.append(job.id, StatusEvent(JobState.STARTED, "w1"))
    reader.join(10)
    assert failed and [e["state"] for e in seen] == ["queued", "started"]


def test_cancel_sets_a_flag_the_worker_reads(store):
    job = _new_job(store)
    assert store.cancelled([job.id]) == [False]
    store.cancel(job.id)
    assert store.cancelled([job.id]) == [True]


def test_a_start_appends_started_reads_the_cancel_flag_and_refuses_an_ended_job(store):
    started = StatusEvent(JobState.STARTED, "w1")
    fresh, cancelled, ended = (_new_job(store) for _ in range(3))
    store.append(fresh.id, StatusEvent(JobState.QUEUED))
    assert store.start(fresh.id, started) == (False, False, False)
    assert [(e["seq"], e.get("state")) for e in store.read(fresh.id)] == \
        [(1, "queued"), (2, "started")]
    store.cancel(cancelled.id)
    assert store.start(cancelled.id, started) == (False, True, False)
    store.append(ended.id, _done())
    assert store.start(ended.id, started) == (True, False, False)  # a redelivered finished job
    assert [e["type"] for e in store.read(ended.id)] == ["done"]


def _follow_in_thread(store: JobStore, feed: JobFeed, job_id: str) -> tuple[threading.Thread, list]:
    seen: list[dict] = []

    def read() -> None:
        for event in follow(store, feed, job_id, 0, 10):
            seen.append(event)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return reader, seen


def test_following_an_unknown_job_raises_job_not_found(store, feed):
    with pytest.raises(JobNotFound):
        list(follow(store, feed, "no-such-job", 0, idle_timeout=5))
    assert store.read_existing("no-such-job") is None


def test_a_follower_reads_the_log_once_its_subscription_is_confirmed(store, feed):
    """A second follower of a job shares the first one's subscription: Redis sends it no
    confirmation, so the feed tells it at once that reading the log now misses nothing."""
    job = _new_job(store)
    with feed.subscription(job.id) as first:
        assert first.ready.wait(5) and first.events_after(0) is None  # the confirmation: read
        with feed.subscription(job.id) as second:
            assert second.ready.is_set() and second.events_after(0) is None
            store.append(job.id, StatusEvent(JobState.QUEUED))
            assert second.ready.wait(5) and second.events_after(0) == [
                {"seq": 1, "type": "status", "state": "queued"}]


def _subscribers(redis_client, job: Job) -> int:
    return redis_client.pubsub_numsub(wake_channel(job.id))[0][1]


def test_a_feed_subscribes_only_to_the_jobs_it_follows_and_leaves_when_done(store, feed,
                                                                           redis_client):
    followed, other = _new_job(store), _new_job(store)
    reader, seen = _follow_in_thread(store, feed, followed.id)
    wait_until(lambda: _subscribers(redis_client, followed) == 1, 5, "the subscription")
    assert _subscribers(redis_client, other) == 0
    store.append(followed.id, _done())
    reader.join(10)
    assert [e["type"] for e in seen] == ["done"]
    wait_until(lambda: _subscribers(redis_client, followed) == 0, 5, "the unsubscription")


def test_a_gap_in_the_published_sequence_is_filled_from_the_log(store, feed, redis_client):
    job = _new_job(store)
    reader, seen = _follow_in_thread(store, feed, job.id)
    wait_until(lambda: _subscribers(redis_client, job) == 1, 5, "the subscription")
    store.append(job.id, TokenEvent("a"))
    wait_until(lambda: len(seen) == 1, 5, "the first event")
    # An append whose message is lost: same log entry, published where nobody listens.
    call = store._append_call(job.id, TokenEvent("b"))
    call["args"][2] = "lost"  # the wake channel
    store._append(**call)
    store.append(job.id, TokenEvent("c"))
    store.append(job.id, _done())
    reader.join(10)
    assert [(e["seq"], e.get("text")) for e in seen] == [(1, "a"), (2, "b"), (3, "c"), (4, None)]


def test_events_published_while_the_feed_is_disconnected_are_not_lost(store, redis_client, stack):
    job = _new_job(store)
    name = f"feed-{job.id}"
    feed = JobFeed(redis.Redis.from_url(stack.settings.redis_url, client_name=name))
    reader, seen = _follow_in_thread(store, feed, job.id)
    store.append(job.id, TokenEvent("a"))
    wait_until(lambda: len(seen) == 1, 5, "the first event")
    feed_id = next(c["id"] for c in redis_client.client_list() if c["name"] == name)
    redis_client.execute_command("CLIENT", "KILL", "ID", feed_id)
    for text in "bcd":
        store.append(job.id, TokenEvent(text))
    store.append(job.id, _done())
    reader.join(10)
    feed.close()
    assert [e.get("text") for e in seen] == ["a", "b", "c", "d", None]


def test_the_event_writer_appends_in_order_and_flush_waits_for_the_job(store):
    jobs = [_new_job(store) for _ in range(3)]
    writer = EventWriter(store)
    for index in range(20):
        for job in jobs:
            writer.send(job.id, 0, TokenEvent(f"{job.id[:4]}-{index}"))
    for job in jobs:
        writer.flush(job.id, 0)
        assert [e["text"] for e in store.read(job.id)] == [f"{job.id[:4]}-{i}" for i in range(20)]


class _FailingOnce(JobStore):
    """A store whose next batched write fails as a dropped Redis connection would."""

    failures = 1

    def append_many(self, events):
        if self.failures:
            self.failures -= 1
            raise redis.ConnectionError("connection reset")
        return super().append_many(events)


def test_a_failed_write_refuses_the_jobs_later_events_and_is_reported_at_its_flush(redis_client):
    store = _FailingOnce(redis_client, 600)
    job = _new_job(store)
    writer = EventWriter(store)
    writer.send(job.id, 0, TokenEvent("lost"))

    def refused() -> bool:
        try:
            writer.send(job.id, 0, TokenEvent("later"))
        except EventWriteFailed:
            return True
        return False

    wait_until(refused, 5, "a refused send")
    with pytest.raises(EventWriteFailed):
        writer.flush(job.id, 0)
    writer.send(job.id, 0, TokenEvent("kept"))  # reported once: a job that goes on may write again
    writer.flush(job.id, 0)
    assert [e["text"] for e in store.read(job.id)][-1] == "kept"


@pytest.fixture()
def cancels(stack, store) -> Iterator[CancelListener]:
    listener = CancelListener(redis.Redis.from_url(stack.settings.redis_url), store, 0.2)
    listener.start()
    yield listener
    listener.close()


def test_a_cancel_reaches_the_watcher_by_message_or_by_flag(store, redis_client, cancels):
    live, missed = (_new_job(store) for _ in range(2))
    live_event, missed_event = cancels.watch(live.id), cancels.watch(missed.id)
    wait_until(lambda: redis_client.pubsub_numpat() >= 1, 5, "a pattern subscriber")
    store.cancel(live.id)
    assert live_event.wait(5)
    redis_client.set(f"dawet:job:{{{missed.id}}}:cancel", 1)  # the flag without its message
    assert missed_event.wait(2)  # found by the poll
