"""One WebSocket for many jobs: WS /v1/jobs/stream submits jobs and streams all their events.

A client that runs many jobs keeps one socket open instead of a POST and a socket per job.
Client frames are JSON text, told apart by `type`:

    {"type": "submit", "request_id": "r1", ...POST /v1/generate's fields}
    {"type": "resume", "job_id": "...", "after": 12}     follow a job again after event 12
    {"type": "cancel", "job_id": "..."}

A submit frame may carry an `idempotency_key`, as the Idempotency-Key header of a POST. The
server answers `submitted` (request_id, job_id, model), `resumed` (job_id, after) and
`cancel_requested` (job_id), and sends every event of each job it follows as the job's own
stream does (GET /v1/jobs/<id>/stream), tagged with its `job_id`, until its done or error.
Events of different jobs interleave; each job's come in order. A frame the server cannot act on
gets an error frame naming its request_id or job_id ({"type": "error", "request_id": ...,
"error": {...}}: a frame's error has no `seq`, a job's error event has one), and the socket
stays open for the other jobs.

Auth and ownership are the job stream's: the handshake's key (api/auth.py), and another key's
job does not exist. Frames are handled in turn; each followed job is relayed by a thread of its
own, which under gunicorn's gevent workers is a greenlet parked on the job's feed, not an OS
thread.
"""
from __future__ import annotations

import json
import logging
import threading
from typing import Annotated, Any, Literal

from flask import Blueprint, g
from pydantic import Field, StringConstraints, TypeAdapter
from simple_websocket import ConnectionClosed

from api.admission import idempotency_key
from api.auth import principal, require_api_key
from api.chat import LockedSocket
from api.errors import APIError, as_api_error
from api.extensions import sock
from api.metrics import OPEN_STREAMS, count_admission
from api.schemas import GenerateRequest, ResourceId, StrictModel, parse_frame
from api.services import Services, services
from tasks.jobs.contract import is_terminal

logger = logging.getLogger(__name__)
bp = Blueprint("job_socket", __name__, url_prefix="/v1")
bp.before_request(require_api_key)

MAX_FOLLOWED_JOBS = 256  # jobs one socket follows at once: each is a subscription and a greenlet
SUBMIT_ROUTE = "WS /v1/jobs/stream submit"  # what a submit frame's idempotency key is bound to
FRAME_TYPES = ("submit", "resume", "cancel")


class SubmitFrame(GenerateRequest):
    """Queue a job, as POST /v1/generate does; the answer, and any error, name `request_id`."""

    type: Literal["submit"]
    request_id: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    idempotency_key: str | None = None  # as POST's Idempotency-Key header

    def body(self) -> bytes:
        """The generation request alone, what an idempotency key is bound to."""
        fields = self.model_dump(mode="json", exclude={"type", "request_id", "idempotency_key"})
        return json.dumps(fields, sort_keys=True).encode()


class ResumeFrame(StrictModel):
    """Follow a job (again) from after event `after`, e.g. on a new socket after a reconnect."""

    type: Literal["resume"]
    job_id: ResourceId
    after: int = Field(0, ge=0)


class CancelFrame(StrictModel):
    """Stop a job; it ends with finish_reason `cancelled`."""

    type: Literal["cancel"]
    job_id: ResourceId


Frame = SubmitFrame | ResumeFrame | CancelFrame
_FRAME = TypeAdapter(Annotated[Frame, Field(discriminator="type")])


@sock.route("/jobs/stream", bp=bp)
def job_socket(ws):
    """Take job frames from the client; stream the events of every job it follows."""
    JobSocket(ws, services()).run()


