"""Configuration, from the environment (``LQ_*``) or from code."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from lightning_queue.core.keys import KEY_PREFIX_PATTERN, Keys, check_queue_name
from lightning_queue.core.metrics import MAX_SNAPSHOT_SERIES, MAX_VARIANT_SERIES, SeriesCaps
from lightning_queue.core.traces import LLMPrice


class Settings(BaseSettings):
    """Everything a client or a worker needs to find each other.

    Every field can be set from the environment with the ``LQ_`` prefix, e.g.
    ``LQ_REDIS_URL=redis://10.0.0.5:6379/0``, ``LQ_KEY_PREFIX=exp42``,
    ``LQ_QUEUE=calc``, ``LQ_AGENT=workers.calc_agent:agent``.
    """

    model_config = SettingsConfigDict(env_prefix="LQ_", extra="ignore")

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis holding the snapshot registry and rollout store; also the Celery broker.",
    )
    sentinel_master: str | None = Field(
        None,
        description="With a Redis Sentinel LQ_REDIS_URL (sentinel://h1:26379;sentinel://h2:26379/0): the name "
        "the Sentinels monitor the primary under.",
    )
    redis_retry_seconds: float = Field(
        10.0,
        ge=0,
        description="How long a Redis command is retried (exponential backoff) through connection errors and "
        "time-outs before it fails: a Redis restart shorter than this is ridden out.",
    )
    outage_tolerance_seconds: float = Field(
        3600.0,
        ge=0,
        description="Worker side: how long a worker keeps the outcome of a finished rollout through a Redis "
        "outage, retrying to record it, before it gives up and hands the message back (the rollout then runs "
        "again).",
    )
    key_prefix: str = Field(
        "lq",
        description="Prefix of every Redis key and channel lightning-queue uses: letters, digits, '.', '_' and '-' "
        "(no ':', so no prefix can reach into another's keys).",
    )
    queue: str = Field("lightning_queue", description="Celery queue rollouts are sent to by default.")
    agent: str | None = Field(
        None, description="Worker side: 'module:attribute' of the agent the worker runs."
    )
    visibility_timeout: int = Field(
        3600,
        ge=1,
        description=(
            "Seconds before a message taken by a worker that died is redelivered. "
            "Must exceed the longest rollout, or a slow rollout is run twice."
        ),
    )
    default_timeout_seconds: float | None = Field(
        None, gt=0, description="Time limit for rollouts whose config sets none."
    )
    hard_timeout_grace_seconds: float = Field(
        10.0,
        gt=0,
        description="Worker side: after the soft time limit, or the SIGTERM of a cancel, how long an agent may ignore "
        "it before its process is killed (the worker's own setting decides, not the enqueuing client's).",
    )

    heartbeat_interval: float = Field(
        10.0, gt=0, description="How often a worker process heartbeats the attempt it runs (seconds)."
    )
    heartbeat_timeout: float | None = Field(
        None,
        gt=0,
        description="An attempt whose last heartbeat is older than this is unresponsive (default: 3 heartbeat "
        "intervals). Every worker's watchdog then requeues or fails its rollout.",
    )
    watchdog_interval: float | None = Field(
        None,
        gt=0,
        description="How often each worker sweeps for unresponsive attempts (default: one heartbeat interval).",
    )
    message_grace_seconds: float = Field(
        30.0,
        gt=0,
        description="The reaper looks for the task message of a queued (or requeued) rollout this long after it was "
        "sent; one found nowhere (queue, unacked messages, retry schedule) at two looks half this apart is sent "
        "again. Messages found are looked for again later, less and less often (at most every 20 graces).",
    )
    message_resends: int = Field(
        10, ge=1, description="A rollout whose task message went missing this many times fails (MessageLostError)."
    )
    retry_poll_interval: float = Field(
        1.0, gt=0, description="How often each worker sends the retries whose backoff is over (seconds)."
    )
    max_message_bytes: int = Field(
        1024 * 1024,
        ge=1024,
        description="A task message bigger than this is refused by workers and moved to the dead-letter list "
        "(rollout messages carry ids only: about 1.5 KB).",
    )
    stall_threshold_seconds: float = Field(
        60.0,
        gt=0,
        description="A worker with free slots that received nothing while messages waited in its queue this "
        "long is reported stalled.",
    )

    compress_threshold_bytes: int = Field(
        8192, ge=0, description="Snapshots at least this big (serialized) are stored zstd-compressed."
    )
    max_snapshot_bytes: int = Field(
        64 * 1024 * 1024, ge=1, description="Largest snapshot accepted, serialized and uncompressed."
    )
    pointer_history_length: int = Field(100, ge=1, description="Moves kept per pointer for history and rollback.")
    cache_max_bytes: int = Field(
        256 * 1024 * 1024, ge=0, description="Worker-side snapshot cache size per process (0 disables it)."
    )
    cache_stats_interval_seconds: float = Field(
        10.0, gt=0, description="How often each worker process reports its cache stats to Redis."
    )
    rollout_ttl_seconds: int | None = Field(
        7 * 24 * 3600,
        ge=1,
        description="Finished rollout records (and their attempts) expire this long after they finish; "
        "unset to keep them forever.",
    )
    celery: dict[str, Any] = Field(
        default_factory=dict,
        description="Celery settings of your own, applied over lightning-queue's (JSON in LQ_CELERY, e.g. "
        "'{\"worker_max_tasks_per_child\": 100, \"task_routes\": {...}}').",
    )
    tracing: bool = Field(
        True,
        description="Record each attempt's trace (root span, the agent's spans, emitted rewards, LLM usage). Off: "
        "nothing is recorded, emit_* do nothing; ProxyLLMs are still scoped and the proxy still records its calls.",
    )
    trace_max_bytes: int = Field(
        512 * 1024,
        ge=1024,
        description="Largest trace stored per attempt (its spans, JSON-encoded before compression); the spans "
        "past it are dropped and an lq.truncated span says how many.",
    )
    llm_prices: dict[str, LLMPrice] = Field(
        default_factory=dict,
        description="USD per million input and output tokens by model name ('*': any other), for the cost of "
        "LLM calls (JSON in LQ_LLM_PRICES, e.g. '{\"gpt-4o-mini\": {\"input\": 0.15, \"output\": 0.6}}').",
    )
    metrics_max_snapshot_versions: int = Field(
        MAX_SNAPSHOT_SERIES,
        ge=1,
        description="Snapshot versions with their own Prometheus series (finished, duration, reward); past it, the "
        "least recently finished is folded into resources_id=\"other\" (docs/operations.md#monitoring).",
    )
    metrics_max_variants: int = Field(
        MAX_VARIANT_SERIES,
        ge=1,
        description="Experiment variants with their own Prometheus series; past it, the least recently finished is "
        "folded into experiment=\"other\".",
    )
    gc_keep: int = Field(50, ge=1, description="Retention: snapshots kept besides those pointed at or in use.")
    gc_interval_seconds: float | None = Field(
        None, gt=0, description="Run the retention policy on this schedule (needs `celery beat` or `worker -B`)."
    )

    @field_validator("key_prefix")
    @classmethod
    def _prefix_cannot_nest(cls, value: str) -> str:
        # A prefix holding ':' would nest: prefix "exp"'s keys ("exp:*") would include prefix
        # "exp:secret"'s, and so would an ACL rule written for "exp".
        if not KEY_PREFIX_PATTERN.match(value):
            raise ValueError(
                f"key_prefix {value!r} is not allowed: use 1-100 letters, digits, '.', '_' or '-', starting with "
                "a letter or digit (no ':': prefixes must not nest, see docs/operations.md#security)"
            )
        return value

    @field_validator("queue")
    @classmethod
    def _queue_is_usable(cls, value: str) -> str:
        return check_queue_name(value)

    @property
    def heartbeat_deadline(self) -> float:
        """Seconds after its last heartbeat that an attempt is presumed unresponsive."""
        return self.heartbeat_timeout or 3 * self.heartbeat_interval

    @property
    def sweep_interval(self) -> float:
        return self.watchdog_interval or self.heartbeat_interval

    @property
    def sweep_outage_seconds(self) -> float:
        """A pause of the fleet's unresponsive sweeps longer than this is taken for a Redis outage
        (no worker could sweep), after which no attempt is declared dead for one heartbeat
        timeout, so live workers beat first. It is the shortest outage that can let the deadline
        of a live attempt pass (the timeout less 1.5 heartbeat intervals: the most a beat can lag),
        but at least 1.5 sweep intervals, so the sweeps' own rhythm is never taken for one."""
        return max(1.5 * self.sweep_interval, self.heartbeat_deadline - 1.5 * self.heartbeat_interval)

    @property
    def series_caps(self) -> SeriesCaps:
        """The caps on per snapshot version and per variant metric series."""
        return SeriesCaps(self.metrics_max_snapshot_versions, self.metrics_max_variants)

    @property
    def keys(self) -> Keys:
        return Keys(self.key_prefix)
