"""The multiplexed job socket (WS /v1/jobs/stream) on a real stack: several jobs submitted and
streamed on one socket, resume after a reconnect, cancel, bad frames, ownership and
idempotency keys."""
from __future__ import annotations

import hashlib
import json
import uuid
from collections import defaultdict

import httpx
import pytest
import websocket

from conftest import DEMO_MODEL, stream_events, submit, token_text

CHAT = [{"role": "user", "content": "Hello, what should I cook today?"}]
GREEDY = {"temperature": 0.0, "min_new_tokens": 0}
ALICE, BOB = (f"sk-{name}-{uuid.uuid4().hex}" for name in ("alice", "bob"))


def socket_url(base: str, key: str | None = None) -> str:
    url = f"{base.replace('http', 'ws', 1)}/v1/jobs/stream"
    return f"{url}?access_token={key}" if key else url


def job_stream(base: str, job_id: str) -> list[dict]:
    """The job's whole event log, from its own stream."""
    return stream_events(f"{base.replace('http', 'ws', 1)}/v1/jobs/{job_id}/stream")


class JobSocket:
    """A client of the job socket: sends frames, reads frames, sorts them by job."""

    def __init__(self, url: str, **options):
        self.ws = websocket.create_connection(url, timeout=60, **options)
        self.events: dict[str, list[dict]] = defaultdict(list)  # job id -> its events

    def send(self, frame: dict | str) -> None:
        self.ws.send(frame if isinstance(frame, str) else json.dumps(frame))

    def submit(self, request_id: str, **fields) -> None:
        self.send({"type": "submit", "request_id": request_id, **fields})

    def submitted(self, request_id: str, **fields) -> dict:
        """Submit a job; the server's answer (`submitted`, or an error)."""
        self.submit(request_id, **fields)
        return self.recv()

    def read(self) -> dict:
        """The next frame; a job event is kept in `events` too."""
        frame = json.loads(self.ws.recv())
        if "seq" in frame:
            self.events[frame["job_id"]].append(frame)
        return frame

    def recv(self) -> dict:
        """The next frame that is not a job event."""
        while "seq" in (frame := self.read()):
            pass
        return frame

    def reply(self, frame: dict | str) -> dict:
        """Send a frame; the server's answer to it."""
        self.send(frame)
        return self.recv()

    def until_ended(self, job_ids: set[str]) -> None:
        """Read until each of these jobs' events has ended."""
        while not all(self.ended(job_id) for job_id in job_ids):
            frame = self.read()
            assert "seq" in frame, frame

    def ended(self, job_id: str) -> bool:
        return bool(self.events[job_id]) and self.events[job_id][-1]["type"] in ("done", "error")

    def close(self) -> None:
        self.ws.close()


@pytest.fixture()
def sock(stack):
    client = JobSocket(socket_url(stack.api_url))
    yield client
    client.close()


@pytest.fixture(scope="module")
def finished_job(stack) -> str:
    """A job that has ended, to resume in probes."""
    with httpx.Client(base_url=stack.api_url, timeout=30) as api:
        job = submit(api, prompt="Halo", max_new_tokens=4, **GREEDY)
    stream_events(job["stream_url"])
    return job["id"]


def untagged(events: list[dict]) -> list[dict]:
    return [{key: value for key, value in event.items() if key != "job_id"} for event in events]


def test_several_jobs_on_one_socket_stream_whole_and_in_order(stack, sock, api):
    prompts = ["I like to eat", "Saya suka makan", "The train to the city", "Berapa harga"]
    for index, prompt in enumerate(prompts):
        sock.submit(f"r{index}", prompt=prompt, max_new_tokens=24, seed=index, temperature=0.9)
    submitted = {}
    while len(submitted) < len(prompts):
        frame = sock.recv()
        assert frame["type"] == "submitted" and frame["model"] == DEMO_MODEL, frame
        submitted[frame["request_id"]] = frame["job_id"]
    assert sorted(submitted) == [f"r{index}" for index in range(len(prompts))]
    sock.until_ended(set(submitted.values()))
    for job_id in submitted.values():
        events = sock.events[job_id]
        assert all(event["job_id"] == job_id for event in events)
        assert [event["seq"] for event in events] == list(range(1, len(events) + 1))
        assert [event.get("state") for event in events[:2]] == ["queued", "started"]
        assert events[-1]["type"] == "done"
        final = api.get(f"/v1/jobs/{job_id}").json()
        assert final["state"] == "succeeded" and final["last_seq"] == len(events)
        assert final["text"] == token_text(events) != ""
        assert (final["usage"], final["timings"]) == (events[-1]["usage"], events[-1]["timings"])
        assert untagged(events) == job_stream(stack.api_url, job_id)


