"""OpenAI's Files API, for batches: upload a JSONL file of requests, read, list and delete files,
and download their content (a batch's output and error files too).

A file belongs to the key that uploaded it (a batch's result files to the batch's key); for any
other key it does not exist. An upload is checked line by line before it is kept
(tasks/batches/input.py), so a malformed file is refused with a 400 that names its line.
"""
from __future__ import annotations

import time

from flask import Blueprint, request, send_file

from api.auth import principal, require_api_key
from api.errors import APIError, invalid
from api.keys import Principal
from api.offload import off_loop
from api.services import Services, services
from tasks.batches.contract import INPUT_PURPOSE, new_id
from tasks.batches.files import FileRecord
from tasks.batches.input import BadInput, check_input

bp = Blueprint("files", __name__, url_prefix="/v1")
bp.before_request(require_api_key)

MULTIPART_SLACK_BYTES = 64 * 1024  # a form's boundaries and other fields around the file
UPLOAD_FIELDS = {"purpose"}  # form fields besides the file itself
MAX_PAGE = 10_000


@bp.post("/files")
def upload_file():
    """Keep an uploaded JSONL file of batch requests, once every line checks out."""
    svc = services()
    limit = svc.settings.max_file_bytes
    if (request.content_length or 0) > limit + MULTIPART_SLACK_BYTES:
        raise _too_large(limit)
    request.max_content_length = limit + MULTIPART_SLACK_BYTES
    upload = request.files.get("file")
    _check_form(upload)
    record = _store_upload(svc, principal(), upload, limit)
    return record.to_api()


def _check_form(upload) -> None:
    unknown = sorted(str(name) for name in set(request.form) - UPLOAD_FIELDS)
    if unknown:
        raise APIError(400, f"{unknown[0]} is not supported by Dawet; leave it out",
                       "unsupported_parameter", param=unknown[0])
    if upload is None:
        raise invalid("send the file as the multipart form field `file`", param="file")
    if request.form.get("purpose") != INPUT_PURPOSE:
        raise invalid(f"purpose must be {INPUT_PURPOSE!r}: Dawet keeps files for batches only",
                      param="purpose")


def _store_upload(svc: Services, who: Principal, upload, limit: int) -> FileRecord:
    """Write the upload to the files directory and check it; refused, it is removed."""
    file_id = new_id("file-")
    size = off_loop(svc.files.write, file_id, upload.stream)
    try:
        if size > limit:
            raise _too_large(limit)
        summary = off_loop(check_input, svc.files.path(file_id), svc.settings.batch_max_requests)
    except BadInput as exc:
        svc.files.discard(file_id)
        raise invalid(str(exc), param="file") from None
    except BaseException:
        svc.files.discard(file_id)
        raise
    record = FileRecord(file_id, who.name, upload.filename or "upload.jsonl", INPUT_PURPOSE,
                        size, int(time.time()), summary.endpoints, summary.requests)
    svc.files.save(record)
    return record


def _too_large(limit: int) -> APIError:
    return APIError(413, f"a file may hold at most {limit} bytes (DAWET_MAX_FILE_BYTES)",
                    "request_entity_too_large", param="file")


@bp.get("/files")
def list_files():
    """List the key's files, newest first (`order=asc`: oldest), after the cursor `after`."""
    svc, who = services(), principal()
    limit = page_limit(MAX_PAGE, MAX_PAGE)
    order = request.args.get("order", "desc")
    if order not in ("asc", "desc"):
        raise invalid("order must be asc or desc", param="order")
    purpose = request.args.get("purpose")
    ids, has_more = svc.files.listing.page(None if who.admin else who.name,
                                           request.args.get("after"), limit, order == "desc")
    records = [r for r in svc.files.many(ids) if purpose in (None, r.purpose)]
    return page_of([r.to_api() for r in records], has_more)


@bp.get("/files/<file_id>")
def get_file(file_id: str):
    """Describe one file."""
    return visible_file(services(), principal(), file_id).to_api()


@bp.get("/files/<file_id>/content")
def get_file_content(file_id: str):
    """Send the file's content."""
    svc = services()
    record = visible_file(svc, principal(), file_id)
    return send_file(svc.files.path(record.id).resolve(), mimetype="application/jsonl",
                     download_name=record.filename, conditional=False)


@bp.delete("/files/<file_id>")
def delete_file(file_id: str):
    """Delete a file (a batch that reads it keeps its own copy)."""
    svc = services()
    record = visible_file(svc, principal(), file_id)
    svc.files.delete(record)
    return {"id": record.id, "object": "file", "deleted": True}


def visible_file(svc: Services, who: Principal, file_id: str,
                 param: str = "file_id") -> FileRecord:
    """The file, if it exists and `who` may see it; else the same 404 either way."""
    record = svc.files.get(file_id)
    if record is None or not who.may_see(record.owner):
        raise APIError(404, f"file {file_id!r} does not exist", "file_not_found", param=param)
    return record


def page_limit(default: int, most: int) -> int:
    """The `limit` query parameter: 1 to `most`."""
    raw = request.args.get("limit", str(default))
    if not raw.isdigit() or not 1 <= int(raw) <= most:
        raise invalid(f"limit must be an integer from 1 to {most}", param="limit")
    return int(raw)


def page_of(data: list[dict], has_more: bool) -> dict:
    """OpenAI's cursor page."""
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}
