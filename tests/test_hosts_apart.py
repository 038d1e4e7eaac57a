"""Hosts that fail apart: Redis, the API and two workers, each on a host of its own (network
namespaces joined by a bridge, tests/topology.py); the test runs on the gateway.

A worker host is killed outright (SIGKILL to every process in its namespace), or cut off (its
link down) for longer than a lease and then healed, while it generates a job. The job goes on
on the other worker from where its log stops: contiguous sequence numbers, one `done`, the text
of an unfaulted greedy run, the attempts and fence of one restart. The healed worker's writes
reach Redis and the fenced log refuses them. The partition runs with Redis and with RabbitMQ as
the broker (the job store stays on Redis). Every address comes from Dawet's settings.
"""
from __future__ import annotations

import json
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import redis
import websocket

from conftest import (DEMO_MODEL, MODELS_FILE, _require_demo_model, fresh_log_dir, submit,
                      token_text, wait_until)
from dawet.processes import (Child, api_argv, find_redis_server, http_ok, redis_argv,
                             worker_argv)
from dawet.processes import wait_until as wait_for_children
from dawet.settings import Settings, child_env, settings_env
from model_store.registry import load_registry
from tasks.jobs.log import JobStore
from tasks.jobs.workers import WorkerRegistry
from topology import Relay, Topology, unavailable

WORKERS = ("w1", "w2")
ROLES = ["redis", "api", *WORKERS]
# Each host has its own ports: every service keeps its usual one.
REDIS_PORT, API_PORT, METRICS_PORT = 6379, 8000, 9300
TOKENS = 500  # long enough that a fault after the first token lands mid-generation
LONG = {"prompt": "Once upon a time", "min_new_tokens": TOKENS, "max_new_tokens": TOKENS,
        "temperature": 0.0}
LEASE_SECONDS = 3.0
READY_SECONDS = 180  # two models loading on a loaded 2-CPU host
END_SECONDS = 180  # the longest a job may take to end, or a stale attempt to be refused
RESTARTED_ONCE = ["queued", "started", "restarted", "started"]
# Workers beat under the model they load: the demo adapter's base.
SERVED_BY = load_registry(MODELS_FILE, DEMO_MODEL).get(DEMO_MODEL).served_by

ON_REDIS = pytest.mark.parametrize("cluster", ["redis"], indirect=True)
ON_EACH_BROKER = pytest.mark.parametrize("cluster", ["redis", "rabbitmq"], indirect=True)


class Cluster:
    """Dawet on a topology: Redis, the API and one worker on each worker host."""

    def __init__(self, topology: Topology, settings: Settings, log_dir):
        self.topology, self.settings, self.log_dir = topology, settings, log_dir
        self.children: dict[str, Child] = {}
        self.redis = redis.Redis.from_url(settings.redis_url, decode_responses=True,
                                          socket_timeout=10)
        self.store = JobStore(self.redis, settings.job_ttl_seconds)

    @property
    def api_url(self) -> str:
        return f"http://{self.settings.api_host}:{self.settings.api_port}"

    def start(self, redis_password: str, data_dir: str) -> None:
        host = self.topology["redis"]
        self._start("redis", redis_argv(find_redis_server(), REDIS_PORT, data_dir,
                                        bind=host.address) + ["--requirepass", redis_password])
        self._wait(self._redis_answers, "Redis to answer across the bridge")
        for role in WORKERS:
            self.start_worker(role)
        self._start("api", api_argv(self.settings))
        self.ensure_workers()
        self._wait(lambda: http_ok(self.api_url + "/readyz"), "the API to report ready")

    def stop(self) -> None:
        """Kill every host's processes, then reap the ones this test started."""
        for host in self.topology.hosts.values():
            host.kill_all()
        for child in self.children.values():
            child.process.wait()

    def start_worker(self, role: str) -> None:
        """(Re)start the worker of a worker host; its metrics listen on the host's address."""
        settings = self.settings.model_copy(
            update={"worker_metrics_host": self.topology[role].address})
        self._start(role, worker_argv(DEMO_MODEL, None, settings.worker_concurrency,
                                      f"{role}-{DEMO_MODEL}@%h", settings.log_level), settings)

    def ensure_workers(self) -> None:
        """Restart the worker of a host that was killed; wait until both workers beat."""
        for role in WORKERS:
            if not self.children[role].alive():
                self.start_worker(role)
        self._wait(lambda: self.live_workers() == set(WORKERS), "both workers to beat")

    def live_workers(self) -> set[str]:
        return {role_of(record["worker"])
                for record in WorkerRegistry(self.redis, 1.0).live(SERVED_BY)}

    def events(self, job_id: str) -> list[dict]:
        """The job's event log, as Redis holds it."""
        return self.store.read(job_id)

    def job_hash(self, job_id: str) -> dict[str, str]:
        return self.redis.hgetall(f"dawet:job:{{{job_id}}}")  # tasks/jobs/log.py's key

    def _start(self, role: str, argv: list[str], settings: Settings | None = None) -> Child:
        env = child_env(settings_env(settings or self.settings))
        child = self.topology[role].child(role, argv, env, self.log_dir / f"{role}.log")
        child.start()
        self.children[role] = child
        return child

    def _wait(self, check, what: str) -> None:
        wait_for_children(check, READY_SECONDS, what, list(self.children.values()))

    def _redis_answers(self) -> bool:
        try:
            return self.redis.ping()
        except redis.RedisError:
            return False


