"""Responses in OpenAI's shapes: the response object, and the stream events made from its job's
event log.

The stream is a pure function of the log: each job event becomes zero or more Responses
events, numbered from 0 in order, so replaying the log gives the same events with the same
sequence numbers. That is how GET /v1/responses/<id>?stream=true&starting_after=N resumes.
"""
from __future__ import annotations

from typing import Any

from api.response_store import ResponseRecord, ended
from tasks.jobs.contract import FinishReason, JobState, JobView

STATUS_OF_STATE = {JobState.QUEUED: "queued", JobState.STARTED: "in_progress",
                   JobState.RESTARTED: "in_progress", JobState.SUCCEEDED: "completed",
                   JobState.CANCELLED: "cancelled", JobState.FAILED: "failed",
                   JobState.EXPIRED: "failed"}
# A stream's last event by the response's status. OpenAI defines no event for a cancelled
# response, so it ends as `response.incomplete`, whose response's status says `cancelled`.
CLOSING_EVENTS = {"completed": "response.completed", "incomplete": "response.incomplete",
                  "cancelled": "response.incomplete"}


def response_status(view: JobView) -> str:
    """The response's status; a reply cut at max_output_tokens is `incomplete`."""
    if view.finish_reason == FinishReason.LENGTH.value:
        return "incomplete"
    return STATUS_OF_STATE[view.state]


def response_object(record: ResponseRecord, view: JobView) -> dict[str, Any]:
    """OpenAI's response object, from the record and its job's view."""
    status = response_status(view)
    has_output = bool(view.text) or view.finish_reason is not None
    return {
        "id": record.id, "object": "response", "created_at": int(record.created_at),
        "status": status, "background": record.background, "model": record.model,
        "output": [output_message(record, view)] if has_output else [],
        "usage": _usage(view.usage), "error": _error(view.error),
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": record.instructions, "max_output_tokens": record.max_output_tokens,
        "previous_response_id": record.previous_response_id, "store": record.store,
        "temperature": record.temperature, "top_p": record.top_p, "metadata": record.metadata,
        "text": {"format": {"type": "text"}}, "truncation": "disabled",
        "tools": [], "tool_choice": "none", "parallel_tool_calls": False,
    }


def output_message(record: ResponseRecord, view: JobView) -> dict[str, Any]:
    """The reply as an assistant message: `in_progress` until the job ends."""
    if not ended(view):
        status = "in_progress"
    else:
        status = "completed" if response_status(view) == "completed" else "incomplete"
    return {"id": record.message_id, "type": "message", "role": "assistant", "status": status,
            "content": [output_text(view.text)]}


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": []}


def _usage(usage: dict | None) -> dict[str, Any] | None:
    if usage is None:
        return None
    return {"input_tokens": usage["prompt_tokens"], "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage["total_tokens"]}


def _error(error: dict | None) -> dict[str, str] | None:
    return {"code": error["code"], "message": error["message"]} if error else None


class ResponseEvents:
    """Turns a job's events, from its first, into numbered Responses stream events."""

    def __init__(self, record: ResponseRecord):
        self.record = record
        self.view = JobView(record.job_id)
        self._next = 0  # the next sequence number
        self._started = self._opened = False

    def on(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """The Responses events that one job event makes."""
        if "seq" not in event:  # not from the log: following it failed (idle, Redis lost)
            error = event["error"]
            return [self._emit("error", code=error["code"], message=error["message"],
                               param=error.get("param"), error=error)]
        self.view.apply(event)
        kind = event["type"]
        if kind == "status":
            return self._status()
        if kind == "token":
            return self._delta(event["text"])
        if kind == "done":
            return self._close() + [
                self._snapshot(CLOSING_EVENTS[response_status(self.view)])]
        return [self._snapshot("response.failed")]

    def _status(self) -> list[dict[str, Any]]:
        if self._next == 0:
            return [self._snapshot("response.created")]
        if self.view.state is JobState.STARTED and not self._started:
            self._started = True
            return [self._snapshot("response.in_progress")]
        return []  # a restart: the reply goes on where it was, unseen

    def _delta(self, text: str) -> list[dict[str, Any]]:
        if not text:  # ids whose text is still held back
            return []
        return self._open() + [self._emit("response.output_text.delta", **self._at(),
                                          delta=text, logprobs=[])]

    def _open(self) -> list[dict[str, Any]]:
        """The message item and its text part, announced once, before the first text."""
        if self._opened:
            return []
        self._opened = True
        item = {**output_message(self.record, self.view), "status": "in_progress", "content": []}
        return [self._emit("response.output_item.added", output_index=0, item=item),
                self._emit("response.content_part.added", **self._at(), part=output_text(""))]

    def _close(self) -> list[dict[str, Any]]:
        item = output_message(self.record, self.view)
        return self._open() + [
            self._emit("response.output_text.done", **self._at(), text=self.view.text,
                       logprobs=[]),
            self._emit("response.content_part.done", **self._at(), part=item["content"][0]),
            self._emit("response.output_item.done", output_index=0, item=item)]

    def _at(self) -> dict[str, Any]:
        return {"item_id": self.record.message_id, "output_index": 0, "content_index": 0}

    def _snapshot(self, kind: str) -> dict[str, Any]:
        return self._emit(kind, response=response_object(self.record, self.view))

    def _emit(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._next, **fields}
        self._next += 1
        return event
