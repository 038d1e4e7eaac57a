"""Request schemas: strict pydantic models, and their translation into engine parameters."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field,
                      StringConstraints, TypeAdapter, ValidationError, ValidationInfo,
                      field_validator, model_validator)
from pydantic_core import PydanticCustomError

from api.errors import APIError, from_validation_error, invalid
from api.json_schema import check_enforceable, schema_text
from model_store.registry import ModelSpec
from model_store.tokenizer import Message, ToolCall
from tasks.jobs.contract import INVALID_SCHEMA, MAX_TOP_LOGPROBS, SamplingParams

MAX_STOP_SEQUENCES = 4
MAX_COMPLETION_LOGPROBS = 5  # the legacy completions API's bound on `logprobs`
StopString = Annotated[str, StringConstraints(min_length=1, max_length=64)]
# `stop` takes one string or a list; a lone string becomes a list of one.
StopList = Annotated[list[StopString], BeforeValidator(lambda v: [v] if isinstance(v, str) else v)]


@dataclass(frozen=True)
class PromptInput:
    """What a request generates from: raw text, or chat messages for the chat template."""

    param: str  # the request field it came from, named in errors
    text: str | None = None
    messages: tuple[Message, ...] = ()
    system_prompt: str | None = None  # None: the model's default system prompt
    tools: tuple[dict[str, Any], ...] = ()  # OpenAI's tool objects, for the chat template


class GenerationRequest(Protocol):
    """What Services.submit_generation needs from a request."""

    model: str | None

    def sampling_params(self, spec: ModelSpec) -> SamplingParams: ...

    def prompt_input(self) -> PromptInput: ...


class StrictModel(BaseModel):
    """Unknown fields and loose types (a string for a number) are errors."""

    model_config = ConfigDict(extra="forbid", strict=True)


class ChatMessage(StrictModel):
    role: Literal["system", "user", "assistant"]
    content: str


def _enforceable(schema: dict[str, Any]) -> dict[str, Any]:
    try:
        check_enforceable(schema)
    except ValueError as exc:
        raise PydanticCustomError(INVALID_SCHEMA, str(exc)) from None
    return schema


class JsonSchemaSpec(StrictModel):
    """The schema a structured reply follows, in OpenAI's shape."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: Annotated[dict[str, Any], AfterValidator(_enforceable)] = Field(alias="schema")
    strict: bool | None = None  # accepted: Dawet always holds the reply to the schema


class ResponseFormat(StrictModel):
    """`response_format` (OpenAI's shape, on every generation route): free `text`, any JSON
    object (`json_object`, which vLLM compiles as the schema {"type": "object"}), or JSON that
    `json_schema.schema` accepts."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema_: JsonSchemaSpec | None = Field(None, alias="json_schema")

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema_ is not None):
            raise ValueError("give json_schema exactly when type is json_schema")
        return self

    def json_schema(self) -> str | None:
        """The JSON text of the schema the reply follows; None for free text."""
        if self.type == "json_object":
            return '{"type":"object"}'
        return schema_text(self.json_schema_.schema_) if self.json_schema_ else None


TopLogprobs = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)]


def _json_minimum(requested: int | None, param: str) -> int:
    """A JSON reply ends where its schema says: no default minimum of new tokens, and a
    requested one is an error (naming `param`, what asked for JSON)."""
    if requested:
        raise invalid(f"a minimum number of new tokens cannot be combined with {param}: "
                      "the schema decides where the reply ends", param=param)
    return 0


class SamplingFields(StrictModel):
    """Generation parameters a request may set; unset ones come from the model's defaults."""

    max_new_tokens: int | None = Field(None, ge=1)
    min_new_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    stop: StopList | None = Field(None, max_length=MAX_STOP_SEQUENCES)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    response_format: ResponseFormat | None = None
    # Each token's log-probability, with this many alternatives, in the token events.
    logprobs: TopLogprobs | None = None

    def sampling_params(self, spec: ModelSpec, max_param: str = "max_new_tokens",
                        json_reply: tuple[str, str] | None = None) -> SamplingParams:
        """Merge with the model's defaults and check against its limits. `json_reply`: a JSON
        Schema's text and the param that asked for it, instead of response_format's."""
        defaults = spec.defaults
        json_schema, json_param = json_reply or (
            self.response_format.json_schema() if self.response_format else None,
            "response_format")
        max_new = self.max_new_tokens or defaults.max_new_tokens
        if max_new > spec.max_new_tokens_limit:
            raise invalid(f"{max_param} must be at most {spec.max_new_tokens_limit} for "
                          f"model {spec.name}", param=max_param)
        pick = lambda value, default: default if value is None else value  # noqa: E731
        min_new = (min(pick(self.min_new_tokens, defaults.min_new_tokens), max_new)
                   if json_schema is None else _json_minimum(self.min_new_tokens, json_param))
        return SamplingParams(
            max_new_tokens=max_new, min_new_tokens=min_new,
            temperature=pick(self.temperature, defaults.temperature),
            top_p=pick(self.top_p, defaults.top_p),
            top_k=pick(self.top_k, defaults.top_k),
            repetition_penalty=pick(self.repetition_penalty, defaults.repetition_penalty),
            stop=tuple(self.stop or ()), seed=self.seed,
            json_schema=json_schema, logprobs=self.logprobs,
        )


