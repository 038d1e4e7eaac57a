"""The batch dispatcher: a loop in every API process that drives batches to their end.

One dispatcher holds a batch at a time: a lease in Redis whose fencing number every write of
the holder carries (tasks/batches/store.py). The holder runs the batch's lines in order, each
as a job on the batch lane (Lane.BATCH: the broker hands a worker a batch line only when no
interactive job waits) through the API's own submission path, with at most
DAWET_BATCH_MAX_IN_FLIGHT lines per model queued or running over all batches. A line's job id
is derived from (batch id, line index), and its result is read from the job's event log once
the log ends, then recorded once. When every line has a result, the output and error files
are written under ids derived from the batch id, and a status change publishes them.

Nothing lives only in this process. A dispatcher that dies leaves its lease to lapse, and
another one (in any API process, after any restart) takes the batch up where it stopped: a
line it reserved but whose job it never created gets its job; a job that may never have
reached the queue is sent again (a worker skips a job that ran or runs); files it was writing
are written again, whole, before the status moves.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from flask import Flask
from pydantic import ValidationError

from api.errors import APIError, from_validation_error, invalid
from api.keys import Principal
from api.offload import off_loop
from api.openai import ChatShape, Reply, TextShape, token_logprobs, tool_plan, with_tools
from api.schemas import ChatCompletionRequest, CompletionRequest
from api.services import Services
from dawet.redis_client import redis_client
from model_store.registry import ModelSpec
from tasks.batches.contract import (OUTPUT_PURPOSE, UNRUN_ERRORS, BatchStatus, error_line,
                                    line_job_id, output_line, result_file_id)
from tasks.batches.files import FileRecord
from tasks.batches.input import InputLines
from tasks.batches.store import WAKE_CHANNEL, BatchRecord, Fenced, Hold
from tasks.jobs.background import survive
from tasks.jobs.contract import (TERMINAL_TYPES, FinishReason, JobView, Lane, SamplingParams,
                                 is_terminal)
from tasks.jobs.log import as_text, wake_channel
from tasks.worker.app import send_job

logger = logging.getLogger(__name__)

# What a batch's lines are parsed as, and how their responses are shaped, by endpoint.
ENDPOINTS = {"/v1/chat/completions": (ChatCompletionRequest, ChatShape),
             "/v1/completions": (CompletionRequest, TextShape)}
RESULTS_CHUNK = 1000  # lines read from Redis per round trip while writing the result files
RETRY_SECONDS = 1.0  # after the loop lost Redis
NO_RESULT = ("internal_error", "the request has no recorded result")  # never expected
CANCELLED_JOB = ("cancelled", "the request's job was cancelled before it completed")
Prepared = tuple[ModelSpec, list[int], SamplingParams]


def start_dispatcher(app: Flask, alive: Callable[[], bool]) -> None:
    """Run a dispatcher on a daemon thread of this API process (a greenlet under gevent) while
    `alive()`: a process shutting down hands its batches over at once."""
    threading.Thread(target=Dispatcher(app, alive).run, name="dawet-batches",
                     daemon=True).start()


class BatchRun:
    """One batch that this dispatcher holds: it dispatches the batch's lines, records their
    results and ends the batch. `over` once the batch ended or another dispatcher took it."""

    def __init__(self, svc: Services, hold: Hold, watch: Callable[[str], None]):
        self.svc, self.hold, self._watch = svc, hold, watch
        self.id = hold.batch_id
        self.store = svc.batches
        self.lines: InputLines | None = None
        self.jobs: set[str] = set()  # the jobs of lines in flight, watched for their end
        self.over = False

    def advance(self) -> None:
        """Take the batch as far towards its end as it can go now."""
        try:
            record = self.store.get(self.id)
            if record is None or record.status.ended:
                self.over = True
            elif self.lines is not None or self._open(record):
                self._step(record)
        except Fenced:
            logger.info("batch %s: another dispatcher holds it now", self.id)
            self.over = True

    def _step(self, record: BatchRecord) -> None:
        status = record.status
        if status in (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS) \
                and time.time() >= record.expires_at:
            self._close(record, BatchStatus.EXPIRED)
        elif status is BatchStatus.VALIDATING:
            if self.store.transition(self.hold, (status,), BatchStatus.IN_PROGRESS):
                self._step(self.store.get(self.id))
        elif status is BatchStatus.IN_PROGRESS:
            self._progress(record)
        elif status is BatchStatus.CANCELLING:
            self._close(record, BatchStatus.CANCELLED)
        elif status is BatchStatus.FINALIZING:
            self._finish(record, BatchStatus.COMPLETED)

    def _open(self, record: BatchRecord) -> bool:
        """Read the batch's input (a batch whose input is gone fails) and whom it runs as."""
        try:
            self.lines = off_loop(InputLines, self.svc.files.batch_input(self.id))
        except OSError:
            error = {"code": "input_file_missing", "line": None, "param": "input_file_id",
                     "message": f"the batch's copy of {record.input_file_id} is missing from "
                                "the files directory"}
            self.store.transition(self.hold, (record.status,), BatchStatus.FAILED,
                                  errors=json.dumps([error]))
            self.over = True
            return False
        self.who = Principal.from_json(record.principal)
        self.schema, self.shape = ENDPOINTS[record.endpoint]
        return True

    def _progress(self, record: BatchRecord) -> None:
        """Record the lines that ended, dispatch more, and finalize once every line is done."""
        running = self._harvest()
        cursor = self._dispatch(record)
        if cursor >= record.total and not running and not self.jobs:
            if self.store.transition(self.hold, (BatchStatus.IN_PROGRESS,),
                                     BatchStatus.FINALIZING):
                self._finish(self.store.get(self.id), BatchStatus.COMPLETED)

    def _dispatch(self, record: BatchRecord) -> int:
        """Dispatch lines from the cursor while their model has a free slot; the new cursor."""
        for index in range(record.cursor, record.total):
            prepared = self._prepare(index, dispatched=False)
            if prepared is None:
                continue  # refused: its error line is recorded and the cursor moved past it
            spec = prepared[0]
            if not self.store.reserve(self.hold, index, spec.name,
                                      self.svc.settings.batch_max_in_flight):
                return index
            self._send(index, prepared)
        return record.total

    def _prepare(self, index: int, dispatched: bool, model: str = "") -> Prepared | None:
        """Check line `index` as its endpoint would: its model, prompt ids and parameters.
        None when it is refused; its error line is then recorded."""
        line = self.lines[index]
        try:
            body = self.schema.model_validate_json(json.dumps(line.body))
            if body.stream:
                raise invalid("a batch request cannot stream; leave stream out", param="stream")
            return self.svc.prepare(self.who, with_tools(self.svc, body)[0])
        except (APIError, ValidationError) as exc:
            error = exc.body if isinstance(exc, APIError) else from_validation_error(exc).body
            self.store.settle(self.hold, index, error_line(line_job_id(self.id, index),
                                                           line.custom_id, error.code,
                                                           error.message),
                              ok=False, model=model, dispatched=dispatched)
            return None

    def _send(self, index: int, prepared: Prepared) -> None:
        """Queue the reserved line's job on the batch lane, charged to the batch's key."""
        spec, prompt_ids, params = prepared
        job_id = line_job_id(self.id, index)
        self._watch(job_id)  # before it can end, so its end wakes us
        self.jobs.add(job_id)
        try:
            self.svc.enqueue_charged(self.who, spec, prompt_ids, params, id=job_id,
                                     lane=Lane.BATCH)
        except APIError as exc:  # the key's daily token budget
            line = error_line(job_id, self.lines[index].custom_id, exc.body.code,
                              exc.body.message)
            self.store.settle(self.hold, index, line, ok=False, model=spec.name)
            self.jobs.discard(job_id)
            return
        self.store.mark_sent(self.id, index, spec.name)

    def _harvest(self, closing: bool = False) -> dict[int, tuple[str, float]]:
        """Record the result of each line in flight whose job's log has ended, and make sure
        the others' jobs are queued; the lines still in flight. Closing, a job that ended
        cancelled is left to the batch's own error line."""
        running = self.store.running(self.id)
        for index, (model, sent_at) in list(running.items()):
            job_id = line_job_id(self.id, index)
            last = self.svc.store.last_event(job_id)
            if last is not None and is_terminal(last):
                if not (closing and last.get("finish_reason") == FinishReason.CANCELLED.value):
                    self._record(index, job_id, model)
                    del running[index]
            elif not closing:
                self._keep_queued(index, model, sent_at, last)
        self.jobs = {line_job_id(self.id, index) for index in running}
        return running

    def _keep_queued(self, index: int, model: str, sent_at: float,
                     last: dict[str, Any] | None) -> None:
        """A line in flight whose job an earlier holder never created gets it; one that may
        never have been sent, or waits past DAWET_BATCH_RESEND_SECONDS, is sent again."""
        job_id = line_job_id(self.id, index)
        if last is None:
            prepared = self._prepare(index, dispatched=True, model=model)
            if prepared is not None:
                self._send(index, prepared)
            return
        waiting = last["type"] == "status" and last["state"] == "queued"
        if sent_at == 0 or (waiting and time.time() - sent_at
                            > self.svc.settings.batch_resend_seconds):
            job = self.svc.store.load(job_id)
            send_job(self.svc.celery, job, self.svc.model(job.model).queue)
            self.store.mark_sent(self.id, index, model)

    def _record(self, index: int, job_id: str, model: str) -> None:
        """Record line `index`'s output or error line from its job's event log."""
        events = self.svc.store.read(job_id)
        custom_id, last = self.lines[index].custom_id, events[-1]
        if last["type"] == "error":
            error = last["error"]
            line, ok = error_line(job_id, custom_id, error["code"], error["message"]), False
        elif last["finish_reason"] == FinishReason.CANCELLED.value:
            line, ok = error_line(job_id, custom_id, *CANCELLED_JOB), False
        else:
            line, ok = output_line(job_id, custom_id, self._response(index, job_id, events)), True
        self.store.settle(self.hold, index, line, ok, model=model)

    def _response(self, index: int, job_id: str, events: list[dict[str, Any]]) -> dict[str, Any]:
        """The completion object the endpoint would have answered with (its tool calls read
        as the line's tools say)."""
        view = JobView(job_id)  # the one fold of events (a restarted job's reply goes on)
        for event in events:
            view.apply(event)
        tokens = [event for event in events if event["type"] == "token"]
        body = self.schema.model_validate_json(json.dumps(self.lines[index].body))
        reply = Reply(self.shape, self.svc.store.load(job_id), tools=tool_plan(self.svc, body))
        return reply.whole(view.text, events[-1], token_logprobs(tokens))

    def _close(self, record: BatchRecord, target: BatchStatus) -> None:
        """End the batch early (expired or cancelled): lines that finished keep their results,
        running ones are stopped, and every other line gets an error line."""
        for index in self._harvest(closing=True):
            self.svc.store.cancel(line_job_id(self.id, index))
        self._finish(record, target)

    def _finish(self, record: BatchRecord, target: BatchStatus) -> None:
        """Write the output and error files, then move the batch to `target` with them."""
        published = self._write_results(record, target)
        if self.store.transition(self.hold, (record.status,), target, **published):
            self.svc.files.release_batch_input(self.id)
            self.over = True
            logger.info("batch %s %s: %d completed, %d failed", self.id, target.value,
                        published["completed"], published["failed"])

    def _write_results(self, record: BatchRecord, target: BatchStatus) -> dict[str, Any]:
        """Write every line's result, in input order, to the output or the error file; the
        files' ids (None for an empty one) and the counts."""
        files, unrun = self.svc.files, UNRUN_ERRORS.get(target, NO_RESULT)
        output_id, error_id = result_file_id(self.id, "output"), result_file_id(self.id, "errors")
        counts = {"completed": 0, "failed": 0}
        with files.writing(output_id) as output, files.writing(error_id) as errors:
            for first in range(0, record.total, RESULTS_CHUNK):
                last = min(first + RESULTS_CHUNK, record.total)
                results = self.store.results(self.id, first, last)
                custom_ids = self.lines.custom_ids(first, last) if None in results else []
                for offset, line in enumerate(results):
                    if line is None:
                        line = error_line(line_job_id(self.id, first + offset),
                                          custom_ids[offset], *unrun)
                    ok = line["response"] is not None
                    (output if ok else errors).write(json.dumps(line).encode() + b"\n")
                    counts["completed" if ok else "failed"] += 1
            sizes = output.tell(), errors.tell()
        return {"output_file_id": self._publish(record, output_id, sizes[0]),
                "error_file_id": self._publish(record, error_id, sizes[1]), **counts}

    def _publish(self, record: BatchRecord, file_id: str, size: int) -> str | None:
        """Record a written result file for the batch's key; an empty one is no file."""
        files = self.svc.files
        if size == 0:
            stale = files.get(file_id)  # from an attempt that ended the batch otherwise
            files.delete(stale) if stale else files.discard(file_id)
            return None
        files.save(FileRecord(file_id, record.owner, f"{file_id}.jsonl", OUTPUT_PURPOSE, size,
                              int(time.time())))
        return file_id


