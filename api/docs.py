"""The OpenAPI document: request bodies from the pydantic schemas, paths assembled by hand."""
from __future__ import annotations

from functools import lru_cache
from typing import Any

from flask import Blueprint
from pydantic.json_schema import models_json_schema

from api.adapters import LoadAdapterRequest, UnloadAdapterRequest
from api.admission import IDEMPOTENCY_HEADER, MAX_IDEMPOTENCY_KEY_LENGTH
from api.batches import BatchCreateRequest
from api.schemas import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                         GenerateRequest, ResponseRequest, TokenizeRequest)

bp = Blueprint("docs", __name__)

REF = "#/components/schemas/{model}"
OBJECT = {"type": "object"}
ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "code": {"type": "string"}, "param": {"type": ["string", "null"]}}}}}
# What each refusal means, by status, for every route that may answer it.
ERRORS = {"400": "invalid request", "401": "missing or invalid API key",
          "403": "the API key may not use this model, read this usage, or (not an admin key) "
                 "load or unload adapters",
          "404": "unknown model, job, conversation, response or route (another key's are unknown "
                 "too)",
          "409": "an Idempotency-Key still being admitted, or a batch past cancelling",
          "413": "request body or file too large",
          "422": "the chat template refuses the messages, or an Idempotency-Key is reused",
          "429": "rate limit, queue limit or daily token budget; see Retry-After",
          "503": "Redis, the broker or the model's workers are unavailable"}


@bp.get("/openapi.json")
def openapi():
    """Serve the API's OpenAPI 3.1 document."""
    return openapi_document()


@lru_cache(maxsize=1)
def openapi_document() -> dict[str, Any]:
    """Build the document once: components from the request models, then the paths."""
    _, top = models_json_schema(
        [(m, "validation") for m in (GenerateRequest, ChatCompletionRequest, CompletionRequest,
                                     TokenizeRequest, DetokenizeRequest, ResponseRequest,
                                     BatchCreateRequest, LoadAdapterRequest,
                                     UnloadAdapterRequest)],
        ref_template=REF)
    schemas = {**top["$defs"], "Error": ERROR}
    return {"openapi": "3.1.0", "info": {"title": "Dawet", "version": "0.1.0"},
            "paths": _paths(), "components": {"schemas": schemas, "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"}}},
            "security": [{"bearer": []}, {}]}


def _paths() -> dict[str, Any]:
    job_id = _path_param("job_id")
    return {
        "/v1/generate": {"post": _submit("GenerateRequest", "202", "the queued job")},
        "/v1/chat/completions": {"post": _submit("ChatCompletionRequest", "200",
                                                 "a chat completion, or an SSE stream")},
        "/v1/completions": {"post": _submit("CompletionRequest", "200",
                                            "a text completion, or an SSE stream")},
        **_response_paths(),
        **_batch_paths(),
        "/v1/jobs/{job_id}": {"parameters": [job_id],
                              "get": _operation("200", "the job's state and text", "404"),
                              "delete": _operation("202", "cancellation requested", "404")},
        "/v1/models": {"get": _operation("200", "the served models")},
        "/v1/models/{model_id}": {"parameters": [_path_param("model_id")],
                                  "get": _operation("200", "one model", "404")},
        "/v1/chat/models": {"get": _operation("200", "models for the chat page")},
        "/v1/load_lora_adapter": {"post": _body("LoadAdapterRequest", "the adapter, served",
                                                "200", "400", "403", "404")},
        "/v1/unload_lora_adapter": {"post": _body("UnloadAdapterRequest", "the adapter, removed",
                                                  "200", "403", "404")},
        "/tokenize": {"post": _body("TokenizeRequest", "the prompt's token ids")},
        "/detokenize": {"post": _body("DetokenizeRequest", "the text of token ids")},
        "/v1/usage": {"parameters": [_query_param(name) for name in
                                     ("start_date", "end_date", "key")],
                      "get": _operation("200", "requests and tokens per key, model and day, "
                                        "and the key's budget", "400", "403")},
        "/v1/conversations/{conversation_id}": {
            "parameters": [_path_param("conversation_id")],
            "get": _operation("200", "the conversation and its turns", "404"),
            "delete": _operation("200", "deleted; its running reply cancelled", "404")},
        "/": {"get": {"responses": {"200": {"description": "the chat page", "content": {
            "text/html": {"schema": {"type": "string"}}}}}, "security": []}},
        "/metrics": {"get": {"responses": {"200": {"description": "Prometheus metrics", "content": {
            "text/plain": {"schema": {"type": "string"}}}}}, "security": []}},
        "/healthz": {"get": _operation("200", "the process is alive", security=[])},
        "/readyz": {"get": _operation("200", "ready to serve", "503", security=[])},
    }