def role_of(worker: str) -> str:
    """The host a worker's name ("w1-dawet-demo@machine") says it runs on."""
    return worker.split("-", 1)[0]


def cluster_settings(topology: Topology, redis_password: str, broker_url: str | None,
                     files_dir) -> Settings:
    """Every address is a host's: nothing is on 127.0.0.1. Short leases, small batches."""
    redis_url = f"redis://:{redis_password}@{topology['redis'].address}:{REDIS_PORT}/0"
    return Settings(redis_url=redis_url, broker_url=broker_url, models_file=MODELS_FILE,
                    default_model=DEMO_MODEL, api_host=topology["api"].address,
                    api_port=API_PORT, api_workers=1, worker_concurrency=2, torch_threads=1,
                    heartbeat_seconds=0.5, lease_seconds=LEASE_SECONDS,
                    lease_refresh_seconds=0.3, worker_metrics_port=METRICS_PORT,
                    files_dir=files_dir)


def rabbitmq_missing() -> str | None:
    """Why the root namespace's RabbitMQ cannot be used (a skip reason), or None."""
    if shutil.which("rabbitmqctl") is None:
        return "rabbitmqctl is not installed"
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 5672)) != 0:
            return "no RabbitMQ on 127.0.0.1:5672"
    return None


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@contextmanager
def rabbitmq_broker(topology: Topology) -> Iterator[str]:
    """The root namespace's RabbitMQ as the hosts reach it: a vhost of this run's own (no other
    test's queues), through a relay at the gateway address, since RabbitMQ listens on loopback
    only and its guest user may log in from loopback only. Its broker URL."""
    vhost = f"dawet-hosts-{topology.tag}"
    rabbitmqctl("add_vhost", vhost)
    relay = None
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        relay = Relay((topology.gateway, 0), ("127.0.0.1", 5672))
        yield f"amqp://guest:guest@{topology.gateway}:{relay.address[1]}/{vhost}"
    finally:
        if relay is not None:
            relay.close()
        rabbitmqctl("delete_vhost", vhost)  # its queues and permissions go with it


@contextmanager
def broker_for(kind: str, topology: Topology) -> Iterator[str | None]:
    """The broker URL for `kind`: None (Redis, the job store's) or RabbitMQ's."""
    if kind == "redis":
        yield None
    else:
        with rabbitmq_broker(topology) as url:
            yield url


@pytest.fixture(scope="module")
def cluster(request, tmp_path_factory) -> Iterator[Cluster]:
    """Redis, the API and two workers on four hosts, with `request.param` as the broker."""
    reason = unavailable() or (rabbitmq_missing() if request.param == "rabbitmq" else None)
    if reason:
        pytest.skip(reason)
    _require_demo_model()
    password = secrets.token_hex(16)
    with Topology(ROLES) as topology, broker_for(request.param, topology) as broker_url:
        settings = cluster_settings(topology, password, broker_url,
                                    tmp_path_factory.mktemp("files"))
        running = Cluster(topology, settings, fresh_log_dir(f"logs-hosts-{request.param}"))
        try:
            running.start(password, str(tmp_path_factory.mktemp("redis")))
            yield running
        finally:
            running.stop()


@pytest.fixture(scope="module")
def reference(cluster: Cluster) -> str:
    """LONG's reply when nothing fails (greedy: the same every time)."""
    with httpx.Client(base_url=cluster.api_url, timeout=30) as api:
        job = submit(api, **LONG)
    ws, events = open_stream(job)
    return token_text(read_to_end(ws, events))


@pytest.fixture()
def api(cluster: Cluster) -> Iterator[httpx.Client]:
    cluster.ensure_workers()  # a test before may have killed a worker host
    with httpx.Client(base_url=cluster.api_url, timeout=30) as client:
        yield client


def open_stream(job: dict) -> tuple[websocket.WebSocket, list[dict]]:
    """The job's stream (from the API host), read until its first token."""
    ws = websocket.create_connection(job["stream_url"], timeout=END_SECONDS)
    events = [json.loads(ws.recv())]
    while events[-1]["type"] != "token":
        events.append(json.loads(ws.recv()))
    return ws, events


def read_to_end(ws: websocket.WebSocket, events: list[dict]) -> list[dict]:
    while events[-1]["type"] not in ("done", "error"):
        events.append(json.loads(ws.recv()))
    ws.close()
    return events


