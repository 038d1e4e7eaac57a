"""The OpenAI-compatible API: chat and text completions (JSON or SSE) and the model list.

Every completion runs as a job through Services.submit_generation, like POST /v1/generate;
its id travels in the X-Dawet-Job-Id header. A chat completion with tools has its reply read
for tool calls (api/tool_calls.py).
"""
from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Response, request

from api.admission import request_idempotency_key
from api.auth import principal, require_api_key
from api.errors import APIError, invalid
from api.metrics import count_admission, counted_stream
from api.schemas import (ChatCompletionRequest, CompletionRequest, GenerationRequest,
                         OpenAIRequest, PromptInput)
from api.services import Services, services
from api.tool_calls import ToolPlan, parser_for
from model_store.registry import ModelSpec
from model_store.tokenizer import ToolCall
from tasks.jobs.contract import ErrorBody, Job, JobView, SamplingParams

logger = logging.getLogger(__name__)
bp = Blueprint("openai", __name__, url_prefix="/v1")
bp.before_request(require_api_key)

JOB_HEADER = "X-Dawet-Job-Id"
# Our finish reasons in OpenAI's vocabulary; a cancelled job ends as "stop" (what it produced
# is complete as far as it goes); GET /v1/jobs/<id> tells the two apart.
FINISH_REASONS = {"stop": "stop", "stop_sequence": "stop", "length": "length",
                  "cancelled": "stop"}
STATUS_BY_TYPE = {"invalid_request_error": 400, "server_error": 500}
STATUS_BY_CODE = {"stream_timeout": 504, "deadline_exceeded": 504, "service_unavailable": 503}


Logprobs = list[dict[str, Any]]  # token events' "logprobs" entries (TokenLogprob.to_dict)


class ChatShape:
    """Chat completion objects: a message per choice, deltas when streamed."""

    object, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl-"

    @staticmethod
    def choice(text: str, finish: str | None, logprobs: dict | None = None) -> dict[str, Any]:
        message = {"role": "assistant", "content": text}
        return {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish}

    @staticmethod
    def delta(delta: dict[str, str], finish: str | None,
              logprobs: dict | None = None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    @classmethod
    def opening(cls) -> list[dict[str, Any]]:
        return [cls.delta({"role": "assistant", "content": ""}, None)]

    @classmethod
    def piece(cls, text: str, logprobs: dict | None = None) -> dict[str, Any]:
        return cls.delta({"content": text}, None, logprobs)

    @staticmethod
    def logprobs(entries: Logprobs, offset: int) -> dict[str, Any]:
        """`choices[].logprobs`: each token with its bytes and its likeliest alternatives."""
        return {"content": [{**_with_bytes(entry), "top_logprobs": [
            _with_bytes(top) for top in entry["top_logprobs"]]} for entry in entries],
            "refusal": None}

    @classmethod
    def closing(cls, finish: str) -> dict[str, Any]:
        return cls.delta({}, finish)

    @staticmethod
    def tool_call(call: ToolCall) -> dict[str, Any]:
        return {"id": call.id, "type": "function",
                "function": {"name": call.name, "arguments": call.arguments}}

    @classmethod
    def tool_call_piece(cls, index: int, call: ToolCall,
                        logprobs: dict | None = None) -> dict[str, Any]:
        """One whole call as a stream delta."""
        return cls.delta({"tool_calls": [{"index": index, **cls.tool_call(call)}]}, None,
                         logprobs)


class TextShape:
    """Text completion objects: the same choice shape whole or streamed."""

    object, chunk_object, id_prefix = "text_completion", "text_completion", "cmpl-"

    @staticmethod
    def choice(text: str, finish: str | None, logprobs: dict | None = None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}

    @staticmethod
    def opening() -> list[dict[str, Any]]:
        return []

    @classmethod
    def piece(cls, text: str, logprobs: dict | None = None) -> dict[str, Any]:
        return cls.choice(text, None, logprobs)

    @staticmethod
    def logprobs(entries: Logprobs, offset: int) -> dict[str, Any]:
        """`choices[].logprobs` of the legacy API: parallel lists, where each token's
        alternatives also hold the token itself, and `offset` is where the first token
        starts in the reply."""
        starts = list(itertools.accumulate((len(e["token"]) for e in entries[:-1]),
                                           initial=offset))
        return {"tokens": [e["token"] for e in entries],
                "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{**{top["token"]: top["logprob"] for top in e["top_logprobs"]},
                                  e["token"]: e["logprob"]} for e in entries],
                "text_offset": starts if entries else []}

    @classmethod
    def closing(cls, finish: str) -> dict[str, Any]:
        return cls.choice("", finish)


