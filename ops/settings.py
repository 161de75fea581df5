"""Settings: the one place that reads the environment (``SOP_`` prefix, ``.env`` file)."""

from __future__ import annotations

import os
import re
import socket
import uuid
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from sop_llm.schemas.task import NAME_PATTERN
from sop_llm.streams.durability import Durability
from sop_llm.streams.keys import DEFAULT_PARTITIONS
from sop_llm.streams.producer import ProducerConfig

CommaList = Annotated[tuple[str, ...], NoDecode]
# a delay in seconds: finite and never negative
Delay = Annotated[float, Field(ge=0, allow_inf_nan=False)]


def _a_name(name: str) -> str:
    # a pool or partition name is one segment of a Redis key: it may not reach into another
    if not re.match(NAME_PATTERN, name):
        raise ValueError(f"{name!r} is not a valid name (letters, digits, '.', '_', '-')")
    return name


def _split(value: object) -> object:
    if isinstance(value, str):
        return tuple(p.strip() for p in value.split(",") if p.strip())
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SOP_", env_file=".env", extra="ignore")

    redis_url: SecretStr | None = Field(
        default=None,
        description="Redis URL (redis:// or rediss://, may carry a password; redis+cluster:// or "
        "rediss+cluster:// for a Redis Cluster). Unset: `sop-llm up` starts an embedded Redis.",
    )
    redis_cluster: bool = Field(
        default=False,
        description="Treat SOP_REDIS_URL as a Redis Cluster node (same as a redis+cluster:// URL).",
    )
    redis_sentinels: CommaList = Field(
        default=(),
        description="Sentinel addresses host:port,...; with SOP_REDIS_SENTINEL_MASTER, connect to the master they name (SOP_REDIS_URL then only lends user, password, db, rediss).",
    )
    redis_sentinel_master: str | None = Field(
        default=None, description="Name of the master the sentinels monitor."
    )
    namespace: str = Field(default="sop", description="Key namespace; its keys share one hash tag.")
    partitions: CommaList = Field(
        default=DEFAULT_PARTITIONS, description="Priority partitions, highest first."
    )
    pools: CommaList = Field(default=("default",), description="Pools this worker serves.")
    pool: str = Field(default="default", description="Pool the SDK and CLI submit to.")
    models_file: Path | None = Field(
        default=None, description="TOML file of model specs (see docs/providers.md)."
    )
    durability_replicas: int = Field(
        default=0,
        ge=0,
        description="Replicas that must hold a submission (the SDK's submit) and a batch of outcomes (before its slots are freed); 0: the master's acknowledgement. Needs +wait in the ACL.",
    )
    durability_timeout_ms: int = Field(
        default=1000, ge=1, description="How long to wait for those replicas."
    )
    startup_timeout_s: float = Field(
        default=300.0,
        ge=0,
        description="How long a process waits for Redis at start before it exits with an error (0: forever); it retries meanwhile.",
    )
    models_poll_s: float = Field(
        default=5.0,
        gt=0,
        description="How often a worker looks for models registered or removed at run time.",
    )

    sidecar_host: str = Field(default="127.0.0.1", description="Address the sidecar binds.")
    sidecar_port: int = Field(
        default=8080, ge=0, le=65535, description="Sidecar port (0: any free port)."
    )
    sidecar_token: SecretStr | None = Field(
        default=None, description="Bearer token the sidecar requires."
    )

    echo_tokens_per_s: float = Field(
        default=0.0, ge=0.0, description="Pace of the built-in echo model (0: no delay)."
    )
    echo_slots: int = Field(default=64, ge=1, description="Echo tasks at a time per worker.")
    worker_slots: int | None = Field(
        default=None,
        ge=1,
        description="Cap on the tasks a worker runs at once per pool; default: no cap beyond each model's own slots (its concurrency).",
    )
    worker_name: str | None = Field(
        default=None, description="Consumer name; default host-pid-random."
    )

    max_prompt_bytes: int = Field(
        default=1 << 20,
        ge=1,
        description="Largest prompt (or messages) in UTF-8 bytes; bigger is invalid input.",
    )
    max_metadata_bytes: int = Field(
        default=16 << 10, ge=1, description="Largest metadata object, as JSON bytes."
    )
    max_entry_bytes: int = Field(
        default=4 << 20,
        ge=1024,
        description="Largest task entry (all its fields); a bigger one is dead-lettered by its size without being loaded by a worker.",
    )
    status_ttl_s: int = Field(
        default=86_400,
        ge=1,
        description="Status record / idempotency key lifetime after the terminal state.",
    )
    max_attempts: int = Field(
        default=3,
        ge=1,
        description="Deliveries of one task before it is dead-lettered with max_attempts.",
    )
    lease_ttl_ms: int = Field(
        default=10_000,
        ge=300,
        description="Worker lease; its entries are reclaimed this long after it stops renewing.",
    )
    reclaim_interval_ms: int = Field(
        default=2_000, ge=50, description="How often a worker looks for entries of expired workers."
    )
    block_ms: int = Field(
        default=1_000, ge=1, description="Longest blocking read when every partition is empty."
    )
    unknown_model_grace_s: float = Field(
        default=30.0,
        ge=0.0,
        description="How long a task waits (queued, parked) for a model that is registered but "
        "that no worker of its pool has loaded yet, before it ends model_not_found.",
    )
    aging_ms: int = Field(
        default=30_000, ge=0, description="Aging rule threshold; 0 turns aging off."
    )
    shutdown_grace_s: float = Field(
        default=30.0, ge=0.0, description="Time in-flight tasks get to finish after SIGTERM."
    )

    max_backlog: int = Field(
        default=0,
        ge=0,
        description="Refuse submissions while a partition holds this many unfinished tasks (0: no limit).",
    )
    retry_base_s: float = Field(
        default=1.0,
        gt=0,
        description="First retry delay after a retryable error (doubles per attempt, with jitter).",
    )
    retry_max_s: float = Field(
        default=300.0,
        gt=0,
        description="Longest retry delay (a provider's Retry-After is honoured up to an hour).",
    )
    retry_poll_ms: int = Field(
        default=250, ge=10, description="How often due retries are moved back to their partition."
    )
    retention_s: int = Field(
        default=7 * 86_400,
        ge=60,
        description="Task streams and the webhook stream keep entries this long (never past a pending or undelivered one).",
    )
    results_retention_s: int = Field(
        default=7 * 86_400,
        ge=60,
        description="Retention of the results streams and control events.",
    )
    dead_retention_s: int = Field(
        default=30 * 86_400, ge=60, description="Retention of the dead-letter streams."
    )
    trim_interval_s: float = Field(
        default=60.0, gt=0, description="How often one worker of the fleet trims the streams."
    )
    otel_exporter: Literal["none", "console", "otlp"] = Field(
        default="none",
        description="Trace exporter; OTLP reads the standard OTEL_EXPORTER_OTLP_* variables.",
    )
    trace_content: bool = Field(
        default=False,
        description="Put prompts and completions on spans (off: they may hold personal data).",
    )
    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="For `sop-llm worker` alone: serve /metrics on this port (the sidecar serves them otherwise).",
    )
    gpu_host: str | None = Field(
        default=None,
        description="Host part of the GPU semaphore keys (default: the host name); processes sharing GPUs must agree.",
    )
    gpu_permits: int = Field(
        default=1,
        ge=1,
        description="Tasks at a time per GPU device (1 for in-process llama.cpp, N + 1 for one with parallel = N; N for a server with N slots).",
    )
    gpu_lease_ms: int = Field(
        default=10_000,
        ge=300,
        description="GPU semaphore lease; a dead holder's permit frees after this.",
    )
    gpu_poll_ms: int = Field(
        default=100, ge=10, description="How often a GPU waiter looks again when no wake-up came."
    )
    gpu_sample_interval_s: float = Field(
        default=5.0, gt=0, description="How often GPU memory is sampled through NVML."
    )
    max_vram_usage_percent: float = Field(
        default=90.0,
        gt=0,
        le=100,
        description="Admission: use at most this share of a device's memory.",
    )
    vram_reserve_mb: int = Field(
        default=512, ge=0, description="Admission: keep this much device memory free."
    )
    model_idle_unload_s: float = Field(
        default=900.0, ge=0, description="Unload a local model idle this long (0: never)."
    )
    data_dir: Path = Field(
        default=Path(".sop-data"), description="Where the embedded Redis keeps its data."
    )
    log_format: str = Field(
        default="json",
        pattern="^(json|console)$",
        description="json (one object a line) or console.",
    )
    log_level: str = Field(default="INFO", description="Logging level.")
    webhook_secrets: SecretStr | None = Field(
        default=None, description="Signing secrets, comma-separated, newest first (whsec_...)."
    )
    webhook_allow: CommaList = Field(
        default=(), description="Hosts or networks the SSRF guard lets through."
    )
    webhook_timeout_s: float = Field(
        default=15.0, gt=0, description="Timeout of one delivery attempt."
    )
    # parsed here, so a malformed schedule fails every command at start like any other setting
    webhook_schedule_s: Annotated[tuple[Delay, ...], NoDecode] = Field(
        default=(0, 5, 300, 1800, 7200, 18000, 36000),
        validate_default=True,
        description="Delay before each delivery attempt, in seconds.",
    )
    webhook_concurrency: int = Field(
        default=32, ge=1, description="Deliveries at a time per sender."
    )
    webhook_max_body_bytes: int = Field(
        default=256 << 10,
        ge=1024,
        description="Largest webhook body; a bigger outcome is sent in the thin form.",
    )
    webhook_sender: bool = Field(
        default=True, description="Run a webhook sender beside the worker (`up`, `worker`)."
    )
    webhook_thin: bool = Field(default=False, description="Send only ids, not the whole outcome.")

    _split_lists = field_validator(
        "partitions",
        "pools",
        "webhook_allow",
        "webhook_schedule_s",
        "redis_sentinels",
        mode="before",
    )(_split)

    @field_validator("partitions", "pools")
    @classmethod
    def _not_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one name is required")
        for name in value:
            _a_name(name)
        return value

    @field_validator("pool")
    @classmethod
    def _a_pool(cls, value: str) -> str:
        return _a_name(value)

    @field_validator("webhook_schedule_s")
    @classmethod
    def _a_delay(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        # here, not as min_length: that would also report an empty tuple for a bad delay
        if not value:
            raise ValueError("at least one delay is required")
        return value

    @property
    def redis_url_value(self) -> str:
        """``SOP_REDIS_URL``, else the URL a running `sop-llm up` recorded in ``data_dir``."""
        if self.redis_url is not None:
            return self.redis_url.get_secret_value()
        recorded = self.data_dir / "redis.url"
        if recorded.is_file():
            return recorded.read_text().strip()
        raise ValueError(
            "SOP_REDIS_URL is not set (and no `sop-llm up` is running from this folder)"
        )

    def consumer_name(self) -> str:
        return self.worker_name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"

    def producer_config(self) -> ProducerConfig:
        try:
            url = self.redis_url_value
        except ValueError:
            if not self.redis_sentinels:
                raise
            url = ""  # Sentinel: the producer gets its client from ops.connect, not a URL
        return ProducerConfig(
            redis_url=url,
            namespace=self.namespace,
            pool=self.pool,
            partitions=self.partitions,
            default_priority=self.partitions[len(self.partitions) // 2],
            max_prompt_bytes=self.max_prompt_bytes,
            max_metadata_bytes=self.max_metadata_bytes,
            max_backlog=self.max_backlog,
            webhook_allow=self.webhook_allow,
            status_ttl_s=self.status_ttl_s,
            durability=self.durability(),
        )

    def durability(self) -> Durability:
        return Durability(replicas=self.durability_replicas, timeout_ms=self.durability_timeout_ms)


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``, for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.hostname or ""
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))
