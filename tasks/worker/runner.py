"""Run one job on an engine and publish its events: status, tokens, then done or error.

A job that an earlier attempt left (its worker died) goes on from where that attempt's reply
stopped: its token events record the ids behind their text, so the new attempt feeds those
ids through a fresh decoder and stop matcher (which then hold back what the old one held
back), and asks the engine only for the rest of the reply, the ids appended to the prompt.
At temperature 0 the reply is the one an uninterrupted run gives.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from model_store.adapters import AdapterUnavailable
from model_store.tokenizer import ChatTokenizer
from tasks.jobs.contract import (INVALID_SCHEMA, DoneEvent, ErrorBody, ErrorEvent, FinishReason,
                                 Job, JobState, SamplingParams, StatusEvent, TokenEvent,
                                 TokenLogprob, Usage)
from tasks.engine.interface import Engine, InvalidSchema, StepLogprobs, TokenStep
from tasks.jobs.log import CancelListener, EventWriteFailed, EventWriter, JobStore, StaleAttempt
from tasks.worker.metrics import in_flight, observe_job
from tasks.worker.textstream import IncrementalDecoder, SpelledTokens, StopMatcher

logger = logging.getLogger(__name__)


class ChunkBuffer:
    """Coalesce a job's text into token events: the first at once, then one per interval.

    Each event carries the ids of every token pushed since the last one, so the log's ids
    always lead to exactly the log's text (plus what the decoder holds back), and, when the
    job asked for them, the log-probabilities of the tokens whose text it completes (None
    when it did not ask)."""

    def __init__(self, send: Callable[[str, tuple[int, ...], tuple[TokenLogprob, ...] | None],
                                      None], interval: float, logprobs: bool = False):
        self._send, self._interval = send, interval
        self._pending, self._ids, self._last_sent = "", [], None
        self._logprobs: list[TokenLogprob] | None = [] if logprobs else None

    def push(self, text: str, ids: Sequence[int] = (),
             logprobs: Sequence[TokenLogprob] = ()) -> None:
        """Add text, the tokens it came from and the log-probabilities it releases; send what
        is pending if this is the first text or the interval has passed."""
        self._pending += text
        self._ids.extend(ids)
        if self._logprobs is not None:
            self._logprobs.extend(logprobs)
        if self._last_sent is None or time.monotonic() - self._last_sent >= self._interval:
            self.flush()

    def flush(self) -> None:
        """Send the pending text (and log-probabilities) now, if there is any."""
        if self._pending or self._logprobs:
            logprobs = None if self._logprobs is None else tuple(self._logprobs)
            self._send(self._pending, tuple(self._ids), logprobs)
            self._pending, self._ids, self._last_sent = "", [], time.monotonic()
            self._logprobs = None if self._logprobs is None else []


@dataclass(frozen=True)
class Delivered:
    """The reply that earlier attempts of a job delivered: the ids and text of its tokens."""

    ids: list[int] = field(default_factory=list)
    text: str = ""

    @classmethod
    def from_log(cls, events: list[dict]) -> "Delivered":
        tokens = [event for event in events if event["type"] == "token"]
        return cls([i for event in tokens for i in event.get("ids", ())],
                   "".join(event["text"] for event in tokens))


class StepText:
    """A job's step sink: decode each token, hold back stop sequences, chunk the text out
    (with the log-probabilities of the tokens it spells, when the job asked for them).

    Returns True (stop) on a stop sequence or a cancel; records how the job finished.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str],
                 chunks: ChunkBuffer, cancel: threading.Event,
                 logprobs: LogprobStream | None = None):
        self.decoder, self.stops = IncrementalDecoder(decode), StopMatcher(stop)
        self._chunks, self._cancel, self.logprobs = chunks, cancel, logprobs
        self.completion, self.finish = 0, FinishReason.CANCELLED

    def __call__(self, step: TokenStep) -> bool:
        hit = False
        if step.token_id is not None:
            text, hit = self._take(step.token_id, step.logprobs)
            released = self.logprobs.released(len(text), hit) if self.logprobs else ()
            self._chunks.push(text, (step.token_id,), released)
        finish = FinishReason.STOP_SEQUENCE if hit else step.finish
        if finish is None and self._cancel.is_set():
            finish = FinishReason.CANCELLED
        self.finish = finish or self.finish
        return finish is not None

    def replay(self, delivered: Delivered) -> bool:
        """Take the tokens an earlier attempt delivered (their text is in the log already);
        whether they end the reply (a stop sequence completed before its end was written)."""
        released = []
        for token_id in delivered.ids:
            text, hit = self._take(token_id)
            released.append(text)
            if hit:
                self.finish = FinishReason.STOP_SEQUENCE
                return True
        if "".join(released) != delivered.text:  # a decoder that is not deterministic
            logger.warning("the replayed tokens do not give back the delivered text")
        return False

    def _take(self, token_id: int, logprobs: StepLogprobs | None = None) -> tuple[str, bool]:
        self.completion += 1
        text = self.decoder.push(token_id)
        if self.logprobs is not None:
            self.logprobs.add(text, logprobs)
        return self.stops.feed(text)

    def flush(self) -> None:
        """Release the held-back text at the end of generation, with its log-probabilities."""
        text = self.stops.flush()
        self._chunks.push(text, (), self.logprobs.rest() if self.logprobs else ())


