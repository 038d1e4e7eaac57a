"""One error envelope for every failure: {"error": {"message", "type", "param", "code"}}."""
from __future__ import annotations

import logging

import redis
from flask import Flask, jsonify
from kombu.exceptions import OperationalError
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

from tasks.jobs.contract import ErrorBody

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error with its HTTP status and envelope fields."""

    def __init__(self, status: int, message: str, code: str,
                 type: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}
        self.body = ErrorBody(message=message, type=type, code=code, param=param)


def invalid(message: str, param: str | None = None, code: str = "invalid_request_error") -> APIError:
    """A 400 for a request the schema accepted but the served model cannot honour."""
    return APIError(400, message, code, param=param)


# Error types our schemas raise (PydanticCustomError) that travel as the envelope's code.
OWN_CODES = frozenset({"unsupported_parameter", "unsupported_value", "invalid_schema"})


def job_not_found(job_id: str) -> APIError:
    return APIError(404, f"job {job_id!r} does not exist or has expired", "job_not_found",
                    param="job_id")


def from_validation_error(exc: ValidationError) -> APIError:
    """The first pydantic error, with its field path as `param`."""
    first = exc.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    if first["type"] == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {first['msg']}", "invalid_json")
    detail = str(first["ctx"]["error"]) if first["type"] == "value_error" else first["msg"]
    message = f"{param}: {detail}" if param else detail
    code = first["type"] if first["type"] in OWN_CODES else "invalid_request_error"
    return APIError(400, message, code, param=param)


def _error_response(error: APIError):
    return jsonify(error.body.envelope()), error.status, error.headers


def register_error_handlers(app: Flask) -> None:
    """Turn every exception into the envelope; nothing reaches the client as a bare 500."""
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, lambda exc: _error_response(as_api_error(exc)))


def _http_error(exc: HTTPException):
    code = (exc.name or "error").lower().replace(" ", "_")
    kind = "invalid_request_error" if (exc.code or 500) < 500 else "server_error"
    return _error_response(APIError(exc.code or 500, exc.description or exc.name, code, kind))


def as_api_error(exc: Exception) -> APIError:
    """The error a failure is answered with, in a response or a socket's error frame: Redis or
    the broker unreachable is a 503, and an unexpected failure a 500 (logged)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValidationError):
        return from_validation_error(exc)
    if isinstance(exc, (redis.RedisError, OperationalError)):
        logger.warning("backend unavailable: %s", type(exc).__name__)
        return APIError(503, "the job queue or Redis is unavailable; retry shortly",
                        "service_unavailable", "service_unavailable")
    logger.error("unhandled error", exc_info=exc)
    return APIError(500, "internal server error", "internal_error", "server_error")
