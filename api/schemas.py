"""Request schemas: strict pydantic models, and their translation into engine parameters."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field,
                      StringConstraints, TypeAdapter, ValidationError, model_validator)
from pydantic_core import PydanticCustomError

from api.errors import APIError, from_validation_error, invalid
from api.json_schema import check_enforceable, schema_text
from model_store.registry import ModelSpec
from model_store.tokenizer import Message
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


def _json_minimum(requested: int | None) -> int:
    """A JSON reply ends where its schema says: no default minimum of new tokens, and a
    requested one is an error."""
    if requested:
        raise invalid("a minimum number of new tokens cannot be combined with response_format: "
                      "the schema decides where the reply ends", param="response_format")
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

    def sampling_params(self, spec: ModelSpec, max_param: str = "max_new_tokens") -> SamplingParams:
        """Merge with the model's defaults and check against its limits."""
        defaults = spec.defaults
        json_schema = self.response_format.json_schema() if self.response_format else None
        max_new = self.max_new_tokens or defaults.max_new_tokens
        if max_new > spec.max_new_tokens_limit:
            raise invalid(f"{max_param} must be at most {spec.max_new_tokens_limit} for "
                          f"model {spec.name}", param=max_param)
        pick = lambda value, default: default if value is None else value  # noqa: E731
        min_new = (min(pick(self.min_new_tokens, defaults.min_new_tokens), max_new)
                   if json_schema is None else _json_minimum(self.min_new_tokens))
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


class OpenAIMessage(StrictModel):
    role: Literal["system", "user", "assistant"]
    content: Annotated[str, BeforeValidator(_text_parts)]


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

    def sampling_params(self, spec: ModelSpec) -> SamplingParams:
        """Merge with the model's defaults and check against its limits."""
        fields = SamplingFields.model_construct(
            max_new_tokens=self._max_tokens(), min_new_tokens=self.min_tokens,
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            repetition_penalty=self.repetition_penalty, stop=self.stop, seed=self.seed,
            response_format=self.response_format, logprobs=self.top_logprobs_wanted())
        return fields.sampling_params(spec, max_param=self._max_tokens_param())

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
    tools: Unsupported = None
    tool_choice: Unsupported = None
    parallel_tool_calls: Unsupported = None
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

    def top_logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def prompt_input(self) -> PromptInput:
        """The messages, for the model's chat template and default system prompt."""
        return PromptInput("messages",
                           messages=tuple(Message(m.role, m.content) for m in self.messages))

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
    size = len(raw.encode() if isinstance(raw, str) else raw)
    if size > MAX_CHAT_FRAME_BYTES:
        raise APIError(413, f"a chat frame may hold at most {MAX_CHAT_FRAME_BYTES} bytes; "
                            f"this one has {size}", "message_too_large")
    try:
        return _CHAT_FRAME.validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] in ("union_tag_invalid", "union_tag_not_found"):
            raise invalid(f"type must be one of {', '.join(CHAT_FRAME_TYPES)}", param="type",
                          code="unknown_message_type") from exc
        if not first["loc"]:
            raise from_validation_error(exc) from exc
        param = ".".join(str(part) for part in first["loc"][1:])  # drop the `type` tag
        raise invalid(f"{param}: {first['msg']}", param=param) from exc


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
