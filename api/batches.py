"""OpenAI's Batches API: run a file of chat or text completion requests in the background.

POST /v1/batches checks the request and the input file, keeps a link to the file and records
the batch as `validating`; a dispatcher in an API process (api/batch_dispatcher.py) takes it
from there. A batch belongs to the key that created it; for any other key it does not exist.
"""
from __future__ import annotations

import time
from typing import Annotated, Literal

import redis
from flask import Blueprint, request
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import Field, StringConstraints

from api.auth import principal, require_api_key
from api.errors import APIError, invalid
from api.files import page_limit, page_of, visible_file
from api.keys import Principal
from api.schemas import StrictModel, Unsupported
from api.services import Services, services
from tasks.batches.contract import (BATCH_ENDPOINTS, COMPLETION_WINDOW, INPUT_PURPOSE,
                                    BatchStatus, new_id)
from tasks.batches.files import FileRecord
from tasks.batches.store import BatchRecord

bp = Blueprint("batches", __name__, url_prefix="/v1")
bp.before_request(require_api_key)

DEFAULT_PAGE, MAX_PAGE = 20, 100
MetadataKey = Annotated[str, StringConstraints(max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]


class BatchCreateRequest(StrictModel):
    """POST /v1/batches."""

    input_file_id: str = Field(min_length=1)
    endpoint: Literal[BATCH_ENDPOINTS]  # type: ignore[valid-type]
    completion_window: Literal[COMPLETION_WINDOW]  # type: ignore[valid-type]
    metadata: dict[MetadataKey, MetadataValue] | None = Field(None, max_length=16)
    output_expires_after: Unsupported = None


@bp.post("/batches")
def create_batch():
    """Create a batch from an uploaded input file; it starts as `validating`."""
    body = BatchCreateRequest.model_validate_json(request.get_data())
    svc, who = services(), principal()
    source = visible_file(svc, who, body.input_file_id, param="input_file_id")
    _check_input_file(source, body.endpoint)
    now = int(time.time())
    record = BatchRecord(
        id=new_id("batch_"), owner=who.name, principal=who.to_json(), endpoint=body.endpoint,
        input_file_id=source.id, total=source.requests, created_at=now,
        expires_at=now + int(svc.settings.batch_completion_window_seconds),
        metadata=body.metadata)
    svc.files.keep_for_batch(source.id, record.id)
    svc.batches.create(record)
    return record.to_api()


def _check_input_file(source: FileRecord, endpoint: str) -> None:
    """The file must be a batch input file whose every line asks for `endpoint`."""
    if source.purpose != INPUT_PURPOSE:
        raise invalid(f"file {source.id} has purpose {source.purpose!r}; a batch reads a file "
                      f"uploaded with purpose {INPUT_PURPOSE!r}", param="input_file_id")
    others = {line: url for url, line in source.endpoints.items() if url != endpoint}
    if others:
        line = min(others)
        raise invalid(f"line {line} of file {source.id} asks for {others[line]}, but the "
                      f"batch's endpoint is {endpoint}; a batch runs one endpoint",
                      param="input_file_id")


@bp.get("/batches/<batch_id>")
def get_batch(batch_id: str):
    """Describe one batch: status, request counts, output and error files."""
    return visible_batch(services(), principal(), batch_id).to_api()


@bp.get("/batches")
def list_batches():
    """List the key's batches, newest first, after the cursor `after`."""
    svc, who = services(), principal()
    limit = page_limit(DEFAULT_PAGE, MAX_PAGE)
    ids, has_more = svc.batches.listing.page(None if who.admin else who.name,
                                             request.args.get("after"), limit)
    return page_of([record.to_api() for record in svc.batches.many(ids)], has_more)


@bp.post("/batches/<batch_id>/cancel")
def cancel_batch(batch_id: str):
    """Cancel a batch: it is `cancelling` until its running lines stop, then `cancelled`."""
    svc = services()
    record = visible_batch(svc, principal(), batch_id)
    if not svc.batches.cancel(record.id):
        raise APIError(409, f"batch {record.id} is {record.status.value}; only a validating "
                       "or in_progress batch can be cancelled", "batch_not_cancellable")
    return visible_batch(svc, principal(), batch_id).to_api()


def visible_batch(svc: Services, who: Principal, batch_id: str) -> BatchRecord:
    """The batch, if it exists and `who` may see it; else the same 404 either way."""
    record = svc.batches.get(batch_id)
    if record is None or not who.may_see(record.owner):
        raise APIError(404, f"batch {batch_id!r} does not exist", "batch_not_found",
                       param="batch_id")
    return record


class BatchCollector:
    """Batches by status and batch lines waiting, running and done, read from Redis at
    scrape time. Every series is present, at 0 when nothing happened yet."""

    def __init__(self, svc: Services):
        self._svc = svc

    def collect(self):
        models = sorted(self._svc.registry.models)
        try:
            stats = self._svc.batches.stats(models)
        except redis.RedisError:
            return  # the other collectors log it
        batches = GaugeMetricFamily("dawet_batches", "Batches by status: those not ended now, "
                                    "and those that ended in each final status ever.",
                                    labels=["state"])
        for status in BatchStatus:
            counts = stats.ended if status.ended else stats.active
            batches.add_metric([status.value], counts.get(status.value, 0))
        lines = GaugeMetricFamily("dawet_batch_lines", "Batch lines waiting in their batch, "
                                  "and running (queued or running as jobs).", labels=["state"])
        lines.add_metric(["waiting"], stats.waiting_lines)
        lines.add_metric(["running"], sum(stats.running_lines.values()))
        done = CounterMetricFamily("dawet_batch_lines_done", "Batch lines with a result, by "
                                   "outcome (completed: a response; failed: an error line).",
                                   labels=["outcome"])
        for outcome in ("completed", "failed"):
            done.add_metric([outcome], stats.done_lines.get(outcome, 0))
        yield from (batches, lines, done)
