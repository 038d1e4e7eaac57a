"""Every environment variable Dawet reads, in one place (prefix DAWET_)."""
from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from dawet.cpus import parse_cpu_list, split_cpus

FALLBACK_REDIS_URL = "redis://127.0.0.1:6379/0"


class Settings(BaseSettings):
    """Typed settings; each field is DAWET_<NAME> in the environment."""

    model_config = SettingsConfigDict(env_prefix="DAWET_", extra="forbid")

    # Redis for job logs and pub/sub. Unset: `dawet run` starts an embedded redis-server,
    # and a bare api or worker uses redis://127.0.0.1:6379/0.
    redis_url: str | None = None
    # Redis Sentinel: comma-separated host:port of the sentinels. When set, every Redis client
    # (pub/sub included) and the Celery broker (unless broker_url names another) use db 0 of
    # the primary that the sentinels name redis_sentinel_master, and follow it when it fails
    # over; redis_url is then unused (docs/resilience.md, "Redis that fails over").
    redis_sentinels: str = ""
    redis_sentinel_master: str = "dawet"
    # Password of the primary and replicas found through the sentinels (not of the sentinels).
    redis_sentinel_password: str | None = None
    # With sentinels: how long a job's submission, start and end wait for a replica to hold
    # them (WAIT 1), so that a failover does not lose them; 0: never wait.
    redis_replica_wait_seconds: float = Field(1.0, ge=0)
    # Where `dawet run`'s embedded Redis keeps its append-only file, so a restart loses no job.
    redis_data_dir: Path = Path("var/redis")
    # Celery broker; unset means the Redis above. Any kombu URL works (amqp://... for RabbitMQ).
    broker_url: str | None = None
    # The model registry (TOML); paths in it that start with "." are relative to the file.
    models_file: Path = Path("models.toml")
    # Model served when a request names none; unset means the registry's `default`, else its first.
    default_model: str | None = None

    # Address and process count of the API (gunicorn, gevent workers).
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=0, le=65535)
    api_workers: int = Field(2, ge=1)
    # Largest accepted request body in bytes.
    max_request_bytes: int = Field(1_000_000, ge=1024)
    # Accepted API keys as comma-separated SHA-256 hex digests, each optionally named and scoped
    # to models ("name=digest:model1|model2"); with this and admin_api_keys empty, and no
    # require_api_keys, authentication is off. `dawet keys create` adds keys at run time.
    api_keys: str = ""
    # Keys in the same syntax whose holders see every key's jobs, conversations and usage.
    admin_api_keys: str = ""
    # Refuse to start the API without a key in api_keys or admin_api_keys (compose sets it).
    require_api_keys: bool = False
    # Tokens (prompt + completion) a key may spend per UTC day unless its own budget says
    # otherwise; 0: no budget. A request whose prompt plus max tokens would pass it gets 429.
    daily_token_budget: int = Field(0, ge=0)
    # Days of per-key usage kept for GET /v1/usage.
    usage_retention_days: int = Field(31, ge=1)
    # Origins allowed to call the API from a browser (comma-separated, or *); empty: no CORS.
    cors_origins: str = ""
    # Log prompts and generated text (off by default: they may hold personal data).
    log_prompts: bool = False
    # Cancel a streamed OpenAI-style completion's job when its client disconnects.
    cancel_on_disconnect: bool = True

    # Jobs a worker process runs at once (Celery threads pool); unset means max_batch_size.
    worker_concurrency: int | None = Field(None, ge=1)
    # How a worker runs its jobs: `batching` decodes all running jobs as one batch per step
    # (continuous batching); `sequential` runs one job at a time (the baseline).
    engine: Literal["batching", "sequential"] = "batching"
    # The batching engine's forward pass: `auto` runs our own (tasks/engine/batching/llama.py)
    # for Llama-family models it serves, transformers' for the rest; `transformers` always
    # runs transformers' own (the reference, and the seed stack's patched models).
    engine_forward: Literal["auto", "transformers"] = "auto"
    # Run the engine in a child process of the worker (the model loads there), so the decode
    # loop has a GIL of its own; false runs it on the worker's threads (simpler to debug).
    engine_process: bool = True
    # Most sequences in one batch; more jobs wait for a free slot.
    max_batch_size: int = Field(32, ge=1)
    # KV-cache budget in tokens per worker. Our forward's KV pool holds exactly this many tokens
    # and admits a job while all admitted jobs' (prompt + max_new_tokens) fit it; transformers'
    # padded window keeps rows x the longest of them under it. More jobs wait, and a job that
    # alone exceeds it fails.
    kv_cache_tokens: int = Field(65_536, ge=16)
    # Tokens whose KV our forward keeps after their request (prompts, and finished replies), so
    # that a later prompt starting the same way skips that part of its prefill: a conversation's
    # next turn, a shared system prompt. They stay in the KV pool (kv_cache_tokens), of which
    # this caps their share; least recently used out first, and first out when running jobs
    # need the slots. 0: no prefix cache.
    prefix_cache_tokens: int = Field(16_384, ge=0)
    # LoRA adapters a worker's engine keeps loaded (each model's registry `adapters`, and those
    # added at run time) beyond those its running requests use; the least recently used goes.
    max_loaded_adapters: int = Field(8, ge=1)
    # CPUs the engine process runs on alone (Linux's list syntax: "3", "2-3"); the worker, and
    # the Redis and API that `dawet run` starts, keep to the other CPUs. Empty: no pinning.
    engine_cpus: str = ""
    # Intra-op threads torch uses in a worker; 0 keeps torch's default (one per core). On a
    # small CPU host shared with the API and Redis, 1 avoids threads spinning against each other.
    torch_threads: int = Field(0, ge=0)
    # Text produced within this many seconds is sent as one token event (the first token is
    # always sent at once); 0 sends one event per token.
    stream_chunk_seconds: float = Field(0.05, ge=0)
    # How often a worker refreshes its liveness record; it expires after three missed beats.
    heartbeat_seconds: float = Field(5.0, gt=0)
    # Seconds a broker keeps an unacknowledged job before handing it to another worker.
    visibility_timeout_seconds: int = Field(3600, ge=60)
    # Cancels reach workers over pub/sub at once; a worker also checks the cancel flags of its
    # running jobs this often (one round trip for all), in case a pub/sub message was lost.
    cancel_poll_seconds: float = Field(0.5, gt=0)
    # A running job's lease lasts this long; a job whose lease lapses is re-run on another worker.
    lease_seconds: float = Field(6.0, gt=0)
    # How often a worker renews its jobs' leases and looks for lapsed ones.
    lease_refresh_seconds: float = Field(1.0, gt=0)
    # A worker whose engine holds work and sends nothing for this long exits, so its jobs run
    # again elsewhere. Long enough for the longest prefill on the slowest host.
    engine_stall_seconds: float = Field(300.0, gt=0)
    # How long a worker retries (with backoff) a job's writes while Redis is unreachable or
    # stalled, before it hands the job back to run again.
    redis_retry_seconds: float = Field(30.0, ge=0)
    # Attempts a job gets: after this many lost workers it ends with error worker_lost.
    max_attempts: int = Field(3, ge=1)

    # How long job records and event logs stay in Redis.
    job_ttl_seconds: int = Field(86_400, ge=60)
    # A stream with no new event for this long ends with an error frame.
    stream_idle_timeout_seconds: float = Field(120.0, gt=0)
    # How long a chat conversation stays in Redis after its last change.
    conversation_ttl_seconds: int = Field(7 * 86_400, ge=60)
    # How long a stored response (POST /v1/responses) stays in Redis after its creation.
    response_ttl_seconds: int = Field(86_400, ge=60)

    # Jobs that may wait in one model's queue; beyond it a submission gets 429. 0: no limit.
    max_queued_jobs: int = Field(1000, ge=0)
    # Generation requests per minute per API key (or client address without keys). 0: no limit.
    rate_limit_requests_per_minute: int = Field(0, ge=0)
    # Prompt plus max_new_tokens per minute per API key (or client address). 0: no limit.
    rate_limit_tokens_per_minute: int = Field(0, ge=0)
    # A job not started this many seconds after submission expires; unset: no deadline.
    default_deadline_seconds: float | None = Field(None, gt=0)

    # Files and batches (api/files.py, api/batches.py). Where uploaded files and batch output
    # files are kept: every API process must see the same directory (a volume in compose).
    files_dir: Path = Path("var/files")
    # Largest file POST /v1/files accepts, in bytes.
    max_file_bytes: int = Field(100_000_000, ge=1024)
    # Most requests (lines) in one batch input file.
    batch_max_requests: int = Field(50_000, ge=1)
    # Batch lines of one model queued or running at once, over all batches: the rest wait in
    # their batch, so a big batch never floods the model's queue ahead of interactive requests.
    # 4 keeps interactive TTFT within 1.5x of an idle run on a 2-CPU host (docs/benchmarks.md);
    # a GPU, whose decode steps barely slow with more rows, takes more.
    batch_max_in_flight: int = Field(4, ge=1)
    # The seconds of a batch's completion window, "24h"; tests shorten it.
    batch_completion_window_seconds: float = Field(86_400, gt=0)
    # A dispatcher's hold on a batch; another API process takes the batch over once it lapses.
    batch_lease_seconds: float = Field(10.0, gt=0)
    # How often a dispatcher looks at its batches when nothing wakes it (a line's job ending,
    # a batch created or cancelled wake it at once).
    batch_poll_seconds: float = Field(1.0, gt=0)
    # A batch line whose job still waits in the queue this long is sent to it again, in case
    # its message went down with a killed worker; a worker skips a job that ran.
    batch_resend_seconds: float = Field(600.0, gt=0)

    # Python logging level for every Dawet process.
    log_level: str = "INFO"

    # Port of each worker's Prometheus /metrics server; 0 turns it off. `dawet run` picks free ports.
    worker_metrics_port: int = Field(9300, ge=0, le=65535)
    # Address the worker's metrics server binds (0.0.0.0 in containers).
    worker_metrics_host: str = "127.0.0.1"

    @field_validator("api_keys", "admin_api_keys")
    @classmethod
    def _api_key_digests(cls, value: str) -> str:
        entries = [_lower_digest(e.strip()) for e in value.split(",") if e.strip()]
        bad = [e for e in entries if not API_KEY_ENTRY.fullmatch(e)]
        if bad:
            raise ValueError("API keys must be SHA-256 hex digests (64 hex characters), "
                             "comma-separated, each optionally preceded by name= and followed "
                             "by :model1|model2; hash each key, e.g. `printf %s KEY | sha256sum`")
        return ",".join(entries)

    @field_validator("redis_sentinels")
    @classmethod
    def _host_ports(cls, value: str) -> str:
        if value.strip() and not all(SENTINEL_ENTRY.fullmatch(e.strip()) for e in value.split(",")):
            raise ValueError("redis_sentinels must be comma-separated host:port pairs")
        return value

    @field_validator("engine_cpus")
    @classmethod
    def _cpu_list(cls, value: str) -> str:
        parse_cpu_list(value)  # raises with the part it cannot read
        return value

    def engine_cpu_split(self) -> tuple[frozenset[int], frozenset[int]] | None:
        """(the engine's CPUs, the other processes'), or None when nothing is pinned."""
        return split_cpus(parse_cpu_list(self.engine_cpus)) if self.engine_cpus else None

    def has_configured_keys(self) -> bool:
        """Whether api_keys or admin_api_keys holds a key."""
        return bool(self.api_keys or self.admin_api_keys)

    def auth_enabled(self) -> bool:
        """Whether requests need an API key."""
        return self.has_configured_keys() or self.require_api_keys

    def cors_origin_list(self) -> list[str]:
        """The origins allowed by CORS; empty when CORS is off."""
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    def redis_sentinel_addresses(self) -> list[tuple[str, int]]:
        """The sentinels as (host, port) pairs; empty without sentinels."""
        pairs = [entry.strip().rpartition(":") for entry in self.redis_sentinels.split(",")]
        return [(host, int(port)) for host, _, port in pairs if host]

    def redis_url_or_fallback(self) -> str:
        """Return the configured Redis URL, or the local default."""
        return self.redis_url or FALLBACK_REDIS_URL

    @model_validator(mode="after")
    def _one_job_per_batch_slot(self) -> "Settings":
        """Unset worker_concurrency means one Celery thread per batch slot."""
        if self.worker_concurrency is None:
            self.worker_concurrency = self.max_batch_size
        return self

    def broker_url_or_redis(self) -> str:
        """Return the broker URL; the Redis URL when none is set."""
        return self.broker_url or self.redis_url_or_fallback()