class LogprobStream:
    """A job's token log-probabilities, each released with the last of its token's text
    (a token that a stop sequence withheld is never reported)."""

    # the floor for a log-probability: -inf (a token the grammar forbids) is not JSON
    FLOOR = -9999.0

    def __init__(self, token_text: Callable[[int], str]):
        self._token_text, self._tokens = token_text, SpelledTokens()

    def add(self, text: str, logprobs: StepLogprobs | None) -> None:
        """A decoded token; None for a replayed one, whose log-probabilities are not known."""
        self._tokens.add(text, logprobs)

    def released(self, size: int, stopped: bool) -> tuple[TokenLogprob, ...]:
        """The tokens that `size` more released characters completed; at a stop sequence, also
        the token it cut (reported with its text up to the stop)."""
        return self._entries(self._tokens.cut(size) if stopped else self._tokens.release(size))

    def rest(self) -> tuple[TokenLogprob, ...]:
        return self._entries(self._tokens.rest())

    def _entries(self, tokens: list[tuple[str, StepLogprobs | None]]
                 ) -> tuple[TokenLogprob, ...]:
        return tuple(TokenLogprob(text, max(lp.logprob, self.FLOOR),
                                  tuple((self._token_text(token), max(value, self.FLOOR))
                                        for token, value in lp.top))
                     for text, lp in tokens if lp is not None)


@dataclass
class Clock:
    """Wall-clock marks for a job's timings (created_at comes from the API)."""

    created: float
    resumed_tokens: int = 0  # tokens an earlier attempt generated: not timed here
    started: float = field(default_factory=time.time)
    first_token: float | None = None

    def timings(self, completion_tokens: int) -> dict[str, float]:
        ended = time.time()
        decode_seconds = ended - (self.first_token or ended)
        completion_tokens -= self.resumed_tokens
        return {
            "queued_seconds": round(self.started - self.created, 4),
            "time_to_first_token_seconds": round((self.first_token or ended) - self.created, 4),
            "generation_seconds": round(ended - self.started, 4),
            "total_seconds": round(ended - self.created, 4),
            "tokens_per_second": round((completion_tokens - 1) / decode_seconds, 2)
            if completion_tokens > 1 and decode_seconds > 0 else 0.0,
        }


