"""The API's connections and the job submission path, one instance per app."""
from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import redis
from celery import Celery
from flask import current_app

from api.adapter_store import AdapterStore
from api.admission import Admission, IdempotencyKey, too_many
from api.broker import JobQueue, WithJob, in_order
from api.conversations import ConversationStore
from api.errors import APIError, invalid, job_not_found
from api.keys import KeyRing, KeyStore, Principal
from api.metrics import note_admitted
from api.offload import off_loop
from api.response_store import ResponseStore
from api.schemas import GenerationRequest, PromptInput
from dawet.redis_client import failover_seconds, redis_client, replica_wait_seconds
from dawet.settings import Settings
from model_store.registry import ModelSpec, Registry, load_registry
from model_store.tokenizer import ChatTemplateError, ChatTokenizer, Message
from tasks.batches.files import FileStore
from tasks.batches.store import BatchStore
from tasks.worker.app import create_celery
from tasks.jobs.contract import (Charge, ErrorBody, ErrorEvent, Job, LoraAdapter,
                                 SamplingParams)
from tasks.jobs.feed import JobFeed, JobNotFound, StreamIdle, follow
from tasks.jobs.log import JobStore
from tasks.jobs.usage import DAY_SECONDS, BudgetExceeded, UsageBook, today
from tasks.jobs.workers import WorkerRegistry

STREAM_IDLE = ErrorBody("no event from the worker within the stream idle timeout",
                        "server_error", "stream_timeout")
LOG_LOST = ErrorBody("lost the job's event log (Redis is unreachable); see GET /v1/jobs/<id> "
                     "once it is back", "server_error", "service_unavailable")
RESUME_SECONDS = 0.5  # between tries of a stream to read on after losing Redis
logger = logging.getLogger(__name__)