class PromptOrMessages(StrictModel):
    """A raw `prompt`, or chat `messages` for the model's chat template, for one model."""

    model: str | None = None
    prompt: str | None = Field(None, min_length=1)
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    system_prompt: str | None = None  # replaces the model's default system prompt

    @model_validator(mode="after")
    def _prompt_or_messages(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        if self.system_prompt is not None and self.messages is None:
            raise ValueError("`system_prompt` applies to `messages` only")
        return self

    def prompt_input(self) -> PromptInput:
        """The raw prompt, or the messages for the chat template."""
        if self.prompt is not None:
            return PromptInput("prompt", text=self.prompt)
        return PromptInput("messages", messages=tuple(Message(m.role, m.content)
                                                      for m in self.messages or ()),
                           system_prompt=self.system_prompt)


class GenerateRequest(SamplingFields, PromptOrMessages):
    """POST /v1/generate: a chat (`messages`) or a raw `prompt`, for one model."""

    # Seconds the job may wait for a worker; not started by then, it expires.
    deadline_seconds: float | None = Field(None, gt=0, le=86_400)


class TokenizeRequest(PromptOrMessages):
    """POST /tokenize (vLLM's shape): what a generation from this prompt would be given."""

    add_special_tokens: bool = True  # a raw prompt's BOS token, as a completion's prompt has


class DetokenizeRequest(StrictModel):
    """POST /detokenize (vLLM's shape): token ids back to text."""

    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]] = Field(max_length=1_000_000)


# --- OpenAI-compatible requests (/v1/chat/completions, /v1/completions) ---

def _unsupported(value: Any) -> Any:
    if value is not None and value is not False:
        raise PydanticCustomError("unsupported_parameter",
                                  "this OpenAI option is not supported by Dawet; leave it out")
    return value


def _only_one(value: int) -> int:
    if value != 1:
        raise PydanticCustomError("unsupported_value",
                                  "only 1 is supported: Dawet returns one choice per request")
    return value


def _zero_only(value: float) -> float:
    if value != 0:
        raise PydanticCustomError(
            "unsupported_value", "only 0 is supported: Dawet's sampler has no additive penalties; "
            "use repetition_penalty (a Dawet extension, multiplicative) instead")
    return value


def _text_parts(value: Any) -> Any:
    """Message content: a string, or a non-empty list of text parts joined by newlines."""
    if not isinstance(value, list):
        return value  # the strict str check follows
    if not value or not all(isinstance(p, dict) and set(p) == {"type", "text"}
                            and p["type"] == "text" and isinstance(p["text"], str) for p in value):
        raise PydanticCustomError("unsupported_value", 'content must be a string or a non-empty '
                                  'list of {"type": "text", "text": "..."} parts; '
                                  "Dawet models read text only")
    return "\n".join(part["text"] for part in value)