def test_a_resume_on_a_new_socket_gets_exactly_the_missing_events(stack, api):
    first = JobSocket(socket_url(stack.api_url))
    job_id = first.submitted("long", messages=CHAT, max_new_tokens=200, min_new_tokens=200,
                             temperature=0.0)["job_id"]
    while not any(e["type"] == "token" for e in first.events[job_id]):
        first.read()
    head = first.events[job_id]
    first.close()

    second = JobSocket(socket_url(stack.api_url))
    resumed = second.reply({"type": "resume", "job_id": job_id, "after": head[-1]["seq"]})
    assert resumed == {"type": "resumed", "job_id": job_id, "after": head[-1]["seq"]}
    second.until_ended({job_id})
    second.close()
    events = head + second.events[job_id]
    assert [event["seq"] for event in events] == list(range(1, len(events) + 1))
    assert token_text(events) == api.get(f"/v1/jobs/{job_id}").json()["text"]
    assert untagged(events) == job_stream(stack.api_url, job_id)


def test_cancel_stops_a_running_job(sock, api):
    job_id = sock.submitted("long", messages=CHAT, max_new_tokens=400,
                            min_new_tokens=400)["job_id"]
    while not any(e["type"] == "token" for e in sock.events[job_id]):
        sock.read()
    assert sock.reply({"type": "cancel", "job_id": job_id}) == {"type": "cancel_requested",
                                                                 "job_id": job_id}
    sock.until_ended({job_id})
    done = sock.events[job_id][-1]
    assert done["type"] == "done" and done["finish_reason"] == "cancelled"
    assert done["usage"]["completion_tokens"] < 400
    assert api.get(f"/v1/jobs/{job_id}").json()["state"] == "cancelled"


# (id, frame, code, param, what the error frame names)
BAD_FRAMES = [
    ("not-json", "hello", "invalid_json", None, {}),
    ("not-an-object", "[1, 2]", "invalid_request_error", None, {}),
    ("unknown-type", {"type": "shout", "request_id": "r1"}, "unknown_message_type", "type",
     {"request_id": "r1"}),
    ("no-type", {"job_id": "abc"}, "unknown_message_type", "type", {"job_id": "abc"}),
    ("no-request-id", {"type": "submit", "prompt": "Halo"}, "invalid_request_error",
     "request_id", {}),
    ("number-as-string", {"type": "submit", "request_id": "r2", "prompt": "Halo",
                          "max_new_tokens": "5"}, "invalid_request_error", "max_new_tokens",
     {"request_id": "r2"}),
    ("unknown-field", {"type": "submit", "request_id": "r3", "prompt": "Halo", "temprature": 1},
     "invalid_request_error", "temprature", {"request_id": "r3"}),
    ("prompt-and-messages", {"type": "submit", "request_id": "r4", "prompt": "Halo",
                             "messages": CHAT}, "invalid_request_error", None,
     {"request_id": "r4"}),
    ("above-limit", {"type": "submit", "request_id": "r5", "prompt": "Halo",
                     "max_new_tokens": 513}, "invalid_request_error", "max_new_tokens",
     {"request_id": "r5"}),
    ("unknown-model", {"type": "submit", "request_id": "r6", "prompt": "Halo", "model": "nope"},
     "model_not_found", "model", {"request_id": "r6"}),
    ("longer-than-context", {"type": "submit", "request_id": "r7", "prompt": "saya " * 2100,
                             "max_new_tokens": 4}, "context_length_exceeded", "prompt",
     {"request_id": "r7"}),
    ("resume-unknown-job", {"type": "resume", "job_id": "nope"}, "job_not_found", "job_id",
     {"job_id": "nope"}),
    ("resume-negative-after", {"type": "resume", "job_id": "x", "after": -1},
     "invalid_request_error", "after", {"job_id": "x"}),
    ("cancel-unknown-job", {"type": "cancel", "job_id": "nope"}, "job_not_found", "job_id",
     {"job_id": "nope"}),
]


