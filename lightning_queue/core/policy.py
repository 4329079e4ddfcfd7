"""Retry and backoff: the one place that decides what happens after an attempt ends.

Every path that closes an attempt asks :func:`next_status` where the rollout goes: the
runner when the agent returns or raises, the worker's main process when a hard time limit
killed the agent, the unresponsive-attempt sweep, and the claim that finds a dead worker's
attempt. The Lua scripts never decide: they receive the decision as an argument and apply
it atomically (fenced, so a decision taken on a stale read is refused, not applied).
:func:`retry_delay` is the backoff every requeue waits.
"""

from __future__ import annotations

import random
from typing import Literal

from lightning_queue.core.errors import (
    MissingResourceError,
    ResourcesNotFoundError,
    SnapshotCorruptedError,
    SnapshotDeletedError,
)
from lightning_queue.core.models import RolloutConfig

NextStatus = Literal["succeeded", "failed", "requeuing"]

PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    ResourcesNotFoundError,
    SnapshotCorruptedError,
    SnapshotDeletedError,
    MissingResourceError,
)
"""Errors another attempt cannot fix: retrying would only repeat them."""


def next_status(config: RolloutConfig, sequence_id: int, attempt_status: str, retryable: bool = True) -> NextStatus:
    """Where a rollout goes after attempt ``sequence_id`` (1-based) ended ``attempt_status``:
    ``succeeded``; ``requeuing`` when the outcome is in ``config.retry_condition``, the error is
    ``retryable`` and attempts remain under ``config.max_attempts``; else ``failed``."""
    if attempt_status == "succeeded":
        return "succeeded"
    if retryable and attempt_status in config.retry_condition and sequence_id < config.max_attempts:
        return "requeuing"
    return "failed"


def is_retryable(exc: BaseException) -> bool:
    """Whether another attempt could succeed where this error ended one."""
    return not isinstance(exc, PERMANENT_ERRORS)


def retry_delay(config: RolloutConfig, sequence_id: int) -> float:
    """Seconds to wait before the attempt after attempt ``sequence_id`` (1-based):
    ``retry_backoff_seconds * 2 ** (sequence_id - 1)`` capped at ``retry_backoff_max_seconds``,
    drawn uniformly below that with ``retry_jitter`` ("full jitter", as Celery's own), 0 when
    the config sets no backoff."""
    if config.retry_backoff_seconds <= 0:
        return 0.0
    delay = min(config.retry_backoff_max_seconds, config.retry_backoff_seconds * 2 ** max(0, sequence_id - 1))
    return random.uniform(0, delay) if config.retry_jitter else delay
