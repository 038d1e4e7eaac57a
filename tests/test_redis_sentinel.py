"""Redis that fails over: a primary, a replica and three sentinels as local processes, and a
Dawet stack that finds the primary through the sentinels. The primary is killed while jobs
stream; every job ends, and every client gets each event once, in order, with the job's text.
A failover that loses writes the old primary acknowledged is played exactly on one Redis."""
from __future__ import annotations

import json
import signal
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis
import websocket

from conftest import DEMO_MODEL, MODELS_FILE, fresh_log_dir, submit, token_text, wait_until
from dawet.processes import Child, Stack, find_redis_server, free_port, redis_argv
from dawet.redis_client import redis_client
from dawet.settings import Settings
from tasks.jobs.contract import (DoneEvent, FinishReason, Job, JobState, SamplingParams,
                                 StatusEvent, TokenEvent, Usage)
from tasks.jobs.leases import LeaseBook
from tasks.jobs.log import JobStore

MASTER = "dawet-test"
DOWN_AFTER_MS = 1500  # sentinels call the primary down after this silence
LONG = {"prompt": "Once upon a time", "min_new_tokens": 300, "max_new_tokens": 300,
        "temperature": 0.0}
STREAMS = 4
PARAMS = SamplingParams(max_new_tokens=8, temperature=0.0, top_p=1.0)


class RedisSet:
    """A primary, its replica and three sentinels watching them, each a child process."""

    def __init__(self, log_dir: Path):
        self._dir = tempfile.TemporaryDirectory(prefix="dawet-sentinel-")
        self._log_dir = log_dir
        self.primary_port, self.replica_port = free_port(), free_port()
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.children: dict[str, Child] = {}

    @property
    def sentinels(self) -> str:
        return ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)

    def start(self) -> "RedisSet":
        binary = find_redis_server()
        self._spawn("primary", redis_argv(binary, self.primary_port, self._subdir("primary")))
        self._spawn("replica", redis_argv(binary, self.replica_port, self._subdir("replica"))
                    + ["--replicaof", "127.0.0.1", str(self.primary_port)])
        for index, port in enumerate(self.sentinel_ports):
            self._spawn(f"sentinel{index}", [binary, self._sentinel_conf(index, port),
                                             "--sentinel"])
        wait_until(self._watched, 60, "sentinels that see the replica and each other")
        return self

    def stop(self) -> None:
        for child in self.children.values():
            child.stop()
        self._dir.cleanup()

    def kill_primary(self) -> None:
        self.children["primary"].stop(signal.SIGKILL)

    def primary(self) -> int:
        """The port of the primary, as the first sentinel sees it."""
        client = redis.Redis(port=self.sentinel_ports[0], decode_responses=True)
        return int(client.sentinel_get_master_addr_by_name(MASTER)[1])

    def _watched(self) -> bool:
        try:
            views = [redis.Redis(port=port).sentinel_master(MASTER)
                     for port in self.sentinel_ports]
        except redis.RedisError:
            return False
        return all(view["num-slaves"] == 1 and view["num-other-sentinels"] == 2
                   for view in views)

    def _subdir(self, name: str) -> str:
        path = Path(self._dir.name) / name
        path.mkdir()
        return str(path)

    def _sentinel_conf(self, index: int, port: int) -> str:
        """A sentinel's config file: a sentinel rewrites it, so each has its own."""
        path = Path(self._subdir(f"sentinel{index}")) / "sentinel.conf"
        path.write_text(f"port {port}\nbind 127.0.0.1\ndir {path.parent}\n"
                        f"sentinel monitor {MASTER} 127.0.0.1 {self.primary_port} 2\n"
                        f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n"
                        f"sentinel failover-timeout {MASTER} 10000\n")
        return str(path)

    def _spawn(self, name: str, argv: list[str]) -> None:
        child = Child(name, argv, {}, self._log_dir / f"{name}.log")
        child.start()
        self.children[name] = child


@pytest.fixture(scope="module")
def redis_set() -> Iterator[RedisSet]:
    running = RedisSet(fresh_log_dir("logs-sentinel")).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def settings(redis_set: RedisSet) -> Settings:
    return Settings(redis_sentinels=redis_set.sentinels, redis_sentinel_master=MASTER,
                    models_file=MODELS_FILE, default_model=DEMO_MODEL, api_port=free_port(),
                    api_workers=1, worker_concurrency=8, heartbeat_seconds=0.5,
                    torch_threads=1, stream_idle_timeout_seconds=60)


@pytest.fixture(scope="module")
def stack(settings: Settings) -> Iterator[Stack]:
    running = Stack(settings, log_dir=fresh_log_dir("logs-sentinel-stack")).start()
    yield running
    running.stop()


def _job(store: JobStore) -> Job:
    job = Job(model="m", prompt_token_ids=[1], params=PARAMS)
    store.create(job, StatusEvent(JobState.QUEUED))
    return job


def _keys(job: Job) -> list[str]:
    return [f"dawet:job:{{{job.id}}}", f"dawet:job:{{{job.id}}}:log"]