@dataclass(frozen=True)
class Reply:
    """One job's completion in OpenAI's shapes, whole or as stream chunks."""

    shape: type[ChatShape] | type[TextShape]
    job: Job
    include_usage: bool = False
    tools: ToolPlan | None = None  # how a chat reply is read for tool calls; None: it is not

    def whole(self, text: str, done: dict[str, Any],
              logprobs: Logprobs | None = None) -> dict[str, Any]:
        """The completion object; `logprobs`: the job's entries (token_logprobs(events)), when
        it asked for them."""
        content, calls = self.tools.parse(text) if self.tools else (text, [])
        finish = "tool_calls" if calls else FINISH_REASONS[done["finish_reason"]]
        choice = self.shape.choice(content, finish, self.logprobs(logprobs, 0))
        if calls:
            choice["message"]["tool_calls"] = [ChatShape.tool_call(call) for call in calls]
        return self._object(self.shape.object, [choice], usage=done["usage"])

    def logprobs(self, entries: Logprobs | None, offset: int) -> dict[str, Any] | None:
        """The choice's `logprobs` for these entries; None when the job asked for none."""
        if self.job.params.logprobs is None or entries is None:
            return None
        return self.shape.logprobs(entries, offset)

    def chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        extra = {"usage": None} if self.include_usage else {}
        return self._object(self.shape.chunk_object, [choice], **extra)

    def usage_chunk(self, done: dict[str, Any]) -> dict[str, Any]:
        return self._object(self.shape.chunk_object, [], usage=done["usage"])

    def _object(self, kind: str, choices: list, **extra: Any) -> dict[str, Any]:
        return {"id": self.shape.id_prefix + self.job.id, "object": kind,
                "created": int(self.job.created_at), "model": self.job.model,
                "choices": choices, **extra}


@bp.post("/chat/completions")
@count_admission
def create_chat_completion():
    """Run a chat completion as a job; stream it as SSE when asked."""
    return _complete(ChatCompletionRequest.model_validate_json(request.get_data()), ChatShape)


@bp.post("/completions")
@count_admission
def create_completion():
    """Run a text completion (no chat template) as a job; stream it as SSE when asked."""
    return _complete(CompletionRequest.model_validate_json(request.get_data()), TextShape)


@bp.get("/models")
def list_models():
    """List the registry's models that the key may use, each with whether a live worker
    serves it."""
    svc = services()
    return {"object": "list",
            "data": [_model_card(svc, spec) for spec in svc.usable_models(principal())]}


@bp.get("/models/<path:model_id>")
def get_model(model_id: str):
    """Describe one registry model (a model the key may not use does not exist for it)."""
    svc = services()
    return _model_card(svc, svc.usable_model(principal(), model_id))


def _model_card(svc: Services, spec: ModelSpec) -> dict[str, Any]:
    """OpenAI's model object, plus whether a live worker serves it and its context length; an
    adapter names its base model as `parent`, as vLLM's LoRA models do."""
    return {"id": spec.name, "object": "model", "created": svc.started_at, "owned_by": "dawet",
            "parent": spec.base_model, "ready": svc.workers.serves(spec.served_by),
            "context_length": spec.context_length}


@dataclass(frozen=True)
class ToolCallRequest:
    """A chat completion whose reply is read for tool calls, as Services.submit_generation
    takes it: a call that tool_choice forces is held to its schema."""

    body: ChatCompletionRequest
    plan: ToolPlan

    @property
    def model(self) -> str:
        return self.body.model

    def sampling_params(self, spec: ModelSpec) -> SamplingParams:
        schema = self.plan.json_schema()
        return self.body.sampling_params(spec, (schema, "tool_choice") if schema else None)

    def prompt_input(self) -> PromptInput:
        return self.body.prompt_input()


def tool_plan(svc: Services, body: OpenAIRequest) -> ToolPlan | None:
    """How the reply is read for tool calls, in the model's format; None when it is not (no
    tools, or tool_choice "none")."""
    if not isinstance(body, ChatCompletionRequest) or not body.reads_tool_calls:
        return None
    spec = svc.model(body.model)
    parser = parser_for(spec.tool_parser, svc.tokenizer(spec).chat_template)
    if parser is None:
        raise invalid(f"the chat template of model {spec.name} shows no tool-call format; "
                      "set tool_parser in its registry entry", param="tools")
    forced = tuple((function.name, function.parameters)
                   for function in body.forced_functions())
    return ToolPlan(parser, forced, parallel=body.parallel_tool_calls is not False)


def with_tools(svc: Services, body: OpenAIRequest) -> tuple[GenerationRequest, ToolPlan | None]:
    """The request to submit for `body`, and how its reply is read for tool calls."""
    plan = tool_plan(svc, body)
    return (ToolCallRequest(body, plan) if plan else body), plan


