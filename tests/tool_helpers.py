"""Tools for tool-calling tests on both backends, and how a call is checked."""
from __future__ import annotations

import json

import jsonschema

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city <now>",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 16},
        "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
# Parameters with $defs, as pydantic writes them: the forced call's schema moves the refs.
RECIPE = {"type": "function", "function": {
    "name": "find_recipe", "parameters": {
        "type": "object", "$defs": {"Portion": {"type": "integer", "minimum": 1, "maximum": 8}},
        "properties": {"dish": {"type": "string", "maxLength": 12},
                       "servings": {"$ref": "#/$defs/Portion"}},
        "required": ["dish", "servings"]}}}
CLOCK = {"type": "function", "function": {"name": "current_time"}}  # no parameters
TOOLS = [WEATHER, RECIPE, CLOCK]


def parameters(name: str) -> dict:
    tool = next(t for t in TOOLS if t["function"]["name"] == name)
    return tool["function"].get("parameters", {"type": "object", "properties": {},
                                               "additionalProperties": False})


def assert_valid_call(call, names: set[str]) -> dict:
    """An OpenAI tool call to one of `names` whose arguments follow its parameters schema."""
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name in names
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, parameters(call.function.name))
    return arguments


def streamed_calls(chunks) -> list[dict]:
    """The calls that tool_calls deltas spell, by index, as a client reassembles them."""
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += delta.id or ""
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
    return [calls[index] for index in sorted(calls)]