def test_writes_a_failover_lost_are_written_again_with_their_sequence_numbers(settings):
    """What a replica that lagged holds is the primary's state some writes ago: keys restored
    from a DUMP taken then are that state, on one Redis and without timing."""
    client = redis_client(settings)
    store = JobStore(client, 600)
    job = _job(store)
    fence = LeaseBook(client, "worker", 30).claim(job.id)
    store.start(job.id, StatusEvent(JobState.STARTED, "worker"), fence)
    store.append(job.id, TokenEvent("a", (1,)), fence)
    replica = {key: client.dump(key) for key in _keys(job)}
    store.append(job.id, TokenEvent("b", (2,)), fence)
    store.append(job.id, TokenEvent("c", (3,)), fence)
    seen = store.read(job.id)  # what a reader of the old primary was sent
    for key, value in replica.items():  # the failover: the new primary lacks "b" and "c"
        client.restore(key, 0, value, replace=True)
    assert [e.get("text") for e in store.read(job.id)][-1] == "a"

    assert store.append_many([(job.id, fence, TokenEvent("d", (4,))),
                              (job.id, fence, TokenEvent("e", (5,)))]) == [True, True]
    assert store.append(job.id, DoneEvent(FinishReason.LENGTH, Usage(1, 5), {}), fence)
    log = store.read(job.id)
    assert log[:len(seen)] == seen  # the same events at the same sequence numbers
    assert [e["seq"] for e in log] == list(range(1, 9))
    assert token_text(log) == "abcde" and log[-1]["type"] == "done"
    assert store.read(job.id, after=seen[-1]["seq"]) == log[len(seen):]  # a reader reads on


def test_an_end_a_failover_lost_is_written_again_before_the_job_is_acknowledged(settings):
    client = redis_client(settings)
    store = JobStore(client, 600)
    job = _job(store)
    fence = LeaseBook(client, "worker", 30).claim(job.id)
    store.start(job.id, StatusEvent(JobState.STARTED, "worker"), fence)
    replica = {key: client.dump(key) for key in _keys(job)}
    store.append(job.id, TokenEvent("a", (1,)), fence)
    store.append(job.id, DoneEvent(FinishReason.LENGTH, Usage(1, 1), {}), fence)
    seen = store.read(job.id)
    for key, value in replica.items():  # no later write of the attempt would find them missing
        client.restore(key, 0, value, replace=True)
    store.confirm(job.id, fence)  # as the worker does before Celery acknowledges the job
    assert store.read(job.id) == seen


def test_a_jobs_milestones_wait_for_the_replica(settings, redis_set):
    assert redis_set.primary() == redis_set.primary_port  # before the failover test
    store = JobStore(redis_client(settings), 600, replica_wait=5.0)
    job = _job(store)
    assert store.replicate(job.id) == 1
    replica = redis.Redis(port=redis_set.replica_port)
    assert replica.exists(_keys(job)[0])  # WAIT answered after the replica took the write


@dataclass
class Reader:
    """A WebSocket client reading a job's stream to its end in a thread."""

    url: str
    events: list[dict] = field(default_factory=list)
    after_kill: int = 0  # events received after the primary was killed
    killed: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        ws = websocket.create_connection(self.url, timeout=120)
        try:
            while frame := ws.recv():
                self.events.append(json.loads(frame))
                self.after_kill += self.killed.is_set()
        except websocket.WebSocketConnectionClosedException:
            pass
        finally:
            ws.close()


@dataclass
class SseReader:
    """An OpenAI chat completion streamed as server-sent events, read in a thread."""

    api_url: str
    text: str = ""
    job_id: str = ""
    frames: list = field(default_factory=list)

    def __post_init__(self):
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        body = {"model": DEMO_MODEL, "messages": [{"role": "user", "content": "Halo"}],
                "max_tokens": 300, "min_tokens": 300, "temperature": 0, "stream": True}
        with httpx.stream("POST", self.api_url + "/v1/chat/completions", json=body,
                          timeout=120) as response:
            self.job_id = response.headers["X-Dawet-Job-Id"]
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    frame = json.loads(line[len("data: "):])
                    self.frames.append(frame)
                    for choice in frame.get("choices", ()):
                        self.text += choice.get("delta", {}).get("content") or ""


def test_streams_ride_out_a_failover_without_a_lost_or_doubled_event(stack, redis_set):
    with httpx.Client(base_url=stack.api_url, timeout=60) as api:
        sse = SseReader(stack.api_url)
        jobs = [submit(api, **LONG) for _ in range(STREAMS)]
        readers = [Reader(job["stream_url"]) for job in jobs]
        wait_until(lambda: sse.text and all(token_text(r.events) for r in readers), 120,
                   "every stream's first tokens")
        for reader in readers:
            reader.killed.set()
        redis_set.kill_primary()
        wait_until(lambda: redis_set.primary() == redis_set.replica_port, 60, "the failover")

        for thread in [reader.thread for reader in readers] + [sse.thread]:
            thread.join(180)
            assert not thread.is_alive(), "a stream did not end"
        assert any(reader.after_kill for reader in readers)  # the jobs went on after the kill
        for job, reader in zip(jobs, readers):
            seqs = [event["seq"] for event in reader.events]
            assert seqs == list(range(1, len(seqs) + 1)), seqs  # each event once, in order
            assert reader.events[-1]["type"] == "done", reader.events[-1]
            view = api.get(f"/v1/jobs/{job['id']}").json()
            assert view["state"] == "succeeded" and token_text(reader.events) == view["text"]
        assert not [frame for frame in sse.frames if "error" in frame]
        assert sse.frames[-1]["choices"][0]["finish_reason"] == "length"
        assert sse.text == api.get(f"/v1/jobs/{sse.job_id}").json()["text"]

        after = submit(api, prompt="Still there?", max_new_tokens=8)  # on the new primary
        wait_until(lambda: api.get(f"/v1/jobs/{after['id']}").json()["state"] == "succeeded",
                   60, "a job submitted after the failover")
