"""The job contract between the API and workers: jobs, parameters, typed events, errors.

Plain data only (no torch, no Redis): the API imports this module.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class JobState(str, Enum):
    QUEUED = "queued"
    STARTED = "started"
    RESTARTED = "restarted"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


class FinishReason(str, Enum):
    STOP = "stop"  # the model emitted an end-of-sequence token
    LENGTH = "length"  # max_new_tokens reached
    STOP_SEQUENCE = "stop_sequence"  # a requested stop string appeared
    CANCELLED = "cancelled"


MAX_TOP_LOGPROBS = 20  # the most alternatives a token's log-probability may list (OpenAI's)


class LoraAdapter(BaseModel):
    """A LoRA adapter a request runs with, over the base weights of the model `base` (whose
    workers serve it): vLLM's LoRARequest, by name and path. The worker's engine loads it on
    first use."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    path: str
    base: str


class SamplingParams(BaseModel):
    """Resolved generation parameters: request values over the model's defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(ge=1)
    min_new_tokens: int = Field(0, ge=0)
    temperature: float = Field(ge=0.0, le=2.0)  # 0 means greedy
    top_p: float = Field(gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # 0 disables top-k
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # The reply is compact JSON that this JSON Schema (its JSON text) accepts; None: free text.
    # The engine compiles it (tasks/engine/structured.py); the grammar decides the reply's end.
    json_schema: str | None = None
    # The reply tokens an earlier attempt wrote (tasks/worker/runner.py): the grammar resumes
    # after them.
    json_written_ids: tuple[int, ...] = ()
    # Report each reply token's log-probability with this many likeliest alternatives; None:
    # report none.
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # The LoRA adapter applied to this request only, its batch sharing the base; None: none.
    lora: LoraAdapter | None = None


class Lane(str, Enum):
    """The broker priority a job's message takes (tasks/worker/app.py)."""

    INTERACTIVE = "interactive"  # served first
    BATCH = "batch"  # a batch line: a worker takes it only when no interactive job waits


class Charge(BaseModel):
    """What a job's admission held against its key's daily budget (tasks/jobs/usage.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    day: int  # days since the epoch (UTC) whose usage the job counts in
    held: int  # tokens: prompt + max new tokens


class Job(BaseModel):
    """What a worker needs to run a generation; travels as the Celery task argument."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    model: str
    prompt_token_ids: list[int]
    params: SamplingParams
    created_at: float = Field(default_factory=time.time)
    deadline_at: float | None = None  # unix time; a job not started by then expires
    owner: str | None = None  # the name of the API key that created it
    charge: Charge | None = None  # None: its usage is not counted
    lane: Lane = Lane.INTERACTIVE

    def expired(self, now: float) -> bool:
        """Whether the job's start deadline has passed."""
        return self.deadline_at is not None and now > self.deadline_at


@dataclass(frozen=True)
class ErrorBody:
    """The one error envelope, for HTTP responses and stream error frames alike."""

    message: str
    type: str
    code: str
    param: str | None = None

    def envelope(self) -> dict[str, Any]:
        return {"error": asdict(self)}


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total_tokens": self.total_tokens}


@dataclass(frozen=True)
class StatusEvent:
    state: JobState
    worker: str | None = None
    # A restarted job's reply goes on after the token events up to this sequence number.
    resumes_after: int | None = None
    type: str = field(default="status", init=False)

    def to_dict(self) -> dict[str, Any]:
        data = {"type": self.type, "state": self.state.value}
        data |= {"worker": self.worker} if self.worker else {}
        return data | ({"resumes_after": self.resumes_after}
                       if self.resumes_after is not None else {})


@dataclass(frozen=True)
class TokenLogprob:
    """A reply token's log-probability, and the likeliest tokens in its place, best first.

    `token` is the token's text as the reply spells it (the tokens of a reply join into its
    text); the alternatives' texts are each token decoded alone."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"token": self.token, "logprob": self.logprob,
                "top_logprobs": [{"token": text, "logprob": lp} for text, lp in self.top]}


@dataclass(frozen=True)
class TokenEvent:
    text: str
    # The token ids generated since the previous token event, the text of some of which may
    # still be held back (a possible stop sequence, an incomplete character): a new attempt
    # continues the reply from exactly these (tasks/worker/runner.py).
    ids: tuple[int, ...] = ()
    # The log-probabilities of the tokens whose text ends in this event, when the job asked
    # for them; a token held back by a stop sequence is never reported.
    logprobs: tuple[TokenLogprob, ...] | None = None
    type: str = field(default="token", init=False)

    def to_dict(self) -> dict[str, Any]:
        data = {"type": self.type, "text": self.text, "ids": list(self.ids)}
        if self.logprobs is not None:
            data["logprobs"] = [entry.to_dict() for entry in self.logprobs]
        return data


@dataclass(frozen=True)
class DoneEvent:
    finish_reason: FinishReason
    usage: Usage
    timings: dict[str, float]
    type: str = field(default="done", init=False)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "finish_reason": self.finish_reason.value,
                "usage": self.usage.to_dict(), "timings": self.timings}


@dataclass(frozen=True)
class ErrorEvent:
    error: ErrorBody
    type: str = field(default="error", init=False)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **self.error.envelope()}


DEADLINE_EXCEEDED = "deadline_exceeded"  # the error code of a job that expired unstarted
WORKER_LOST = "worker_lost"  # the error code of a job that lost its worker max_attempts times
INVALID_SCHEMA = "invalid_schema"  # the error code of a JSON Schema no engine can enforce

Event = StatusEvent | TokenEvent | DoneEvent | ErrorEvent
TERMINAL_TYPES = frozenset({"done", "error"})


def is_terminal(event: dict[str, Any]) -> bool:
    """Whether an event (as JSON data) ends its job's stream."""
    return event["type"] in TERMINAL_TYPES


@dataclass
class JobView:
    """A job's state folded from its event log, as GET /v1/jobs/<id> shows it."""

    id: str
    state: JobState = JobState.QUEUED
    text: str = ""
    last_seq: int = 0
    worker: str | None = None
    finish_reason: str | None = None
    usage: dict | None = None
    timings: dict | None = None
    error: dict | None = None

    def apply(self, event: dict[str, Any]) -> None:
        """Fold one event into the view."""
        self.last_seq = event["seq"]
        kind = event["type"]
        if kind == "status":
            self.state = JobState(event["state"])
            self.worker = event.get("worker", self.worker)
        elif kind == "token":
            self.text += event["text"]
        elif kind == "done":
            self._finish(event)
        elif kind == "error":
            expired = event["error"]["code"] == DEADLINE_EXCEEDED
            self.state = JobState.EXPIRED if expired else JobState.FAILED
            self.error = event["error"]

    def _finish(self, event: dict[str, Any]) -> None:
        self.finish_reason = event["finish_reason"]
        cancelled = self.finish_reason == FinishReason.CANCELLED.value
        self.state = JobState.CANCELLED if cancelled else JobState.SUCCEEDED
        self.usage, self.timings = event["usage"], event["timings"]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = self.state.value
        return data
