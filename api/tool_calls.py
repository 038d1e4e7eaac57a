"""Tool calls in a chat reply: one parser per chat-template family, and what a request's
`tool_choice` asks of the generation.

A parser knows how its family writes calls: Hermes puts each call's JSON object in
<tool_call></tool_call> tags; Llama 3.x writes the JSON objects alone (separated by ";"), maybe
after <|python_tag|>. It finds the calls in a reply, tells how much of a streamed reply may go
out as content before a call could start, and gives the JSON Schema of one call in its family's
format, which `required` and a named function enforce with structured outputs (a grammar cannot
write the tags, so the reply is the bare JSON object and the call is read from it).
"""
from __future__ import annotations

import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from api.json_schema import schema_text
from model_store.tokenizer import ToolCall

ARGUMENT_KEYS = ("arguments", "parameters")  # Llama 3.x writes `parameters`; accept either
# What a function without `parameters` takes: nothing.
EMPTY_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
DATA_KEYWORDS = ("const", "enum", "default", "examples")  # values, not schemas: no $ref there
SEPARATOR = re.compile(r"[\s;]*")  # between Llama 3.x's calls
Parsed = tuple[str | None, list[ToolCall]]  # the content, and the calls
Function = tuple[str, dict[str, Any] | None]  # a name, and its parameters schema


def _call_id() -> str:
    return "call_" + secrets.token_hex(12)


class ToolParser:
    """A chat-template family's tool-call format."""

    name = ""
    arguments_key = "arguments"  # what the family's call object names its arguments

    def parse(self, text: str) -> Parsed:
        """The calls in a whole reply, and the content beside them; a reply that holds no call,
        or one that does not parse, is all content."""
        raise NotImplementedError

    def holdback(self, text: str) -> int:
        """How much of a reply so far may stream as content: the rest may begin a call."""
        raise NotImplementedError

    def call_schema(self, functions: Sequence[Function]) -> dict[str, Any]:
        """The JSON Schema of one call to any of `functions` ((name, parameters) pairs) in
        this family's format. Each function's parameters go to `$defs` under its name, with
        their local references moved along (xgrammar resolves no pointer through `anyOf`)."""
        calls = [{"type": "object", "properties": {
            "name": {"const": name}, self.arguments_key: {"$ref": f"#/$defs/{name}"}},
            "required": ["name", self.arguments_key], "additionalProperties": False}
            for name, _ in functions]
        defs = {name: _rebased(parameters, f"#/$defs/{name}") for name, parameters in functions}
        return {"$defs": defs, **({"anyOf": calls} if len(calls) > 1 else calls[0])}

    def parse_call(self, text: str) -> ToolCall | None:
        """The call a reply held to `call_schema` writes; None if it is not one (cut short)."""
        try:
            return _call(json.loads(text))
        except (ValueError, RecursionError):  # RecursionError: nested too deep
            return None


class HermesParser(ToolParser):
    """<tool_call>{"name": ..., "arguments": {...}}</tool_call>, one block per call."""

    name = "hermes"
    START = "<tool_call>"
    # A last call the model ended without its closing tag still counts, as in vLLM.
    CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.S)

    def parse(self, text: str) -> Parsed:
        start = text.find(self.START)
        if start < 0:
            return text, []
        calls = [self.parse_call(block.strip()) for block in self.CALL.findall(text, start)]
        if None in calls:
            return text, []
        content = text[:start]
        return (content if content.strip() else None), calls

    def holdback(self, text: str) -> int:
        start = text.find(self.START)
        return start if start >= 0 else len(text) - _partial_marker(text, self.START)