def _response_paths() -> dict[str, Any]:
    """OpenAI's Responses API (api/responses.py)."""
    response_id = _path_param("response_id")
    return {
        "/v1/responses": {"post": _submit("ResponseRequest", "200",
                                          "the response, or an SSE stream of its events")},
        "/v1/responses/{response_id}": {
            "parameters": [response_id, _query_param("stream"), _query_param("starting_after")],
            "get": _operation("200", "the response, or with stream=true its events after "
                              "starting_after as SSE", "400", "404"),
            "delete": _operation("200", "deleted; its running job cancelled", "404")},
        "/v1/responses/{response_id}/cancel": {
            "parameters": [response_id],
            "post": _operation("200", "the cancelled background response", "400", "404")},
        "/v1/responses/{response_id}/input_items": {
            "parameters": [response_id] + [_query_param(name)
                                           for name in ("limit", "order", "after")],
            "get": _operation("200", "a page of the response's input items", "400", "404")},
    }


def _batch_paths() -> dict[str, Any]:
    """OpenAI's Files and Batches APIs (api/files.py, api/batches.py)."""
    file_id, batch_id = _path_param("file_id"), _path_param("batch_id")
    upload = _operation("200", "the stored file", "400", "413")
    upload["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file", "purpose"], "properties": {
            "file": {"type": "string", "format": "binary"},
            "purpose": {"type": "string", "enum": ["batch"]}}}}}}
    list_files = _operation("200", "a page of the key's files", "400")
    list_files["parameters"] = [_query_param(n) for n in ("purpose", "limit", "order", "after")]
    list_batches = _operation("200", "a page of the key's batches", "400")
    list_batches["parameters"] = [_query_param("limit"), _query_param("after")]
    return {
        "/v1/files": {"post": upload, "get": list_files},
        "/v1/files/{file_id}": {"parameters": [file_id],
                                "get": _operation("200", "the file", "404"),
                                "delete": _operation("200", "deleted", "404")},
        "/v1/files/{file_id}/content": {"parameters": [file_id], "get": {"responses": {
            "200": {"description": "the file's content", "content": {
                "application/jsonl": {"schema": {"type": "string"}}}},
            "404": _json(ERRORS["404"], {"$ref": REF.format(model="Error")})}}},
        "/v1/batches": {"post": _body("BatchCreateRequest", "the batch, validating"),
                        "get": list_batches},
        "/v1/batches/{batch_id}": {"parameters": [batch_id],
                                   "get": _operation("200", "the batch", "404")},
        "/v1/batches/{batch_id}/cancel": {
            "parameters": [batch_id],
            "post": _operation("200", "the batch, cancelling", "404", "409")},
    }


def _body(schema: str, what: str, status: str = "200", *errors: str) -> dict[str, Any]:
    """A POST that validates a JSON body."""
    operation = _operation(status, what, *(errors or ("400", "404")))
    operation["requestBody"] = {"required": True, "content": {
        "application/json": {"schema": {"$ref": REF.format(model=schema)}}}}
    return operation


def _submit(schema: str, status: str, what: str) -> dict[str, Any]:
    """A POST that validates a JSON body and admits a job."""
    operation = _body(schema, what, status, *ERRORS)
    operation["parameters"] = [{"name": IDEMPOTENCY_HEADER, "in": "header", "required": False,
                                "schema": {"type": "string", "minLength": 1,
                                           "maxLength": MAX_IDEMPOTENCY_KEY_LENGTH}}]
    return operation


def _operation(status: str, what: str, *errors: str, security: list | None = None):
    """An operation answering `status` with a JSON object, or the error envelope."""
    responses = {status: _json(what, OBJECT)}
    responses |= {code: _json(ERRORS[code], {"$ref": REF.format(model="Error")})
                  for code in ("401", *errors)}
    operation = {"responses": responses}
    if security is not None:
        operation["security"] = security
    return operation


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    """A response with a JSON body of this schema."""
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _path_param(name: str) -> dict[str, Any]:
    """A required string path parameter."""
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _query_param(name: str) -> dict[str, Any]:
    """An optional string query parameter."""
    return {"name": name, "in": "query", "required": False, "schema": {"type": "string"}}
