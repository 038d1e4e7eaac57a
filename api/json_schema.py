"""Which JSON Schemas a structured reply can follow, checked in the API before a job is queued.

The engines compile a schema with xgrammar (tasks/engine/structured.py), which the API cannot
import (it pulls in torch). So the API checks what it can cheaply: that the schema is a valid
JSON Schema (jsonschema's metaschema check), and that it uses no keyword that xgrammar 0.2.8
ignores or gets wrong, so that every reply it shapes validates against the schema. What only
the compiler finds (a regular expression it cannot parse, a minimum above the maximum) comes
back from the engine as an `invalid_schema` error.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from jsonschema.exceptions import SchemaError
from jsonschema.validators import Draft202012Validator, validator_for

MAX_DEPTH = 64  # how deep schemas may nest (vLLM's limit)
# The string formats xgrammar turns into grammars; it ignores others.
FORMATS = frozenset({"email", "date", "time", "date-time", "duration", "ipv4", "ipv6", "hostname",
                     "uuid", "uri", "uri-reference", "uri-template", "json-pointer",
                     "relative-json-pointer"})
# Keywords xgrammar ignores or treats loosely, so that replies could break the schema.
UNSUPPORTED = {
    "not": "negation is not enforced",
    "if": "conditional schemas are not enforced", "then": "conditional schemas are not enforced",
    "else": "conditional schemas are not enforced",
    "oneOf": "exactly-one is not enforced; use anyOf",
    "dependentRequired": "dependencies are not enforced",
    "dependentSchemas": "dependencies are not enforced",
    "dependencies": "dependencies are not enforced",
    "contains": "not enforced", "minContains": "not enforced", "maxContains": "not enforced",
    "propertyNames": "not enforced",
}
# Keywords whose values are schemas, or maps or lists of schemas: where the walk goes on.
ONE, MANY, NAMED = (("additionalProperties", "items", "unevaluatedItems",
                     "unevaluatedProperties", "not", "if", "then", "else", "contains",
                     "propertyNames"),
                    ("prefixItems", "anyOf", "allOf", "oneOf"),
                    ("properties", "patternProperties", "$defs", "definitions",
                     "dependentSchemas"))


def check_enforceable(schema: dict[str, Any]) -> None:
    """Raise ValueError naming the problem unless a reply can be held to the schema."""
    dialect = schema.get("$schema")  # a dialect jsonschema knows, else 2020-12 (which checks it)
    validator = (validator_for(schema, default=Draft202012Validator)
                 if isinstance(dialect, str) else Draft202012Validator)
    try:
        validator.check_schema(schema)
    except SchemaError as exc:
        where = _pointer(exc.absolute_path)
        raise ValueError(f"not a valid JSON Schema at {where}: {exc.message}") from None
    for where, node in _subschemas(schema, "#", 0):
        problem = _unsupported(node)
        if problem:
            raise ValueError(f"{where}: {problem}")


def schema_text(schema: dict[str, Any]) -> str:
    """The schema as compact JSON text, its key order kept (replies follow it)."""
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


def _subschemas(node: Any, where: str, depth: int) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema in the schema, with its JSON pointer."""
    if not isinstance(node, dict):
        return  # true or false
    if depth > MAX_DEPTH:
        raise ValueError(f"{where}: schemas may nest at most {MAX_DEPTH} levels deep")
    yield where, node
    for key in ONE:
        if key in node:
            yield from _subschemas(node[key], f"{where}/{key}", depth + 1)
    for key in MANY:
        for index, item in enumerate(node.get(key) or ()):
            yield from _subschemas(item, f"{where}/{key}/{index}", depth + 1)
    for key in NAMED:
        for name, item in (node.get(key) or {}).items():
            yield from _subschemas(item, f"{where}/{key}/{name}", depth + 1)


def _unsupported(node: dict[str, Any]) -> str | None:
    """Why xgrammar could not hold replies to this schema node; None if it can."""
    for keyword, reason in UNSUPPORTED.items():
        if keyword in node:
            return f"`{keyword}` is not supported ({reason})"
    if node.get("uniqueItems") is True:
        return "`uniqueItems` is not supported (not enforced)"
    if len(node.get("allOf") or ()) > 1:
        return "`allOf` with more than one schema is not supported (not enforced)"
    if "multipleOf" in node:  # xgrammar ignores it on numbers; vLLM refuses it everywhere
        return "`multipleOf` is not supported"
    ref = node.get("$ref")
    if isinstance(ref, str) and not ref.startswith("#"):
        return "`$ref` must point inside the schema (start with #)"
    if "patternProperties" in node and ("properties" in node
                                        or len(node["patternProperties"]) > 1):
        return "`patternProperties` is supported alone and with one pattern only"
    return _unsupported_string(node)


def _unsupported_string(node: dict[str, Any]) -> str | None:
    if "format" in node and node["format"] not in FORMATS:
        return (f"string format {node['format']!r} is not supported; supported: "
                f"{', '.join(sorted(FORMATS))}")
    if ("pattern" in node or "format" in node) and ("minLength" in node or "maxLength" in node):
        return "minLength and maxLength cannot be combined with a pattern or a format"
    return None


def _pointer(path) -> str:
    return "#" + "".join(f"/{part}" for part in path)
