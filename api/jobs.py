"""The job API: submit a generation, read or cancel it, stream its events over a WebSocket."""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, request, url_for
from simple_websocket import ConnectionClosed

from api.admission import request_idempotency_key
from api.auth import principal, require_api_key
from api.errors import APIError
from api.extensions import sock
from api.keys import Principal
from api.metrics import OPEN_STREAMS, count_admission
from api.schemas import GenerateRequest
from api.services import Services, services
from tasks.jobs.contract import JobView

logger = logging.getLogger(__name__)
bp = Blueprint("jobs", __name__, url_prefix="/v1")
bp.before_request(require_api_key)


@bp.post("/generate")
@count_admission
def create_generation():
    """Validate a generation request and queue it as a job."""
    body = GenerateRequest.model_validate_json(request.get_data())
    job = services().submit_generation(principal(), body, idempotency=request_idempotency_key())
    status_url = url_for("jobs.get_job", job_id=job.id, _external=True)
    stream_url = url_for("jobs.stream_job", job_id=job.id, _external=True)
    return {"id": job.id, "model": job.model, "status": "queued", "status_url": status_url,
            "stream_url": stream_url.replace("http", "ws", 1)}, 202


@bp.get("/jobs/<job_id>")
def get_job(job_id: str):
    """Return a job's state and its text so far (or final text), usage and timings."""
    svc = services()
    events = svc.store.read(svc.visible_job(principal(), job_id))
    view = JobView(job_id)
    for event in events:
        view.apply(event)
    return view.to_dict()


@bp.delete("/jobs/<job_id>")
def cancel_job(job_id: str):
    """Ask the job's worker to stop it; it ends with finish_reason `cancelled`."""
    svc = services()
    svc.store.cancel(svc.visible_job(principal(), job_id))
    return {"id": job_id, "cancel_requested": True}, 202


@sock.route("/jobs/<job_id>/stream", bp=bp)
def stream_job(ws, job_id: str):
    """Send the job's events after `?after=<seq>` as JSON frames; close after done or error."""
    try:
        after = _after_param()
        events = visible_events(services(), principal(), job_id, after)
        with OPEN_STREAMS.labels("websocket").track_inprogress():
            for event in events:
                ws.send(json.dumps(event))
    except APIError as exc:
        ws.send(json.dumps({"type": "error", **exc.body.envelope()}))
    except ConnectionClosed:
        logger.debug("client left the stream of job %s", job_id)


def visible_events(svc: Services, who: Principal, job_id: str,
                   after: int) -> Iterator[dict[str, Any]]:
    """The job's events after `after` (Services.events), if `who` may see the job, else a 404
    APIError. The job's channel is subscribed before its owner is read, so Redis confirms the
    subscription meanwhile, and following the job starts without waiting for that: one round
    trip less before a fresh stream's first event."""
    with svc.feed.subscription(job_id):
        svc.visible_job(who, job_id)
        events = svc.events(job_id, after)
        first = next(events, None)  # following now, on the confirmed subscription
    if first is not None:
        yield first
        yield from events


def relay_events(ws, job_id: str, after: int) -> None:
    for event in services().events(job_id, after):
        ws.send(json.dumps(event))


def _after_param() -> int:
    raw = request.args.get("after", "0")
    if not raw.isdigit():
        raise APIError(400, "after must be a non-negative integer sequence number",
                       "invalid_request_error", param="after")
    return int(raw)
