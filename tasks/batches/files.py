"""Stored files: content on disk under DAWET_FILES_DIR, records in Redis.

A file's content is `<files_dir>/<id>`, written under a temporary name, flushed to disk and
renamed, so it is whole or absent. Its record is the hash `dawet:file:{id}`, listed by
tasks/batches/listing.py. A batch keeps its own hard link to its input file
(`<files_dir>/batches/<batch id>.jsonl`), so deleting the file does not pull the requests
from under a running batch; the link goes when the batch ends.
"""
from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import redis

from tasks.batches.listing import Listing
from tasks.jobs.log import as_text

FILE_ID = re.compile(r"file-[A-Za-z0-9_-]{1,80}")  # ids are names on disk: nothing else passes
CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class FileRecord:
    id: str
    owner: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    # A batch input file: each url it asks for -> the first line asking for it, and its requests.
    endpoints: dict[str, int] = field(default_factory=dict)
    requests: int = 0

    def to_api(self) -> dict[str, Any]:
        """OpenAI's file object."""
        return {"id": self.id, "object": "file", "bytes": self.bytes,
                "created_at": self.created_at, "filename": self.filename,
                "purpose": self.purpose, "status": "processed", "status_details": None,
                "expires_at": None}

    def to_redis(self) -> dict[str, str | int]:
        return {**asdict(self), "endpoints": json.dumps(self.endpoints)}

    @classmethod
    def from_redis(cls, fields: dict) -> "FileRecord":
        data = {as_text(k): as_text(v) for k, v in fields.items()}
        return cls(**{**data, "bytes": int(data["bytes"]), "created_at": int(data["created_at"]),
                      "requests": int(data["requests"]),
                      "endpoints": json.loads(data["endpoints"])})


def _record_key(file_id: str) -> str:
    return f"dawet:file:{{{file_id}}}"


class FileStore:
    """Files' content in a directory and their records in Redis."""

    def __init__(self, client: redis.Redis, directory: Path):
        self.redis = client
        self.directory = Path(directory)
        self.listing = Listing(client, "dawet:files")

    def path(self, file_id: str) -> Path:
        return self.directory / file_id

    @contextmanager
    def writing(self, file_id: str) -> Iterator[IO[bytes]]:
        """A binary file to write the content of `file_id` into; it replaces any earlier
        content at once, durably, when the block ends without an error."""
        self.directory.mkdir(parents=True, exist_ok=True)
        temporary = self.directory / f".{file_id}.{uuid.uuid4().hex}.part"
        try:
            with temporary.open("wb") as out:
                yield out
                out.flush()
                os.fsync(out.fileno())
            temporary.replace(self.path(file_id))
        finally:
            temporary.unlink(missing_ok=True)

    def write(self, file_id: str, source: IO[bytes]) -> int:
        """Copy a stream into the content of `file_id`; its size in bytes."""
        with self.writing(file_id) as out:
            while chunk := source.read(CHUNK_BYTES):
                out.write(chunk)
            return out.tell()

    def save(self, record: FileRecord) -> None:
        """Record (or record again) a file whose content is written."""
        with self.redis.pipeline() as pipe:
            pipe.hset(_record_key(record.id), mapping=record.to_redis())
            self.listing.add(pipe, record.owner, record.id)
            pipe.execute()

    def get(self, file_id: str) -> FileRecord | None:
        if not FILE_ID.fullmatch(file_id):
            return None
        fields = self.redis.hgetall(_record_key(file_id))
        return FileRecord.from_redis(fields) if fields else None

    def many(self, file_ids: list[str]) -> list[FileRecord]:
        """The records of these files, in one round trip (missing ones left out)."""
        with self.redis.pipeline(transaction=False) as pipe:
            for file_id in file_ids:
                pipe.hgetall(_record_key(file_id))
            return [FileRecord.from_redis(fields) for fields in pipe.execute() if fields]

    def delete(self, record: FileRecord) -> None:
        """Forget the file and remove its content."""
        with self.redis.pipeline() as pipe:
            pipe.delete(_record_key(record.id))
            self.listing.remove(pipe, record.owner, record.id)
            pipe.execute()
        self.discard(record.id)

    def discard(self, file_id: str) -> None:
        """Remove content that has no record (a refused upload, an empty result file)."""
        self.path(file_id).unlink(missing_ok=True)

    def batch_input(self, batch_id: str) -> Path:
        """Where a batch keeps its own link to its input file."""
        return self.directory / "batches" / f"{batch_id}.jsonl"

    def keep_for_batch(self, file_id: str, batch_id: str) -> None:
        """Link the file's content as the batch's input."""
        target = self.batch_input(batch_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(self.path(file_id), target)

    def release_batch_input(self, batch_id: str) -> None:
        self.batch_input(batch_id).unlink(missing_ok=True)