@pytest.mark.parametrize("frame,code,param,tags", [c[1:] for c in BAD_FRAMES],
                         ids=[c[0] for c in BAD_FRAMES])
def test_a_bad_frame_gets_a_typed_error_and_the_socket_goes_on(sock, finished_job, frame, code,
                                                                param, tags):
    error = sock.reply(frame)
    assert error == {"type": "error", **tags, "error": {**error["error"], "code": code,
                                                         "param": param}}
    assert set(error["error"]) == {"message", "type", "param", "code"}
    assert error["error"]["message"]
    assert sock.reply({"type": "resume", "job_id": finished_job})["type"] == "resumed"
    sock.until_ended({finished_job})


def test_a_job_followed_here_cannot_be_resumed_twice(sock):
    job_id = sock.submitted("r", prompt="Halo", max_new_tokens=48, min_new_tokens=48)["job_id"]
    error = sock.reply({"type": "resume", "job_id": job_id})
    if error["type"] == "error":  # unless the job ended meanwhile (then it is resumed again)
        assert (error["job_id"], error["error"]["code"]) == (job_id, "job_already_followed")
    sock.until_ended({job_id})


def test_an_idempotency_key_returns_the_job_it_first_created(sock):
    key = uuid.uuid4().hex
    first = sock.submitted("a", prompt="Halo", max_new_tokens=4, idempotency_key=key)
    again = sock.submitted("b", prompt="Halo", max_new_tokens=4, idempotency_key=key)
    assert (first["type"], again["type"]) == ("submitted", "submitted")
    assert again["job_id"] == first["job_id"] and again["request_id"] == "b"
    other = sock.submitted("c", prompt="Apa kabar", max_new_tokens=4, idempotency_key=key)
    assert (other["request_id"], other["error"]["code"]) == ("c", "idempotency_key_reused")
    sock.until_ended({first["job_id"]})


def test_the_handshakes_idempotency_key_does_not_bind_its_submissions(stack):
    sock = JobSocket(socket_url(stack.api_url), header=[f"Idempotency-Key: {uuid.uuid4().hex}"])
    jobs = {sock.submitted(str(n), prompt=prompt, max_new_tokens=4)["job_id"]
            for n, prompt in enumerate(["Halo", "Apa kabar"])}
    assert len(jobs) == 2
    sock.until_ended(jobs)
    sock.close()


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture(scope="module")
def keyed_url(stack) -> str:
    """A second API process on the session stack's Redis, with keys for alice and bob."""
    return stack.add_api(api_keys=f"alice={_digest(ALICE)},bob={_digest(BOB)}")


def test_another_keys_job_does_not_exist_on_the_socket(keyed_url):
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(socket_url(keyed_url), timeout=60)
    assert refused.value.status_code == 401
    alice, bob = JobSocket(socket_url(keyed_url, ALICE)), JobSocket(socket_url(keyed_url, BOB))
    job_id = alice.submitted("a", prompt="Halo", max_new_tokens=24, min_new_tokens=24)["job_id"]
    for frame in ({"type": "resume", "job_id": job_id}, {"type": "cancel", "job_id": job_id}):
        error = bob.reply(frame)
        assert (error["type"], error["job_id"], error["error"]["code"]) == (
            "error", job_id, "job_not_found")
    alice.until_ended({job_id})
    assert alice.events[job_id][-1]["finish_reason"] != "cancelled"  # bob's cancel did nothing
    assert bob.events == {}
    alice.close()
    bob.close()
