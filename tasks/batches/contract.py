"""The batch contract: statuses, the endpoints a batch may target, ids, and the lines of the
output and error files, all in OpenAI's shapes. Plain data only."""
from __future__ import annotations

import secrets
import time
import uuid
from enum import Enum
from typing import Any

BATCH_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
COMPLETION_WINDOW = "24h"  # the only window OpenAI offers; its length is a setting here
INPUT_PURPOSE, OUTPUT_PURPOSE = "batch", "batch_output"
# A line's job id is derived from (batch id, line index) in this namespace, so dispatching a
# line again after a crash finds the job it made before instead of making another.
LINE_NAMESPACE = uuid.UUID("6f1c2a4e-4b7d-4f0e-9a51-2d8c3b7e5a10")


class BatchStatus(str, Enum):
    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def ended(self) -> bool:
        return self in ENDED

    @property
    def time_field(self) -> str | None:
        """The timestamp a batch records on entering this status (validating: created_at)."""
        return None if self is BatchStatus.VALIDATING else f"{self.value}_at"


ENDED = frozenset({BatchStatus.FAILED, BatchStatus.COMPLETED, BatchStatus.EXPIRED,
                   BatchStatus.CANCELLED})
TIMESTAMPS = ("created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at",
              "failed_at", "expired_at", "cancelling_at", "cancelled_at")

# What a line that never ran says in the error file, by how its batch ended.
UNRUN_ERRORS = {
    BatchStatus.EXPIRED: ("batch_expired", "this request could not be executed before the "
                                           "completion window expired"),
    BatchStatus.CANCELLED: ("batch_cancelled", "the batch was cancelled before this request "
                                               "completed"),
}


def new_id(prefix: str) -> str:
    """A fresh id that sorts by creation time: milliseconds in hex, then random hex."""
    return f"{prefix}{int(time.time() * 1000):012x}{secrets.token_hex(8)}"


def line_job_id(batch_id: str, index: int) -> str:
    """The job id of the batch's line `index` (0-based), the same every time."""
    return uuid.uuid5(LINE_NAMESPACE, f"{batch_id}/{index}").hex


def result_file_id(batch_id: str, kind: str) -> str:
    """The id of a batch's output or error file, the same every time it is written."""
    return f"file-{batch_id.removeprefix('batch_')}-{kind}"


def output_line(job_id: str, custom_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """A line of the output file: the request's response."""
    return {"id": f"batch_req_{job_id}", "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": job_id, "body": body},
            "error": None}


def error_line(job_id: str, custom_id: str, code: str, message: str) -> dict[str, Any]:
    """A line of the error file: why the request has no response."""
    return {"id": f"batch_req_{job_id}", "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}