SENTINEL_ENTRY = re.compile(r"[^\s,]+:\d{1,5}")  # one of DAWET_REDIS_SENTINELS: host:port
# An API key's name, and an entry of DAWET_API_KEYS: an optional name, the key's SHA-256 hex
# digest, optional model names.
KEY_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
API_KEY_ENTRY = re.compile(rf"(?:(?P<name>{KEY_NAME.pattern})=)?(?P<digest>[0-9a-f]{{64}})"
                           r"(?::(?P<models>[^:|,=]+(?:\|[^:|,=]+)*))?")


def _lower_digest(entry: str) -> str:
    """Lower-case an API key entry's digest, keeping its name and model names as written."""
    name, equals, rest = entry.rpartition("=")  # ("", "", entry) without a name
    digest, sep, models = rest.partition(":")
    return name + equals + digest.lower() + sep + models


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Read settings from the environment once per process."""
    return Settings()


def settings_env(settings: Settings) -> dict[str, str]:
    """Render settings as DAWET_* variables for a child process."""
    values = settings.model_dump(exclude_none=True)
    return {f"DAWET_{name.upper()}": str(value) for name, value in values.items()}


def pin_gpu(gpu: str | None) -> None:
    """Make only `gpu` visible to CUDA; call before torch is imported."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu


def export_metrics_dir(path: Path) -> None:
    """Point prometheus_client's multiprocess mode at `path`; call before it is imported."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """Return this process's environment plus `extra`, for launching a child process."""
    return {**os.environ, **extra}