class JobRunner:
    """Runs jobs for one worker process; safe to call from many threads at once."""

    def __init__(self, store: JobStore, engine: Engine, tokenizer: ChatTokenizer,
                 worker_name: str, chunk_seconds: float = 0.0,
                 cancels: CancelListener | None = None):
        self._store, self._engine, self._tokenizer = store, engine, tokenizer
        self._worker_name, self._chunk_seconds = worker_name, chunk_seconds
        self._cancels = cancels  # without it, only a cancel requested before the start counts
        self._events = EventWriter(store)  # token events; status and terminal ones go direct

    def run(self, job: Job, fence: int = 0) -> None:
        """Run a job to its end as attempt `fence` (0: unfenced); every failure becomes an error
        event, never an exception (a lost Redis aside: the guard hands the job back). A stale
        attempt stops as soon as its log refuses a write."""
        with self._cancel_event(job.id) as cancel:  # watched first: no cancel slips past
            start = self._store.start(job.id, StatusEvent(JobState.STARTED, self._worker_name),
                                      fence)
            if start.ended_before or start.fenced:
                logger.info("job %s ended or runs elsewhere; skipping this task", job.id)
                return
            if start.cancel_requested:
                cancel.set()
            delivered = self._delivered(job.id, fence)
            clock = Clock(created=job.created_at, resumed_tokens=len(delivered.ids))
            with in_flight(clock):
                outcome = self._outcome(job, fence, clock, cancel, delivered)
        if outcome is None:
            return
        observe_job(job, outcome, len(delivered.ids))  # before the terminal event: counted
        if self._store.append(job.id, outcome, fence) is None:
            logger.warning("job %s: its log refused attempt %d's end; another attempt has it",
                           job.id, fence)

    def _delivered(self, job_id: str, fence: int) -> Delivered:
        """What earlier attempts delivered; the first (fence 1) or an unfenced run has none."""
        return Delivered.from_log(self._store.read(job_id)) if fence > 1 else Delivered()

    def interrupt(self, job_id: str) -> None:
        """Stop the job's generation at its next step (this worker lost its lease)."""
        if self._cancels is not None:
            self._cancels.interrupt(job_id)

    def _outcome(self, job: Job, fence: int, clock: Clock, cancel: threading.Event,
                 delivered: Delivered) -> DoneEvent | ErrorEvent | None:
        """Generate, and describe how it ended as the job's terminal event; None if the log
        refused this attempt (its lease was reaped): it must write nothing more."""
        vocab_size = self._tokenizer.vocab_size
        if not all(0 <= token < vocab_size for token in job.prompt_token_ids):
            return ErrorEvent(ErrorBody("the prompt holds token ids outside the model's vocabulary",
                                        "invalid_request_error", "invalid_prompt_tokens"))
        try:
            finish, usage = self._generate(job, fence, clock, cancel, delivered)
        except StaleAttempt:
            logger.warning("job %s: attempt %d was fenced out; stopped it", job.id, fence)
            return None
        except EventWriteFailed:
            raise  # Redis is lost: the guard hands the job back rather than fail it
        except InvalidSchema as exc:  # the engine could not compile the job's JSON Schema
            logger.info("job %s: %s", job.id, exc)
            return ErrorEvent(ErrorBody(str(exc), "invalid_request_error", INVALID_SCHEMA,
                                        "response_format"))
        except AdapterUnavailable as exc:  # the engine could not load the job's LoRA adapter
            logger.warning("job %s: %s", job.id, exc)
            return ErrorEvent(ErrorBody(str(exc), "invalid_request_error", "adapter_unavailable",
                                        "model"))
        except Exception as exc:  # the boundary: the worker must go on serving
            logger.exception("job %s failed", job.id)
            return ErrorEvent(ErrorBody(f"generation failed: {type(exc).__name__}",
                                        "server_error", "generation_failed"))
        return DoneEvent(finish, usage, clock.timings(usage.completion_tokens))

    def _generate(self, job: Job, fence: int, clock: Clock, cancel: threading.Event,
                  delivered: Delivered) -> tuple[FinishReason, Usage]:
        """Stream tokens as events until the engine, a stop sequence or a cancel ends the job."""
        chunks = ChunkBuffer(
            lambda text, ids, logprobs: self._emit(job.id, fence, text, ids, logprobs, clock),
            self._chunk_seconds, logprobs=job.params.logprobs is not None)
        try:
            finish, completion = FinishReason.CANCELLED, len(delivered.ids)
            if not cancel.is_set():
                finish, completion = self._decode(job, chunks, cancel, delivered)
            chunks.flush()
        finally:
            self._events.flush(job.id, fence)  # every token is in the log before the terminal event
        return finish, Usage(len(job.prompt_token_ids), completion)

    def _decode(self, job: Job, chunks: ChunkBuffer, cancel: threading.Event,
                delivered: Delivered) -> tuple[FinishReason, int]:
        """Run the job on the engine, its steps going through the decoder and stop matcher;
        after what earlier attempts delivered, only the rest of the reply."""
        logprobs = (LogprobStream(self._tokenizer.token_text)
                    if job.params.logprobs is not None else None)
        steps = StepText(self._tokenizer.decode, job.params.stop, chunks, cancel, logprobs)
        if not steps.replay(delivered):
            rest = remaining(job.params, delivered.ids)
            if rest is None:
                steps.finish = FinishReason.LENGTH
            else:
                self._engine.run(job.prompt_token_ids + delivered.ids, rest, cancel, steps)
        steps.flush()
        return steps.finish, steps.completion

    @contextmanager
    def _cancel_event(self, job_id: str) -> Iterator[threading.Event]:
        """An event set once a cancel for the job is requested while it runs (one requested
        before is read with the job's start)."""
        if self._cancels is None:
            yield threading.Event()
            return
        event = self._cancels.watch(job_id)
        try:
            yield event
        finally:
            self._cancels.unwatch(job_id, event)

    def _emit(self, job_id: str, fence: int, text: str, ids: tuple[int, ...],
              logprobs: tuple[TokenLogprob, ...] | None, clock: Clock) -> None:
        if text or logprobs:
            clock.first_token = clock.first_token or time.time()
            self._events.send(job_id, fence, TokenEvent(text, ids, logprobs))


def remaining(params: SamplingParams, written: Sequence[int]) -> SamplingParams | None:
    """The parameters for the rest of a reply of which the tokens `written` exist (a JSON
    reply's grammar resumes after them); None when nothing is left to generate."""
    produced = len(written)
    if produced == 0:
        return params
    if produced >= params.max_new_tokens:
        return None
    update = {"max_new_tokens": params.max_new_tokens - produced,
              "min_new_tokens": max(0, params.min_new_tokens - produced)}
    if params.json_schema is not None:
        update["json_written_ids"] = params.json_written_ids + tuple(written)
    return params.model_copy(update=update)