def _one_prompt(value: Any) -> Any:
    """A completion prompt: a string, or a list holding exactly one string."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        return value[0]
    if isinstance(value, list):
        raise PydanticCustomError("unsupported_value", "prompt must be one string (or a list of "
                                  "exactly one string); token-id and batched prompts are not "
                                  "supported")
    return value


Unsupported = Annotated[Any, AfterValidator(_unsupported)]
OneChoice = Annotated[int, AfterValidator(_only_one)]
ZeroPenalty = Annotated[float, Field(ge=-2.0, le=2.0), AfterValidator(_zero_only)]


class StreamOptions(StrictModel):
    include_usage: bool = False


MAX_TOOLS = 128  # OpenAI's limit
FunctionName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


def _json_object_text(value: str) -> str:
    """A call's arguments: the JSON text of an object (templates are given the object)."""
    try:
        parsed = json.loads(value)
    except (ValueError, RecursionError):  # RecursionError: nested too deep
        parsed = None
    if not isinstance(parsed, dict):
        raise ValueError("must be the JSON text of an object")
    return value


class CalledFunction(StrictModel):
    name: str = Field(min_length=1)
    arguments: Annotated[str, AfterValidator(_json_object_text)]


class MessageToolCall(StrictModel):
    """A call an earlier assistant message made, as the reply's `tool_calls` listed it."""

    id: str = Field(min_length=1)
    type: Literal["function"]
    function: CalledFunction


class OpenAIMessage(StrictModel):
    """A chat message. In OpenAI's tool-calling flow an assistant message may hold
    `tool_calls` (content then may be null) and a `tool` message answers one by its id."""

    role: Literal["system", "user", "assistant", "tool"]
    content: Annotated[str | None, BeforeValidator(_text_parts)] = Field(
        None, validate_default=True)
    tool_calls: list[MessageToolCall] | None = Field(None, validate_default=True)
    tool_call_id: str | None = Field(None, min_length=1, validate_default=True)

    @field_validator("content")
    @classmethod
    def _content_unless_an_assistant(cls, content: str | None, info: ValidationInfo):
        if content is None and info.data.get("role", "assistant") != "assistant":
            raise ValueError("required (only an assistant message that calls "
                             "tools may leave it out)")
        return content

    @field_validator("tool_calls")
    @classmethod
    def _calls_of_an_assistant(cls, calls: list[MessageToolCall] | None,
                               info: ValidationInfo):
        role = info.data.get("role")
        if calls and role != "assistant":
            raise ValueError("only assistant messages have tool_calls")
        if not calls and role == "assistant" and info.data.get("content", "") is None:
            raise ValueError("an assistant message needs content or tool_calls")
        return calls

    @field_validator("tool_call_id")
    @classmethod
    def _id_on_a_tool_message(cls, call_id: str | None, info: ValidationInfo):
        role = info.data.get("role")
        if call_id is None and role == "tool":
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        if call_id is not None and role not in ("tool", None):
            raise ValueError("only tool messages have a tool_call_id")
        return call_id

    def message(self) -> Message:
        """The message for the chat template."""
        calls = tuple(ToolCall(call.id, call.function.name, call.function.arguments)
                      for call in self.tool_calls or ())
        return Message(self.role, self.content, calls, self.tool_call_id)


class FunctionDefinition(StrictModel):
    name: FunctionName
    description: str | None = None
    # None: no parameters (an empty object); a call forced by tool_choice follows the schema.
    parameters: Annotated[dict[str, Any], AfterValidator(_enforceable)] | None = None
    strict: bool | None = None  # accepted: forced calls always follow the schema


class ToolDefinition(StrictModel):
    type: Literal["function"]
    function: FunctionDefinition