class Dispatcher:
    """Takes up every batch no live dispatcher holds and advances the ones it holds, whenever
    a line's job ends, a batch is created or cancelled, or DAWET_BATCH_POLL_SECONDS pass."""

    def __init__(self, app: Flask, alive: Callable[[], bool]):
        self._app, self._alive = app, alive
        self._svc: Services = app.extensions["dawet"]
        self._holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._runs: dict[str, BatchRun] = {}
        client = redis_client(self._svc.settings)
        self._pubsub = client.pubsub(ignore_subscribe_messages=True)  # a connection of its own
        self._watched: set[str] = set()
        self._next_lease_beat = 0.0

    def run(self) -> None:
        """Serve while the process lives (a lost Redis is retried), then let go of the
        batches, so that another dispatcher takes them up without waiting for the leases."""
        with self._app.app_context():  # Services.enqueue notes admissions on flask.g
            while self._alive():
                if not survive("batches", self._serve):
                    time.sleep(RETRY_SECONDS)
            for run in list(self._runs.values()):
                survive("batches", lambda: self._drop(run))

    def _serve(self) -> None:
        self._pubsub.subscribe(WAKE_CHANNEL)
        while self._alive():
            self._tick()
            self._wait(self._svc.settings.batch_poll_seconds)

    def _tick(self) -> None:
        settings = self._svc.settings
        if time.monotonic() >= self._next_lease_beat:
            self._renew()
            self._claim()
            self._next_lease_beat = time.monotonic() + min(settings.batch_poll_seconds,
                                                           settings.batch_lease_seconds / 3)
        for run in list(self._runs.values()):
            survive("batches", run.advance)
            if run.over:
                self._drop(run)
        self._unwatch_ended()

    def _renew(self) -> None:
        """Extend this dispatcher's holds; a lost one is dropped without another write."""
        for run in list(self._runs.values()):
            if not self._svc.batches.renew(run.hold, self._svc.settings.batch_lease_seconds):
                logger.warning("batch %s: lost its lease; another dispatcher takes it", run.id)
                del self._runs[run.id]

    def _claim(self) -> None:
        """Hold every active batch that no live dispatcher holds."""
        for batch_id in self._svc.batches.active_ids():
            if batch_id in self._runs:
                continue
            hold = self._svc.batches.claim(batch_id, self._holder,
                                           self._svc.settings.batch_lease_seconds)
            if hold is not None:
                logger.info("batch %s: taken up (hold %d)", batch_id, hold.fence)
                self._runs[batch_id] = BatchRun(self._svc, hold, self._watch)

    def _drop(self, run: BatchRun) -> None:
        self._runs.pop(run.id, None)
        self._svc.batches.release(run.hold)

    def _watch(self, job_id: str) -> None:
        """Be woken by the job's events (its end is what counts)."""
        if job_id not in self._watched:
            self._pubsub.subscribe(wake_channel(job_id))
            self._watched.add(job_id)

    def _unwatch_ended(self) -> None:
        wanted = set().union(*(run.jobs for run in self._runs.values()))
        ended = self._watched - wanted
        if ended:
            self._pubsub.unsubscribe(*map(wake_channel, ended))
            self._watched -= ended

    def _wait(self, seconds: float) -> None:
        """Until a watched job ends, a batch is created or cancelled, or `seconds` pass."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            message = self._pubsub.get_message(timeout=left)
            if message is not None and _wakes(message):
                return


def _wakes(message: dict[str, Any]) -> bool:
    """Whether a pub/sub message calls for a tick: a batch's news, or a watched job's end
    (an append publishes "<seq> <event>", tasks/jobs/log.py)."""
    if message["type"] != "message":
        return False
    if as_text(message["channel"]) == WAKE_CHANNEL:
        return True
    _, _, raw = as_text(message["data"]).partition(" ")
    return json.loads(raw)["type"] in TERMINAL_TYPES