class Services:
    """Registry, Redis job store, job feed, worker records and the Celery producer."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.registry: Registry = load_registry(settings.models_file, settings.default_model)
        self.redis = redis_client(settings, socket_timeout=5, socket_connect_timeout=2)
        self.store = JobStore(self.redis, settings.job_ttl_seconds,
                              replica_wait=replica_wait_seconds(settings))
        self.feed = JobFeed(redis_client(settings))
        self.workers = WorkerRegistry(self.redis, settings.heartbeat_seconds)
        self.conversations = ConversationStore(self.redis, settings.conversation_ttl_seconds)
        self.responses = ResponseStore(self.redis, self.store, settings.response_ttl_seconds)
        self.celery: Celery = create_celery(settings)
        self.queue = JobQueue(settings, self.store, self.celery)
        self.admission = Admission(settings, self.redis, self.celery)
        self.keys = KeyRing(settings, KeyStore(self.redis))
        self.usage = UsageBook(self.redis, settings.usage_retention_days)
        self.files = FileStore(self.redis, settings.files_dir)
        self.batches = BatchStore(self.redis)
        self.adapters = AdapterStore(self.redis, self.registry)
        self._tokenizers: dict[str, ChatTokenizer] = {}
        self._lock = threading.Lock()
        self.started_at = int(time.time())

    def model(self, name: str | None) -> ModelSpec:
        """The named model (in the registry, or an adapter added at run time), or a 404 in the
        envelope."""
        spec = self.registry.get(name)
        if spec is None and name:
            spec = self.adapters.spec(name)
        if spec is None:
            raise self._missing_model(name)
        return spec

    @staticmethod
    def _missing_model(name: str | None) -> APIError:
        return APIError(404, f"model {name!r} does not exist; see the registry",
                        "model_not_found", param="model")

    def usable_models(self, who: Principal) -> list[ModelSpec]:
        """The models that `who` may use: the registry's, then the adapters added at run time."""
        specs = [*self.registry.models.values(), *self.adapters.specs()]
        return [spec for spec in specs if who.may_use(spec.name)]

    def usable_model(self, who: Principal, name: str | None) -> ModelSpec:
        """As `model`, but a model that `who` may not use is as good as missing."""
        spec = self.model(name)
        if not who.may_use(spec.name):
            raise self._missing_model(name)
        return spec

    def tokenizer(self, spec: ModelSpec) -> ChatTokenizer:
        """The model's tokenizer (its base weights'), loaded on first use."""
        with self._lock:
            if spec.path not in self._tokenizers:
                self._tokenizers[spec.path] = ChatTokenizer(spec.path)
            return self._tokenizers[spec.path]

    def submit_generation(self, who: Principal, request: GenerationRequest,
                          require_worker: bool = False,
                          idempotency: IdempotencyKey | None = None) -> Job:
        """Validate against the model, admit, then record and queue the job for `who`.

        With `require_worker`, answer 503 rather than queue for a model no live worker serves.
        A repeated Idempotency-Key (`idempotency`: the HTTP request's header, or a job socket's
        submit frame's) returns the job it first created.
        """
        job_id = uuid.uuid4().hex
        existing = self.admission.claim_idempotency_key(idempotency, job_id)
        if existing is not None:
            return self._replayed(existing)
        confirm = None  # the key's confirmation, in the job's MULTI where the queue has one
        if idempotency is not None and self.queue.atomic:
            confirm = functools.partial(self.admission.confirm_idempotency_key, idempotency,
                                        job_id)
        try:
            job = self._admit(who, request, require_worker, job_id, confirm)
        except BaseException:
            self.admission.release_idempotency_key(idempotency)
            raise
        if confirm is None:
            self.admission.confirm_idempotency_key(idempotency, job.id)
        return job

    def _admit(self, who: Principal, request: GenerationRequest, require_worker: bool,
               job_id: str, with_job: WithJob | None = None) -> Job:
        """Check the request against the model and the limits, then queue it as `job_id`
        (with `with_job`, as `enqueue_charged` takes it)."""
        spec, prompt_ids, params = self.prepare(who, request)
        if require_worker and not self.workers.serves(spec.served_by):
            raise APIError(503, f"no worker serves model {spec.name} right now; retry shortly",
                           "model_unavailable", "service_unavailable", param="model")
        if self.settings.log_prompts:
            logger.info("job %s prompt: %r", job_id, request.prompt_input())
        return self.admit(who, spec, prompt_ids, params,
                          getattr(request, "deadline_seconds", None), with_job, id=job_id)

    def prepare(self, who: Principal, request: GenerationRequest
                ) -> tuple[ModelSpec, list[int], SamplingParams]:
        """Check a request against its model and `who`'s model scope: the model, the prompt's
        token ids and the sampling parameters."""
        spec = self.model(request.model)
        self.admission.check_model_access(who, spec)
        params = request.sampling_params(spec)
        prompt = request.prompt_input()
        prompt_ids = self.prompt_ids(spec, prompt)
        check_context(spec, len(prompt_ids), params, prompt.param)
        return spec, prompt_ids, params

    def admit(self, who: Principal, spec: ModelSpec, prompt_ids: list[int],
              params: SamplingParams, deadline_seconds: float | None = None,
              with_job: WithJob | None = None, **fields: Any) -> Job:
        """Apply the rate and queue limits, then queue the job as `enqueue_charged` does."""
        self.admission.check_rate(len(prompt_ids) + params.max_new_tokens)
        self.admission.check_queue(spec)
        return self.enqueue_charged(who, spec, prompt_ids, params, deadline_seconds, with_job,
                                    **fields)

    def enqueue_charged(self, who: Principal, spec: ModelSpec, prompt_ids: list[int],
                        params: SamplingParams, deadline_seconds: float | None = None,
                        with_job: WithJob | None = None, **fields: Any) -> Job:
        """Hold the job's cost against `who`'s daily budget, then queue the job with its start
        deadline, owned by `who`, and `with_job` in its MULTI (only where the queue is atomic).
        Batch lines come here directly: the dispatcher bounds them.

        A key without a budget has a hold that nothing refuses: where the queue writes a job
        in one MULTI, the hold goes into it, a round trip less (with the job or not at all, so
        there is nothing to refund)."""
        cost = len(prompt_ids) + params.max_new_tokens
        seconds = deadline_seconds or self.settings.default_deadline_seconds
        fields.update(owner=who.name, deadline_at=time.time() + seconds if seconds else None)
        if self.queue.atomic and not who.budget(self.settings.daily_token_budget):
            charge = Charge(day=today(), held=cost)
            hold = functools.partial(self.usage.hold_in, owner=who.name, model=spec.name,
                                     charge=charge)
            return self.enqueue(spec, prompt_ids, params, charge=charge,
                                with_job=in_order(hold, with_job), **fields)
        charge = self._charge(who, spec, cost)
        try:
            return self.enqueue(spec, prompt_ids, params, charge=charge, with_job=with_job,
                                **fields)
        except BaseException:
            self._refund(who, spec, charge)
            raise

    def _refund(self, who: Principal, spec: ModelSpec, charge: Charge) -> None:
        try:
            self.usage.refund(who.name, spec.name, charge)
        except redis.RedisError:
            logger.warning("could not refund a request of key %s; its hold lasts the day",
                           who.name)

    def _charge(self, who: Principal, spec: ModelSpec, cost: int) -> Charge:
        """Count the request against `who`'s usage and hold its cost against the daily budget."""
        budget = who.budget(self.settings.daily_token_budget)
        try:
            return self.usage.admit(who.name, spec.name, cost, budget)
        except BudgetExceeded:
            raise too_many(f"key {who.name!r} has spent its daily budget of {budget} tokens, or "
                           f"this request's {cost} tokens (prompt + max tokens) would pass it",
                           "budget_exceeded", DAY_SECONDS - time.time() % DAY_SECONDS,
                           type="insufficient_quota") from None

    def _replayed(self, job_id: str) -> Job:
        """The job an earlier request with the same Idempotency-Key created."""
        job = self.store.load(job_id)
        if job is None:
            raise APIError(409, "the job of this Idempotency-Key has expired; use a new key",
                           "idempotency_key_expired")
        return job

    def enqueue(self, spec: ModelSpec, prompt_ids: list[int], params: SamplingParams,
                with_job: WithJob | None = None, **fields: Any) -> Job:
        """Record the job with a `queued` event, then send it to the model's queue (JobQueue.put,
        with `with_job`); an adapter's job names the adapter its base's worker applies."""
        if spec.lora:
            params = params.model_copy(update={"lora": LoraAdapter(
                name=spec.name, path=spec.lora, base=spec.served_by)})
        job = Job(model=spec.name, prompt_token_ids=prompt_ids, params=params, **fields)
        self.queue.put(job, spec.queue, with_job)
        self.store.replicate(job.id)  # the record and the message, before the client hears of it
        note_admitted(spec.name)
        return job

    def events(self, job_id: str, after: int = 0) -> Iterator[dict[str, Any]]:
        """A job's events after `after` until done or error; going idle ends with an error.
        Raises a 404 APIError for an unknown job. A lost Redis ends it with an error too,
        unless Redis is back within `failover_seconds` (a sentinel failover): then it reads
        on after the last event it gave, so nothing is given twice or skipped."""
        lost_at = None
        while True:
            try:
                for event in follow(self.store, self.feed, job_id, after,
                                    self.settings.stream_idle_timeout_seconds):
                    after, lost_at = event["seq"], None
                    yield event
                return
            except JobNotFound:
                raise job_not_found(job_id) from None
            except StreamIdle:
                yield ErrorEvent(STREAM_IDLE).to_dict()
                return
            except redis.RedisError:
                lost_at = lost_at or time.monotonic()
                if time.monotonic() - lost_at >= failover_seconds(self.settings):
                    logger.warning("lost Redis while following job %s", job_id)
                    yield ErrorEvent(LOG_LOST).to_dict()
                    return
                logger.info("lost Redis while following job %s; reading on after event %d "
                            "once it is back", job_id, after)
                time.sleep(RESUME_SECONDS)

    def visible_job(self, who: Principal, job_id: str) -> str:
        """`job_id` if the job exists and `who` may see it, else a 404 (whether it exists or
        not, so that another key's job is not revealed)."""
        exists, owner = self.store.owner(job_id)
        if not (exists and who.may_see(owner)):
            raise job_not_found(job_id)
        return job_id

    def chat_prompt_ids(self, spec: ModelSpec, messages: list[Message],
                        system_prompt: str | None = None, param: str = "messages",
                        tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Render messages (and tools) with the model's chat template and system prompt, then
        encode them."""
        tokenizer = self.tokenizer(spec)
        system_prompt = system_prompt or spec.system_prompt
        try:
            return off_loop(_render_and_encode, tokenizer, messages, system_prompt, tools,
                            chars=_chat_chars(messages, system_prompt, tools))
        except ChatTemplateError as exc:
            raise APIError(422, f"the chat template of model {spec.name} refuses these "
                           f"messages: {exc}", "chat_template_error", param=param) from exc

    def prompt_ids(self, spec: ModelSpec, prompt: PromptInput) -> list[int]:
        """The token ids a generation from `prompt` is given."""
        if prompt.text is None:
            return self.chat_prompt_ids(spec, list(prompt.messages), prompt.system_prompt,
                                        prompt.param, list(prompt.tools))
        return off_loop(self.tokenizer(spec).encode_prompt, prompt.text, chars=len(prompt.text))


def _chat_chars(messages: list[Message], system_prompt: str | None,
                tools: list[dict[str, Any]] | None) -> int:
    """About how much text a chat prompt's template and tokenizer read."""
    return (sum(len(m.content or "") for m in messages) + len(system_prompt or "")
            + (len(str(tools)) if tools else 0))


def _render_and_encode(tokenizer: ChatTokenizer, messages: list[Message],
                       system_prompt: str | None,
                       tools: list[dict[str, Any]] | None = None) -> list[int]:
    return tokenizer.encode(tokenizer.render(messages, system_prompt, tools))


def check_context(spec: ModelSpec, prompt_tokens: int, params: SamplingParams,
                   param: str) -> None:
    """Prompt plus max_new_tokens must fit the model's context window."""
    if prompt_tokens + params.max_new_tokens > spec.context_length:
        raise invalid(
            f"the prompt has {prompt_tokens} tokens and up to {params.max_new_tokens} new tokens "
            f"were asked for, more than model {spec.name}'s context of {spec.context_length} tokens",
            param=param, code="context_length_exceeded")


def services() -> Services:
    """The current app's Services."""
    return current_app.extensions["dawet"]