class Llama3JsonParser(ToolParser):
    """Llama 3.x's JSON calls: the whole reply is `{"name": ..., "parameters": {...}}`, or
    several joined by ";", maybe after <|python_tag|> (which decoding usually drops)."""

    name = "llama3_json"
    arguments_key = "parameters"
    PYTHON_TAG = "<|python_tag|>"

    def parse(self, text: str) -> Parsed:
        body = text.strip().removeprefix(self.PYTHON_TAG).lstrip()
        calls = [_call(value) for value in _json_values(body)] if body.startswith("{") else []
        if not calls or None in calls:
            return text, []
        return None, calls

    def holdback(self, text: str) -> int:
        head = text.lstrip()
        maybe_call = head.startswith(("{", self.PYTHON_TAG)) or self.PYTHON_TAG.startswith(head)
        return 0 if maybe_call else len(text)


PARSERS = {parser.name: parser for parser in (HermesParser(), Llama3JsonParser())}


def parser_for(configured: str | None, chat_template: str) -> ToolParser | None:
    """The registry's `tool_parser`, else the family the chat template writes calls in; None
    when it shows none."""
    if configured:
        return PARSERS[configured]
    if HermesParser.START in chat_template:
        return PARSERS["hermes"]
    if "<|start_header_id|>" in chat_template and "tools" in chat_template:
        return PARSERS["llama3_json"]
    return None


@dataclass(frozen=True)
class ToolPlan:
    """How a chat completion with tools is generated and read back. `forced`: the functions,
    as (name, parameters), one of which the reply must call (`required`, or the one named);
    empty for `auto`, where the model chooses and its reply is parsed."""

    parser: ToolParser
    forced: tuple[Function, ...] = ()
    parallel: bool = True  # parallel_tool_calls: under `auto`, all the calls, else the first

    def json_schema(self) -> str | None:
        """The JSON text of the schema that forces a call; None under `auto`."""
        return schema_text(self.parser.call_schema(self.forced)) if self.forced else None

    def parse(self, text: str) -> Parsed:
        if self.forced:
            call = self.parser.parse_call(text)
            return (None, [call]) if call else (text, [])
        content, calls = self.parser.parse(text)
        return content, calls if self.parallel else calls[:1]

    def holdback(self, text: str) -> int:
        """How much of the reply so far may stream as content (a forced reply is a call)."""
        return 0 if self.forced else self.parser.holdback(text)


def _call(value: Any) -> ToolCall | None:
    """A call from its JSON object, or None if the object is not one."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = next((value[key] for key in ARGUMENT_KEYS if key in value), None)
    if not isinstance(arguments, dict):
        return None
    return ToolCall(_call_id(), value["name"], json.dumps(arguments, ensure_ascii=False))


def _json_values(text: str) -> list[Any]:
    """The JSON values of text that holds one or more, separated by ";" or whitespace; [] if it
    holds anything else."""
    decoder, values, at = json.JSONDecoder(), [], 0
    try:
        while at < len(text):
            value, at = decoder.raw_decode(text, at)
            values.append(value)
            at = SEPARATOR.match(text, at).end()
    except (ValueError, RecursionError):
        return []
    return values


def _partial_marker(text: str, marker: str) -> int:
    """The length of the longest end of text that begins `marker` (a marker still arriving)."""
    return next((size for size in range(min(len(marker) - 1, len(text)), 0, -1)
                 if text.endswith(marker[:size])), 0)


def _rebased(schema: dict[str, Any] | None, base: str) -> Any:
    """The parameters schema (empty if None) placed at `base`: its local `$ref`s point there,
    and it declares no dialect (only a root may)."""
    root = {key: value for key, value in (schema or EMPTY_PARAMETERS).items() if key != "$schema"}
    return _rebase_refs(root, base)


def _rebase_refs(node: Any, base: str) -> Any:
    if isinstance(node, list):
        return [_rebase_refs(item, base) for item in node]
    if not isinstance(node, dict):
        return node
    rebased = {key: value if key in DATA_KEYWORDS else _rebase_refs(value, base)
               for key, value in node.items()}
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#"):
        rebased["$ref"] = base + ref[1:]
    return rebased
