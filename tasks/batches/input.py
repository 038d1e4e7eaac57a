"""Batch input files: JSONL, one request per line, checked when uploaded and read line by line
when run.

A line is `{"custom_id": "...", "method": "POST", "url": "/v1/chat/completions", "body": {...}}`;
custom ids are unique within the file. Blank lines are skipped; errors name the line's number
in the file (1-based). The request's body is checked only when its line runs: a bad body gives
an error line, not a refused file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.batches.contract import BATCH_ENDPOINTS

MAX_CUSTOM_ID_CHARS = 512


class BadInput(ValueError):
    """A line of the file is not a batch request."""

    def __init__(self, line: int, message: str):
        super().__init__(f"line {line} of the file: {message}")
        self.line = line


class RequestLine(BaseModel):
    """One line of a batch input file."""

    model_config = ConfigDict(extra="forbid", strict=True)

    custom_id: str = Field(min_length=1, max_length=MAX_CUSTOM_ID_CHARS)
    method: Literal["POST"]
    url: Literal[BATCH_ENDPOINTS]  # type: ignore[valid-type]
    body: dict[str, Any]


@dataclass(frozen=True)
class InputSummary:
    """What batch creation needs to know of a checked file."""

    requests: int
    endpoints: dict[str, int]  # each url the file asks for -> the first line asking for it


def parse_line(raw: bytes, number: int) -> RequestLine:
    """Parse line `number` of a file, or raise BadInput naming it."""
    try:
        return RequestLine.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            raise BadInput(number, f"not valid JSON ({first['msg']})") from None
        where = ".".join(str(part) for part in first["loc"])
        raise BadInput(number, f"{where}: {first['msg']}" if where else first["msg"]) from None


def _numbered_lines(path: Path):
    """(line number, byte offset, bytes) of each non-blank line."""
    offset = 0
    with path.open("rb") as source:
        for number, raw in enumerate(source, start=1):
            if raw.strip():
                yield number, offset, raw
            offset += len(raw)


def check_input(path: Path, max_requests: int) -> InputSummary:
    """Check every line of a batch input file; raise BadInput for the first bad one."""
    seen: set[str] = set()
    endpoints: dict[str, int] = {}
    for number, _, raw in _numbered_lines(path):
        line = parse_line(raw, number)
        if line.custom_id in seen:
            raise BadInput(number, f"custom_id {line.custom_id!r} is used by an earlier line; "
                                   "each request needs its own")
        seen.add(line.custom_id)
        endpoints.setdefault(line.url, number)
        if len(seen) > max_requests:
            raise BadInput(number, f"a batch may hold at most {max_requests} requests")
    if not seen:
        raise BadInput(1, "the file holds no requests")
    return InputSummary(len(seen), endpoints)


class InputLines:
    """A checked input file's requests by index (0-based), read from disk when asked for:
    only the lines' offsets stay in memory."""

    def __init__(self, path: Path):
        self.path = path
        self._lines = [(number, offset) for number, offset, _ in _numbered_lines(path)]

    def __len__(self) -> int:
        return len(self._lines)

    def __getitem__(self, index: int) -> RequestLine:
        number, offset = self._lines[index]
        with self.path.open("rb") as source:
            source.seek(offset)
            return parse_line(source.readline(), number)

    def custom_ids(self, first: int, last: int) -> list[str]:
        """The custom ids of requests first..last-1, reading the file once."""
        wanted = self._lines[first:last]
        with self.path.open("rb") as source:
            ids = []
            for number, offset in wanted:
                source.seek(offset)
                ids.append(json.loads(source.readline())["custom_id"])
            return ids
