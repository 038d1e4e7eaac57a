"""JSON Schemas for structured-output tests on both backends, and how a reply is checked."""
from __future__ import annotations

import json

import jsonschema

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16},
    "age": {"type": "integer", "minimum": 0, "maximum": 120}},
    "required": ["name", "age"], "additionalProperties": False}

# (id, schema): nested objects, enums, bounded arrays, nullable types, required fields, bounded
# strings, numbers and integers, booleans. Bounded, so that a reply ends within max_tokens.
SCHEMAS = [
    ("person", PERSON),
    ("boolean-flag", {"type": "object", "properties": {"ok": {"type": "boolean"}},
                      "required": ["ok"]}),
    ("enum-colour", {"type": "object", "properties": {
        "colour": {"enum": ["merah", "hijau", "biru"]}}, "required": ["colour"]}),
    ("mixed-enum", {"type": "object", "properties": {
        "value": {"enum": ["a", 1, True, None]}}, "required": ["value"]}),
    ("const", {"type": "object", "properties": {"kind": {"const": "dawet"},
                                                 "n": {"type": "integer", "minimum": 1,
                                                       "maximum": 9}},
               "required": ["kind", "n"]}),
    ("bounded-number", {"type": "object", "properties": {
        "price": {"type": "number", "minimum": 0, "maximum": 100}}, "required": ["price"]}),
    ("exclusive-integer", {"type": "object", "properties": {
        "score": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10}},
        "required": ["score"]}),
    ("nullable-string", {"type": "object", "properties": {
        "note": {"type": ["string", "null"], "maxLength": 8}}, "required": ["note"]}),
    ("nullable-anyof", {"type": "object", "properties": {
        "count": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 50},
                            {"type": "null"}]}}, "required": ["count"]}),
    ("array-min-max", {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6},
                 "minItems": 1, "maxItems": 3}}, "required": ["tags"]}),
    ("array-of-booleans", {"type": "object", "properties": {
        "bits": {"type": "array", "items": {"type": "boolean"}, "minItems": 2,
                 "maxItems": 4}}, "required": ["bits"]}),
    ("array-of-enums", {"type": "object", "properties": {
        "days": {"type": "array", "items": {"enum": ["senin", "selasa", "rabu"]},
                 "maxItems": 3}}, "required": ["days"]}),
    ("top-level-array", {"type": "array", "items": {"type": "integer", "minimum": -5,
                                                    "maximum": 5}, "minItems": 1,
                         "maxItems": 4}),
    ("nested-object", {"type": "object", "properties": {
        "order": {"type": "object", "properties": {
            "dish": {"enum": ["nasi goreng", "sate", "soto"]},
            "portions": {"type": "integer", "minimum": 1, "maximum": 5},
            "spicy": {"type": "boolean"}},
            "required": ["dish", "portions", "spicy"], "additionalProperties": False}},
        "required": ["order"]}),
    ("deeply-nested", {"type": "object", "properties": {"a": {"type": "object", "properties": {
        "b": {"type": "object", "properties": {"c": {"type": "integer", "minimum": 0,
                                                     "maximum": 3}},
              "required": ["c"]}}, "required": ["b"]}}, "required": ["a"]}),
    ("array-of-objects", {"type": "object", "properties": {
        "people": {"type": "array", "items": PERSON, "minItems": 1, "maxItems": 2}},
        "required": ["people"]}),
    ("optional-fields", {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 10},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
        "draft": {"type": "boolean"}}, "required": ["title"]}),
    ("string-min-max", {"type": "object", "properties": {
        "code": {"type": "string", "minLength": 2, "maxLength": 4}}, "required": ["code"]}),
    ("pattern", {"type": "object", "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}}, "required": ["id"]}),
    ("date-format", {"type": "object", "properties": {"day": {"type": "string",
                                                              "format": "date"}},
                     "required": ["day"]}),
    ("defs-and-ref", {"type": "object", "$defs": {
        "money": {"type": "object", "properties": {
            "amount": {"type": "integer", "minimum": 0, "maximum": 1000},
            "currency": {"enum": ["IDR", "USD"]}}, "required": ["amount", "currency"]}},
        "properties": {"total": {"$ref": "#/$defs/money"}}, "required": ["total"]}),
    ("integer-range", {"type": "object", "properties": {
        "step": {"type": "integer", "minimum": -100, "maximum": 100}},
        "required": ["step"]}),
    ("single-allof", {"type": "object", "properties": {
        "level": {"allOf": [{"type": "integer", "minimum": 1, "maximum": 3}]}},
        "required": ["level"]}),
    ("many-fields", {"type": "object", "properties": {
        "nama": {"type": "string", "maxLength": 12},
        "kota": {"enum": ["Jakarta", "Bandung", "Surabaya"]},
        "umur": {"type": "integer", "minimum": 18, "maximum": 99},
        "tinggi": {"type": "number", "minimum": 1, "maximum": 2.5},
        "menikah": {"type": "boolean"},
        "hobi": {"type": "array", "items": {"type": "string", "maxLength": 8},
                 "maxItems": 2}},
        "required": ["nama", "kota", "umur", "tinggi", "menikah", "hobi"]}),
]


def response_format(name: str, schema: dict) -> dict:
    """OpenAI's json_schema response format for a schema."""
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema,
                                                   "strict": True}}


def assert_follows(text: str, schema: dict) -> object:
    """The reply parses as JSON, has no whitespace between tokens, and the schema accepts it;
    returns the value."""
    value = json.loads(text)
    jsonschema.validate(value, schema)
    assert not any(c.isspace() for c in _outside_strings(text)), f"not compact: {text!r}"
    return value


def _outside_strings(text: str) -> str:
    """The JSON text's characters outside string literals."""
    outside, in_string, escaped = [], False, False
    for char in text:
        if in_string:
            escaped, in_string = (not escaped and char == "\\"), in_string and (
                escaped or char != '"')
        elif char == '"':
            in_string = True
        else:
            outside.append(char)
    return "".join(outside)
