"""OpenAI's Responses API: POST /v1/responses, GET and DELETE /v1/responses/<id>,
POST /v1/responses/<id>/cancel and GET /v1/responses/<id>/input_items.

A response is a job, submitted like every generation (Services.submit_generation), plus a
stored record (api/response_store.py). Its stream is the job's event log seen through
api/response_events.py, so a stream resumes from any sequence number, and a background
response survives what its job survives (a worker's death, an API restart).
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Response, request

from api.admission import request_idempotency_key
from api.auth import principal, require_api_key
from api.errors import APIError, invalid
from api.keys import Principal
from api.metrics import count_admission, counted_stream
from api.openai import JOB_HEADER, _job_error, cancel_if_abandoned
from api.response_events import ResponseEvents, output_text, response_object, response_status
from api.response_store import (RESPONSE_PREFIX, InputItem, ResponseRecord, ended,
                                new_message_id)
from api.schemas import InputItemsQuery, PromptInput, ResponseQuery, ResponseRequest
from api.services import Services, services
from model_store.registry import ModelSpec
from model_store.tokenizer import Message
from tasks.jobs.contract import ErrorBody, Job, JobState, JobView, SamplingParams, is_terminal

bp = Blueprint("responses", __name__, url_prefix="/v1")
bp.before_request(require_api_key)

CANCEL_WAIT_SECONDS = 5.0  # how long a cancel waits for its job to stop, to answer `cancelled`
CHAT_ROLES = {"developer": "system"}  # chat templates know system, user and assistant


@dataclass(frozen=True)
class ResponseInput:
    """A Responses request as Services.submit_generation takes it: the instructions, then the
    whole input (a chain's earlier turns, then the request's own)."""

    body: ResponseRequest
    items: list[InputItem]

    @property
    def model(self) -> str:
        return self.body.model

    def sampling_params(self, spec: ModelSpec) -> SamplingParams:
        return self.body.sampling_params(spec)

    def prompt_input(self) -> PromptInput:
        """The messages for the chat template; the instructions replace the default system
        prompt."""
        messages = [Message(CHAT_ROLES.get(item.role, item.role), item.text)
                    for item in self.items]
        if self.body.instructions:
            messages.insert(0, Message("system", self.body.instructions))
        return PromptInput("input", messages=tuple(messages))


@bp.post("/responses")
@count_admission
def create_response():
    """Run a response as a job: answer when it ends, stream it, or return at once in the
    background."""
    body = ResponseRequest.model_validate_json(request.get_data())
    svc, who = services(), principal()
    items = _history(svc, who, body.previous_response_id) + [
        InputItem(id=message.id or new_message_id(), role=message.role, text=message.text)
        for message in body.input]
    job = svc.submit_generation(who, ResponseInput(body, items),
                                require_worker=not body.background,
                                idempotency=request_idempotency_key())
    record = _record(job, body, items)
    if body.stored:
        svc.responses.save(record)
    if body.stream:
        return _streamed(svc, record, after=-1, cancel_on_leave=not body.background)
    if body.background:
        return response_object(record, JobView(job.id)), {JOB_HEADER: job.id}
    return _finished(svc, record)


@bp.get("/responses/<response_id>")
def get_response(response_id: str):
    """Return a stored response; with ?stream=true, its events after `starting_after` as SSE."""
    query = ResponseQuery.model_validate(request.args.to_dict())
    svc = services()
    record = _visible(svc, principal(), response_id)
    if not query.stream:
        return response_object(record, svc.responses.view(record))
    if not svc.store.exists(record.job_id):
        raise APIError(404, f"the events of response {response_id!r} have expired; retrieve "
                       "it without stream", "response_not_found", param="stream")
    after = -1 if query.starting_after is None else query.starting_after
    return _streamed(svc, record, after, cancel_on_leave=False)


@bp.post("/responses/<response_id>/cancel")
def cancel_response(response_id: str):
    """Cancel a background response; answer once its job has stopped (or a few seconds on)."""
    svc = services()
    record = _visible(svc, principal(), response_id)
    if not record.background:
        raise invalid("only a background response can be cancelled; a synchronous one stops "
                      "when its client closes the connection", param="response_id")
    view = svc.responses.view(record)
    if not ended(view):
        svc.store.cancel(record.job_id)
        _wait_for_end(svc, record.job_id, CANCEL_WAIT_SECONDS)
        view = svc.responses.view(record)
    elif view.state is not JobState.CANCELLED:  # cancelling twice answers the same
        raise invalid(f"response {response_id!r} has already ended ({response_status(view)}) "
                      "and cannot be cancelled", param="response_id")
    return response_object(record, view)


@bp.delete("/responses/<response_id>")
def delete_response(response_id: str):
    """Delete a stored response, and stop its job if it still runs."""
    svc = services()
    record = _visible(svc, principal(), response_id)
    svc.store.cancel(record.job_id)  # an ended job ignores it
    svc.responses.delete(record.id)
    return {"id": record.id, "object": "response.deleted", "deleted": True}


@bp.get("/responses/<response_id>/input_items")
def list_input_items(response_id: str):
    """List the input the model read (a chain's earlier turns included), a page at a time."""
    query = InputItemsQuery.model_validate(request.args.to_dict())
    record = _visible(services(), principal(), response_id)
    items = record.input if query.order == "asc" else record.input[::-1]
    start = _index_after(items, query.after)
    page = [_input_item(item) for item in items[start:start + query.limit]]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": start + query.limit < len(items)}


def _visible(svc: Services, who: Principal, response_id: str,
             param: str = "response_id") -> ResponseRecord:
    """The stored response, if `who` may see it: another key's is as good as missing."""
    record = svc.responses.load(response_id)
    if record is None or not who.may_see(record.owner):
        raise APIError(404, f"response {response_id!r} does not exist, was not stored, or has "
                       "expired", "response_not_found", param=param)
    return record


def _history(svc: Services, who: Principal, previous_id: str | None) -> list[InputItem]:
    """What a chained response's input follows: the previous response's input and reply (a
    failed or empty reply is left out)."""
    if previous_id is None:
        return []
    previous = _visible(svc, who, previous_id, param="previous_response_id")
    view = svc.responses.view(previous)
    if not ended(view):
        raise invalid(f"response {previous_id!r} is still {response_status(view)}; continue "
                      "from it once it has ended", param="previous_response_id")
    reply = [InputItem(id=previous.message_id, role="assistant", text=view.text)]
    return previous.input + (reply if view.text and view.error is None else [])


def _record(job: Job, body: ResponseRequest, items: list[InputItem]) -> ResponseRecord:
    return ResponseRecord(
        id=RESPONSE_PREFIX + job.id, job_id=job.id, owner=job.owner, model=job.model,
        created_at=job.created_at, input=items, instructions=body.instructions,
        previous_response_id=body.previous_response_id, background=bool(body.background),
        store=body.stored, metadata=body.metadata or {},
        max_output_tokens=job.params.max_new_tokens, temperature=job.params.temperature,
        top_p=job.params.top_p)


def _events(svc: Services, record: ResponseRecord, after: int) -> Iterator[dict[str, Any]]:
    """The response's events after sequence number `after`: its job's log replayed from the
    start (so every event keeps its number), then followed live until the job ends."""
    stream = ResponseEvents(record)
    for job_event in svc.events(record.job_id):
        for event in stream.on(job_event):
            if event["sequence_number"] > after:
                yield event
    svc.responses.settle(record, stream.view)


def _streamed(svc: Services, record: ResponseRecord, after: int,
              cancel_on_leave: bool) -> Response:
    """The events as SSE; when asked, a client that leaves early cancels the job."""
    frames = (f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"
              for event in _events(svc, record, after))
    if cancel_on_leave:
        frames = cancel_if_abandoned(svc, record.job_id, frames)
    headers = {JOB_HEADER: record.job_id, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return Response(counted_stream(frames, "sse"), mimetype="text/event-stream", headers=headers)


def _finished(svc: Services, record: ResponseRecord) -> tuple[dict[str, Any], dict[str, str]]:
    """Wait for the job to end: the final response (failed ones too), or an HTTP error when
    following the job failed."""
    *_, last = _events(svc, record, after=-1)
    if last["type"] == "error":
        svc.store.cancel(record.job_id)  # a timed-out job has no reader left
        raise _job_error(ErrorBody(**last["error"]))
    return last["response"], {JOB_HEADER: record.job_id}


def _wait_for_end(svc: Services, job_id: str, seconds: float) -> None:
    """Block until the job's log ends, woken by its appends, for at most `seconds`."""
    deadline = time.monotonic() + seconds
    with svc.feed.subscription(job_id) as inbox:
        while not _log_ended(svc, job_id):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not inbox.ready.wait(remaining):
                return
            inbox.events_after(0)  # drained: the log itself says whether the job ended


def _log_ended(svc: Services, job_id: str) -> bool:
    last = svc.store.last_event(job_id)
    return last is not None and is_terminal(last)


def _index_after(items: list[InputItem], after: str | None) -> int:
    """Where a page starts: after the item with id `after`, else at the first."""
    if after is None:
        return 0
    ids = [item.id for item in items]
    if after not in ids:
        raise invalid(f"after: the response has no input item {after!r}", param="after")
    return ids.index(after) + 1


def _input_item(item: InputItem) -> dict[str, Any]:
    """An input message as OpenAI lists it; a reply the chain carried is `output_text`."""
    part = (output_text(item.text) if item.role == "assistant"
            else {"type": "input_text", "text": item.text})
    return {"id": item.id, "type": "message", "role": item.role, "status": "completed",
            "content": [part]}