def _complete(body: OpenAIRequest, shape: type[ChatShape] | type[TextShape]):
    """Submit the job; answer with its whole completion, or stream it."""
    svc = services()
    request, plan = with_tools(svc, body)
    job = svc.submit_generation(principal(), request, require_worker=True,
                                idempotency=request_idempotency_key())
    reply = Reply(shape, job, body.include_usage, plan)
    if body.stream:
        headers = {JOB_HEADER: job.id, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        frames = counted_stream(_sse(svc, reply), "sse")
        return Response(frames, mimetype="text/event-stream", headers=headers)
    text, done, logprobs = _wait(svc, job)
    return reply.whole(text, done, logprobs), {JOB_HEADER: job.id}


def token_logprobs(events: list[dict[str, Any]]) -> Logprobs:
    """The log-probability entries of a job's token events, in order."""
    return [entry for event in events for entry in event.get("logprobs", ())]


def _with_bytes(entry: dict[str, Any]) -> dict[str, Any]:
    return {"token": entry["token"], "logprob": entry["logprob"],
            "bytes": list(entry["token"].encode())}


def _wait(svc: Services, job: Job) -> tuple[str, dict[str, Any], Logprobs]:
    """Block until the job ends; its text, done event and log-probability entries, or its
    error as an APIError."""
    view = JobView(job.id)  # the one fold of events (a restarted job's reply goes on)
    tokens = []
    for event in svc.events(job.id):
        view.apply(event)
        if event["type"] == "token":
            tokens.append(event)
        if event["type"] == "done":
            return view.text, event, token_logprobs(tokens)
        if event["type"] == "error":
            svc.store.cancel(job.id)  # a timed-out job has no reader left
            raise _job_error(ErrorBody(**event["error"]))
    raise AssertionError("follow() ended without a terminal event")


def _job_error(body: ErrorBody) -> APIError:
    """A job's error event as an HTTP error with a fitting status."""
    status = STATUS_BY_CODE.get(body.code) or STATUS_BY_TYPE.get(body.type, 500)
    return APIError(status, body.message, body.code, body.type, body.param)


def _sse(svc: Services, reply: Reply) -> Iterator[str]:
    """Relay the job as SSE frames; a client that leaves first cancels the job (if configured)."""
    frames = (f"data: {chunk if isinstance(chunk, str) else json.dumps(chunk)}\n\n"
              for chunk in _chunks(svc, reply))
    return cancel_if_abandoned(svc, reply.job.id, frames)


def cancel_if_abandoned(svc: Services, job_id: str, frames: Iterator[str]) -> Iterator[str]:
    """Pass a job's stream through; a client that leaves before its end cancels the job (if
    configured)."""
    ended = False  # Services.events turns a lost Redis into an error event, so streams end
    try:
        yield from frames
        ended = True
    finally:
        if not ended and svc.settings.cancel_on_disconnect:
            logger.info("client left the stream of job %s; cancelling it", job_id)
            svc.store.cancel(job_id)


def _chunks(svc: Services, reply: Reply) -> Iterator[dict[str, Any] | str]:
    """The stream's payloads: opening, text pieces, closing, usage; an error ends it early."""
    yield from map(reply.chunk, reply.shape.opening())
    stream = ToolCallStream(reply) if reply.tools else TextStream(reply)
    for event in svc.events(reply.job.id):
        if event["type"] == "token":
            yield from map(reply.chunk, stream.token(event))
        elif event["type"] == "error":
            yield {"error": event["error"]}
            return
        elif event["type"] == "done":
            yield from map(reply.chunk, stream.end(event))
            if reply.include_usage:
                yield reply.usage_chunk(event)
    yield "[DONE]"


class TextStream:
    """A reply's choices as they stream: a piece per token, then the closing one."""

    def __init__(self, reply: Reply):
        self.reply = reply
        self.spelled = 0  # the characters the tokens reported so far spell: where the next starts

    def token(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        entries = event.get("logprobs", [])
        piece = self.reply.shape.piece(event["text"], self.reply.logprobs(entries, self.spelled))
        self.spelled += sum(len(entry["token"]) for entry in entries)
        return [piece]

    def end(self, done: dict[str, Any]) -> list[dict[str, Any]]:
        return [self.reply.shape.closing(FINISH_REASONS[done["finish_reason"]])]


class ToolCallStream:
    """A chat reply that may call tools, as it streams: its text goes out as content up to
    where a call could begin; the rest is held and read once the reply ends, then sent as
    tool_calls deltas (each call whole, in one delta, as vLLM sends the calls of parsers that
    do not stream), or as content if it holds no call. The logprobs of held tokens go with the
    next chunk sent."""

    def __init__(self, reply: Reply):
        self.reply, self.plan = reply, reply.tools
        self.text, self.sent = "", 0
        self.entries: Logprobs = []  # logprobs not sent yet

    def token(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        self.text += event["text"]
        self.entries += event.get("logprobs", [])
        ready = self.plan.holdback(self.text)
        if ready <= self.sent:
            return []
        piece = ChatShape.piece(self.text[self.sent:ready], self._logprobs())
        self.sent = ready
        return [piece]

    def end(self, done: dict[str, Any]) -> list[dict[str, Any]]:
        content, calls = self.plan.parse(self.text[self.sent:])
        pieces = [ChatShape.piece(content, self._logprobs())] if content else []
        pieces += [ChatShape.tool_call_piece(index, call, self._logprobs())
                   for index, call in enumerate(calls)]
        finish = "tool_calls" if calls else FINISH_REASONS[done["finish_reason"]]
        return pieces + [ChatShape.closing(finish)]

    def _logprobs(self) -> dict[str, Any] | None:
        entries, self.entries = self.entries, []
        return self.reply.logprobs(entries, 0) if entries else None