def running_job(api: httpx.Client) -> tuple[dict, websocket.WebSocket, list[dict], str]:
    """A LONG job that has streamed its first token: (job, its stream, the events so far, the
    role of the worker host running it)."""
    job = submit(api, **LONG)
    ws, events = open_stream(job)
    worker = next(e["worker"] for e in events if e.get("state") == "started")
    return job, ws, events, role_of(worker)


def starts(events: list[dict]) -> list[str]:
    """The roles of the worker hosts that started the job, in order."""
    return [role_of(e["worker"]) for e in events if e.get("state") == "started"]


def assert_restarted_once(cluster: Cluster, job_id: str, streamed: list[dict], reference: str,
                          lost: str) -> None:
    """The job's log holds one reply, continued on the other host after `lost` lost it: the
    client saw the log as it is, nothing lost or written twice, one `done`, two attempts."""
    events = cluster.events(job_id)
    assert events == streamed, "the log changed after the job ended, or the stream missed some"
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert [e["state"] for e in events if e["type"] == "status"] == RESTARTED_ONCE
    assert starts(events) == [lost, next(w for w in WORKERS if w != lost)]
    restarted = next(e for e in events if e.get("state") == "restarted")
    assert events[restarted["seq"] - 2]["type"] == "token", "the fault landed mid-generation"
    assert restarted["resumes_after"] == restarted["seq"] - 1
    assert [e["type"] for e in events].count("done") == 1 and events[-1]["type"] == "done"
    tokens = [e for e in events if e["type"] == "token"]
    assert token_text(tokens) == reference
    assert sum(len(e["ids"]) for e in tokens) == TOKENS  # each token written once
    assert events[-1]["usage"]["completion_tokens"] == TOKENS
    job = cluster.job_hash(job_id)
    # Claim (fence 1), reap (2: the dead attempt fenced out), the other host's claim (3).
    assert (job["attempts"], job["fence"], job["ended"]) == ("2", "3", "1")


SCRAPE = ("import sys, urllib.request; "
          "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())")


@ON_REDIS
def test_each_workers_metrics_are_scraped_from_the_api_host(cluster, api):
    for role in WORKERS:
        url = f"http://{cluster.topology[role].address}:{METRICS_PORT}/metrics"
        scraped = cluster.topology["api"].run([sys.executable, "-c", SCRAPE, url])
        assert scraped.returncode == 0, scraped.stderr
        up = rf'^dawet_worker_up\{{[^}}]*worker="{role}-{DEMO_MODEL}@[^"]*"[^}}]*\}} 1\.0$'
        assert re.search(up, scraped.stdout, re.MULTILINE), scraped.stdout[-2000:]


@ON_EACH_BROKER
def test_a_worker_host_cut_off_past_its_lease_writes_nothing_once_healed(cluster, api,
                                                                        reference):
    job, ws, events, victim = running_job(api)
    host = cluster.topology[victim]
    host.cut()
    cut_at = time.monotonic()
    try:  # the other host's reaper moves the job on; it starts there
        wait_until(lambda: len(starts(cluster.events(job["id"]))) == 2, END_SECONDS,
                   "the job to start on the other host", interval=0.05)
        # The lease lapsed counted from the victim's last renewal, which came up to a refresh
        # interval before the cut (more on a loaded host): the job can move on a little sooner
        # than a lease after the cut. Stay cut until a whole lease has passed since it.
        time.sleep(max(0.0, cut_at + LEASE_SECONDS - time.monotonic()) + 0.1)
    finally:
        host.heal()
    assert time.monotonic() - cut_at > LEASE_SECONDS
    events = read_to_end(ws, events)

    # The healed worker's attempt wakes: its pending writes reach Redis and are refused.
    worker = cluster.children[victim]
    refused = rf"job {job['id']}: (attempt 1 was fenced out|its log refused attempt 1's end)"
    returned = rf"dawet\.generate\[{job['id']}\] succeeded"
    wait_until(lambda: re.search(refused, worker.log_tail(100_000)), END_SECONDS,
               "the healed worker's stale write to be refused", interval=0.2)
    wait_until(lambda: re.search(returned, worker.log_tail(100_000)), END_SECONDS,
               "the healed worker's stale attempt to end", interval=0.2)
    assert worker.alive(), "the partition must not have killed the worker"
    assert_restarted_once(cluster, job["id"], events, reference, lost=victim)
    wait_until(lambda: victim in cluster.live_workers(), END_SECONDS,
               "the healed worker to beat again", interval=0.2)


@ON_REDIS
def test_a_worker_host_killed_mid_generation_loses_nothing(cluster, api, reference):
    job, ws, events, victim = running_job(api)
    host = cluster.topology[victim]
    assert len(host.pids()) >= 2, "the worker and its engine process run on the host"
    host.kill_all()
    events = read_to_end(ws, events)
    assert_restarted_once(cluster, job["id"], events, reference, lost=victim)