class ChosenFunction(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    """tool_choice naming the function the reply must call."""

    type: Literal["function"]
    function: ChosenFunction


TOOL_CHOICE_MODES = ("none", "auto", "required")
_NAMED_TOOL_CHOICE = TypeAdapter(NamedToolChoice)


def _tool_choice(value: Any) -> Any:
    """One error naming what tool_choice may be, rather than one per member of its union."""
    if isinstance(value, dict):
        try:
            return _NAMED_TOOL_CHOICE.validate_python(value)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise PydanticCustomError("invalid_tool_choice", f"{where}: {first['msg']}") from None
    if value is not None and value not in TOOL_CHOICE_MODES:
        raise PydanticCustomError("invalid_tool_choice", 'must be "none", "auto", '
                                  '"required" or {"type": "function", "function": {"name": '
                                  '"..."}}')
    return value


ToolChoice = Annotated[Literal["none", "auto", "required"] | NamedToolChoice,
                       BeforeValidator(_tool_choice)]


class OpenAIRequest(StrictModel):
    """Fields shared by chat and text completions; unset sampling fields take model defaults."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: StopList | None = Field(None, max_length=MAX_STOP_SEQUENCES)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: OneChoice | None = None  # null is accepted wherever OpenAI accepts it
    presence_penalty: ZeroPenalty | None = None
    frequency_penalty: ZeroPenalty | None = None
    user: str | None = None  # accepted, not used
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # Dawet extensions, named as vLLM names them (the openai client sends them via extra_body).
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    min_tokens: int | None = Field(None, ge=0)
    response_format: ResponseFormat | None = None
    # OpenAI options Dawet does not implement: an error when set, never silently ignored.
    logit_bias: Unsupported = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, spec: ModelSpec,
                        json_reply: tuple[str, str] | None = None) -> SamplingParams:
        """Merge with the model's defaults and check against its limits; `json_reply` as
        SamplingFields.sampling_params takes it."""
        fields = SamplingFields.model_construct(
            max_new_tokens=self._max_tokens(), min_new_tokens=self.min_tokens,
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            repetition_penalty=self.repetition_penalty, stop=self.stop, seed=self.seed,
            response_format=self.response_format, logprobs=self.top_logprobs_wanted())
        return fields.sampling_params(spec, max_param=self._max_tokens_param(),
                                      json_reply=json_reply)

    def top_logprobs_wanted(self) -> int | None:
        """How many alternatives each token's log-probability lists; None: no logprobs."""
        return None

    def _max_tokens(self) -> int | None:
        return self.max_tokens

    def _max_tokens_param(self) -> str:
        return "max_tokens"


class ChatCompletionRequest(OpenAIRequest):
    """POST /v1/chat/completions."""

    messages: list[OpenAIMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[ToolDefinition] | None = Field(None, min_length=1, max_length=MAX_TOOLS)
    # None: "auto" with tools. "none": the template still sees the tools (as with OpenAI and
    # vLLM), and the reply is not read for calls.
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None  # False: under auto, only the first call
    functions: Unsupported = None
    function_call: Unsupported = None
    audio: Unsupported = None
    modalities: Unsupported = None
    prediction: Unsupported = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None

    @model_validator(mode="after")
    def _one_token_limit(self):
        if None not in (self.max_tokens, self.max_completion_tokens) \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens differ; give one of them")
        return self

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs is only allowed when logprobs is true")
        return self

    @field_validator("tools")
    @classmethod
    def _distinct_names(cls, tools: list[ToolDefinition] | None):
        names = [tool.function.name for tool in tools or ()]
        twice = next((name for index, name in enumerate(names) if name in names[:index]), None)
        if twice is not None:
            raise ValueError(f"function {twice!r} is defined twice")
        return tools

    @field_validator("tool_choice")
    @classmethod
    def _choice_among_tools(cls, choice: str | NamedToolChoice | None, info: ValidationInfo):
        if choice in (None, "none") or "tools" not in info.data:  # bad tools: their own error
            return choice
        names = [tool.function.name for tool in info.data["tools"] or ()]
        if not names:
            raise ValueError("there are no tools to choose from; give tools, or leave it out")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"function {choice.function.name!r} is not among the tools "
                             f"({', '.join(names)})")
        response_format = info.data.get("response_format")
        if choice != "auto" and response_format and response_format.type != "text":
            raise ValueError("a required or named tool call is JSON already; it cannot be "
                             "combined with a JSON response_format")
        return choice

    def top_logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def reads_tool_calls(self) -> bool:
        """Whether the reply may call the tools (tool_choice other than "none")."""
        return bool(self.tools) and self.tool_choice != "none"

    def forced_functions(self) -> list[FunctionDefinition]:
        """The functions one of which the reply must call: all for "required", the named one;
        none when the model may answer in text."""
        functions = [tool.function for tool in self.tools or ()]
        if isinstance(self.tool_choice, NamedToolChoice):
            return [f for f in functions if f.name == self.tool_choice.function.name]
        return functions if self.tool_choice == "required" else []

    def prompt_input(self) -> PromptInput:
        """The messages and tools, for the model's chat template and default system prompt."""
        return PromptInput("messages", messages=tuple(m.message() for m in self.messages),
                           tools=tuple(tool.model_dump(exclude_none=True)
                                       for tool in self.tools or ()))

    def _max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def _max_tokens_param(self) -> str:
        return "max_tokens" if self.max_completion_tokens is None else "max_completion_tokens"


class CompletionRequest(OpenAIRequest):
    """POST /v1/completions."""

    prompt: Annotated[str, BeforeValidator(_one_prompt)] = Field(min_length=1)
    echo: Unsupported = None
    suffix: Unsupported = None
    best_of: OneChoice | None = None
    logprobs: Annotated[int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None

    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs

    def prompt_input(self) -> PromptInput:
        """The raw prompt, with no chat template."""
        return PromptInput("prompt", text=self.prompt)


# The chat socket (WS /v1/chat): one JSON object per text frame, told apart by `type`.
MAX_CHAT_FRAME_BYTES = 32 * 1024
MAX_CHAT_CONTENT_CHARS = 16_000
ResourceId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class ChatSend(SamplingFields):
    """Add a user message to a conversation (a new one without `conversation_id`) and reply."""

    type: Literal["message"]
    conversation_id: ResourceId | None = None
    model: str | None = None  # None: the conversation's model, else the registry default
    content: str = Field(min_length=1, max_length=MAX_CHAT_CONTENT_CHARS)
    system_prompt: str | None = Field(None, max_length=MAX_CHAT_CONTENT_CHARS)


class ChatRegenerate(SamplingFields):
    """Drop the last reply of a conversation and answer its last user message again."""

    type: Literal["regenerate"]
    conversation_id: ResourceId


class ChatResume(StrictModel):
    """Relay a reply's events after sequence number `after`, e.g. after a dropped connection."""

    type: Literal["resume"]
    job_id: ResourceId
    after: int = Field(0, ge=0)
    conversation_id: ResourceId | None = None  # to save the reply when it ends


class ChatCancel(StrictModel):
    """Stop the reply this connection is relaying."""

    type: Literal["cancel"]


ChatFrame = ChatSend | ChatRegenerate | ChatResume | ChatCancel
_CHAT_FRAME = TypeAdapter(Annotated[ChatFrame, Field(discriminator="type")])
CHAT_FRAME_TYPES = ("message", "regenerate", "resume", "cancel")


def parse_chat_frame(raw: str | bytes) -> ChatFrame:
    """Validate one client frame of the chat socket; raise APIError with the envelope's fields."""
    return parse_frame(_CHAT_FRAME, CHAT_FRAME_TYPES, raw, MAX_CHAT_FRAME_BYTES, "a chat frame")


def parse_frame(frames: TypeAdapter, types: tuple[str, ...], raw: str | bytes,
                max_bytes: int, what: str = "a frame"):
    """Validate one client frame of a socket whose frames `type` tells apart (`types`); raise
    APIError with the envelope's fields."""
    size = len(raw.encode() if isinstance(raw, str) else raw)
    if size > max_bytes:
        raise APIError(413, f"{what} may hold at most {max_bytes} bytes; this one has {size}",
                       "message_too_large")
    try:
        return frames.validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] in ("union_tag_invalid", "union_tag_not_found"):
            raise invalid(f"type must be one of {', '.join(types)}", param="type",
                          code="unknown_message_type") from exc
        if not first["loc"]:
            raise from_validation_error(exc) from exc
        param = ".".join(str(part) for part in first["loc"][1:])  # drop the `type` tag
        detail = str(first["ctx"]["error"]) if first["type"] == "value_error" else first["msg"]
        raise invalid(f"{param}: {detail}" if param else detail, param=param or None) from exc


# --- OpenAI's Responses API (/v1/responses) ---

MAX_METADATA_PAIRS = 16
MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]


