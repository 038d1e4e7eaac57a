"""Stored responses (OpenAI's Responses API): one JSON record per response in Redis.

A record holds what its request asked (the whole input the model read, the instructions and
settings) and the job that answers it; the reply itself is the job's event log. Once the job
has ended, the first reader copies the job's final view into the record (settles it), so a
stored response, and a chain of them through previous_response_id, outlives the job's log.
The record is `dawet:resp:{id}`; it expires `response_ttl_seconds` after its creation.
"""
from __future__ import annotations

import uuid
from dataclasses import asdict

import redis
from pydantic import BaseModel

from tasks.jobs.contract import ErrorBody, JobState, JobView
from tasks.jobs.log import JobStore

RESPONSE_PREFIX, MESSAGE_PREFIX = "resp_", "msg_"
LOG_EXPIRED = ErrorBody("the job log of this response expired before its reply was saved",
                        "server_error", "response_expired")


def new_message_id() -> str:
    return MESSAGE_PREFIX + uuid.uuid4().hex


class InputItem(BaseModel):
    """One message of a response's input."""

    id: str
    role: str  # user, assistant, system or developer, as the request gave it
    text: str


class ResponseRecord(BaseModel):
    """A stored response: its request, its job, and the job's final view once it ended."""

    id: str
    job_id: str
    owner: str | None = None  # the name of the API key that created it
    model: str
    created_at: float
    input: list[InputItem]  # a chain's earlier turns, then this request's input
    instructions: str | None = None
    previous_response_id: str | None = None
    background: bool = False
    store: bool = True
    metadata: dict[str, str] = {}
    max_output_tokens: int  # the job's parameters, as the response shows them
    temperature: float
    top_p: float
    outcome: dict | None = None  # JobView.to_dict() of the ended job, once settled

    @property
    def message_id(self) -> str:
        """The id of the output message."""
        return MESSAGE_PREFIX + self.job_id


def ended(view: JobView) -> bool:
    """Whether the viewed job has ended (done or error)."""
    return view.finish_reason is not None or view.error is not None


def fold(job_id: str, events: list[dict]) -> JobView:
    """A job's view from its events."""
    view = JobView(job_id)
    for event in events:
        view.apply(event)
    return view


class ResponseStore:
    """Response records as JSON values with a TTL, replies read from their jobs' logs."""

    def __init__(self, client: redis.Redis, jobs: JobStore, ttl_seconds: int):
        self.redis, self.jobs, self.ttl = client, jobs, ttl_seconds

    def save(self, record: ResponseRecord) -> None:
        self.redis.set(_key(record.id), record.model_dump_json(), ex=self.ttl)

    def load(self, response_id: str) -> ResponseRecord | None:
        raw = self.redis.get(_key(response_id))
        return ResponseRecord.model_validate_json(raw) if raw else None

    def delete(self, response_id: str) -> bool:
        return bool(self.redis.delete(_key(response_id)))

    def view(self, record: ResponseRecord) -> JobView:
        """The job's view: the settled one, else folded from its log (and settled if the job
        ended). A log gone before anyone settled it reads as a failure."""
        if record.outcome is not None:
            return JobView(**{**record.outcome, "state": JobState(record.outcome["state"])})
        events = self.jobs.read_existing(record.job_id)
        if events is None:
            return JobView(record.job_id, JobState.EXPIRED, error=asdict(LOG_EXPIRED))
        view = fold(record.job_id, events)
        self.settle(record, view)
        return view

    def settle(self, record: ResponseRecord, view: JobView) -> None:
        """Keep an ended job's view in its record, if the record is still stored (a response
        deleted meanwhile stays deleted)."""
        if record.outcome is not None or not record.store or not ended(view):
            return
        record.outcome = view.to_dict()
        self.redis.set(_key(record.id), record.model_dump_json(), xx=True, keepttl=True)


def _key(response_id: str) -> str:
    return f"dawet:resp:{{{response_id}}}"