class JobSocket:
    """One client's socket: its frames, handled in turn, and a relay per job it follows."""

    def __init__(self, ws, svc: Services):
        # A submit frame may carry what a POST body may; other sockets keep the smaller limit.
        ws.max_message_size = svc.settings.max_request_bytes
        self.ws, self.out, self.svc, self.who = ws, LockedSocket(ws), svc, principal()
        self.followed: dict[str, threading.Thread] = {}  # job id -> its relay

    def run(self) -> None:
        """Handle frames until the client leaves; its jobs go on without it."""
        try:
            while True:
                self.handle(self.ws.receive())
        except ConnectionClosed:
            logger.debug("job socket client left, following %d jobs", len(self.followed))

    def handle(self, raw: str | bytes) -> None:
        """Act on one frame; a failure becomes an error frame, and the socket goes on."""
        frame = None
        try:
            frame = parse_frame(_FRAME, FRAME_TYPES, raw, self.svc.settings.max_request_bytes)
            self.dispatch(frame)
        except ConnectionClosed:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is answered in the envelope
            tags = tags_of(frame) if frame is not None else tags_in(raw)
            self.send_error(as_api_error(exc), tags)

    def dispatch(self, frame: Frame) -> None:
        if isinstance(frame, SubmitFrame):
            self.submit(frame)
        elif isinstance(frame, ResumeFrame):
            self.resume(frame)
        else:
            self.svc.store.cancel(self.svc.visible_job(self.who, frame.job_id))
            self.send({"type": "cancel_requested", "job_id": frame.job_id})

    @count_admission
    def submit(self, frame: SubmitFrame) -> None:
        """Queue the job as POST /v1/generate does, then follow it from its first event. A
        repeated idempotency key answers with the job it first created."""
        g.pop("dawet_job_admitted", None)  # one request context serves every frame
        self._make_room()
        key = idempotency_key(frame.idempotency_key, SUBMIT_ROUTE, frame.body())
        job = self.svc.submit_generation(self.who, frame, idempotency=key)
        self.send({"type": "submitted", "request_id": frame.request_id, "job_id": job.id,
                   "model": job.model})
        if job.id not in self.followed:  # a replayed key may name a job followed here already
            self.follow(job.id, 0)

    def resume(self, frame: ResumeFrame) -> None:
        """Follow one of the key's jobs from after event `after`."""
        if frame.job_id in self.followed:
            raise APIError(409, f"job {frame.job_id!r} is already followed on this socket",
                           "job_already_followed", param="job_id")
        self._make_room()
        self.svc.visible_job(self.who, frame.job_id)
        self.send({"type": "resumed", "job_id": frame.job_id, "after": frame.after})
        self.follow(frame.job_id, frame.after)

    def _make_room(self) -> None:
        if len(self.followed) >= MAX_FOLLOWED_JOBS:
            raise APIError(429, f"this socket follows {MAX_FOLLOWED_JOBS} jobs already; wait "
                           "for one to end", "too_many_jobs", "rate_limit_error")

    def follow(self, job_id: str, after: int) -> None:
        relay = threading.Thread(target=self._relay, args=(job_id, after),
                                 name=f"job-socket-{job_id}", daemon=True)
        self.followed[job_id] = relay
        relay.start()

    def _relay(self, job_id: str, after: int) -> None:
        try:
            self._send_events(job_id, after)
        except ConnectionClosed:
            logger.debug("job socket client left during job %s", job_id)
        finally:
            self.followed.pop(job_id, None)

    def _send_events(self, job_id: str, after: int) -> None:
        """Send the job's events until its end; a failure (say, Redis lost for good) ends its
        relay with an error frame naming it."""
        try:
            with OPEN_STREAMS.labels("websocket").track_inprogress():
                for event in self.svc.events(job_id, after):
                    if is_terminal(event):  # unfollowed first: a resume after it is welcome
                        self.followed.pop(job_id, None)
                    self.send({"job_id": job_id, **event})
        except ConnectionClosed:
            raise
        except Exception as exc:  # noqa: BLE001 - reported to the client, the socket goes on
            self.send_error(as_api_error(exc), {"job_id": job_id})

    def send(self, frame: dict[str, Any]) -> None:
        self.out.send(json.dumps(frame))

    def send_error(self, error: APIError, tags: dict[str, str]) -> None:
        self.send({"type": "error", **tags, **error.body.envelope()})


def tags_of(frame: Frame) -> dict[str, str]:
    """What a frame's error frame names: its request_id, or its job_id."""
    if isinstance(frame, SubmitFrame):
        return {"request_id": frame.request_id}
    return {"job_id": frame.job_id}


def tags_in(raw: str | bytes) -> dict[str, str]:
    """The request_id and job_id a frame that failed validation names, if it is a JSON object
    and they are strings."""
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    return {name: data[name] for name in ("request_id", "job_id")
            if isinstance(data.get(name), str)}