def _as_parts(value: Any) -> Any:
    """Message content: a string is one text part."""
    return [{"type": "input_text", "text": value}] if isinstance(value, str) else value


def _as_messages(value: Any) -> Any:
    """Response input: a string is one user message."""
    return [{"role": "user", "content": value}] if isinstance(value, str) else value


def _no_tools(value: list[Any] | None) -> list[Any] | None:
    if value:
        raise PydanticCustomError("unsupported_parameter",
                                  "tools are not supported by Dawet; leave them out")
    return value


class ResponseTextPart(StrictModel):
    """Text content: `input_text`, or the `output_text` of a previous output passed back."""

    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] = Field(default_factory=list, max_length=0)
    logprobs: list[Any] | None = None  # what a passed-back output may carry; not used


class ResponseInputMessage(StrictModel):
    """A message of a response's input; a previous response's output message may come back."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Annotated[list[ResponseTextPart], BeforeValidator(_as_parts), Field(min_length=1)]
    id: ResourceId | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None

    @property
    def text(self) -> str:
        """The content as one text, parts joined by newlines (as chat completions join them)."""
        return "\n".join(part.text for part in self.content)


class ResponseTextFormat(StrictModel):
    type: Literal["text"]  # Dawet answers in plain text


class ResponseTextConfig(StrictModel):
    format: ResponseTextFormat | None = None


class ResponseRequest(StrictModel):
    """POST /v1/responses; unset sampling fields take the model's defaults."""

    model: str = Field(min_length=1)
    input: Annotated[list[ResponseInputMessage], BeforeValidator(_as_messages),
                     Field(min_length=1)]
    instructions: str | None = None  # a system message first; not carried along a chain
    previous_response_id: ResourceId | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool | None = False
    background: bool | None = False
    store: bool | None = True
    metadata: dict[MetadataKey, MetadataValue] | None = Field(None,
                                                              max_length=MAX_METADATA_PAIRS)
    user: str | None = None  # accepted, not used
    # Dawet calls no tools: only settings that ask for none are accepted.
    tools: Annotated[list[Any] | None, AfterValidator(_no_tools)] = None
    tool_choice: Literal["none", "auto"] | None = None
    parallel_tool_calls: bool | None = None
    text: ResponseTextConfig | None = None
    truncation: Literal["disabled"] | None = None
    # Dawet extensions, named as on the completion routes.
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    min_tokens: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    # OpenAI options Dawet does not implement: an error when set, never silently ignored.
    reasoning: Unsupported = None
    include: Unsupported = None
    top_logprobs: Unsupported = None
    prompt: Unsupported = None
    conversation: Unsupported = None
    max_tool_calls: Unsupported = None
    service_tier: Unsupported = None
    stream_options: Unsupported = None

    @model_validator(mode="after")
    def _background_is_stored(self):
        if self.background and self.store is False:
            raise ValueError("a background response must be stored: leave store out or set it "
                             "to true")
        return self

    @property
    def stored(self) -> bool:
        return self.store is not False  # null means the default, true

    def sampling_params(self, spec: ModelSpec) -> SamplingParams:
        """Merge with the model's defaults and check against its limits."""
        fields = SamplingFields.model_construct(
            max_new_tokens=self.max_output_tokens, min_new_tokens=self.min_tokens,
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            repetition_penalty=self.repetition_penalty, stop=None, seed=self.seed)
        return fields.sampling_params(spec, max_param="max_output_tokens")


class ResponseQuery(BaseModel):
    """GET /v1/responses/<id>: the response, or with `stream` its events after `starting_after`."""

    model_config = ConfigDict(extra="ignore")  # include, include_obfuscation: nothing to add

    stream: bool = False
    starting_after: int | None = Field(None, ge=0)


class InputItemsQuery(BaseModel):
    """GET /v1/responses/<id>/input_items: one page of the input, in OpenAI's cursor paging."""

    model_config = ConfigDict(extra="ignore")  # include: nothing to add

    limit: int = Field(20, ge=1, le=100)
    order: Literal["asc", "desc"] = "desc"
    after: str | None = None
