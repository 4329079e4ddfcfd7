"""lightning-queue: a distributed rollout queue for optimizing AI agents.

Versioned resource snapshots live in Redis; Celery workers run rollouts, each
with the snapshot it names (or the latest), so optimizing and optimized
versions of an agent run side by side in one fleet.
"""

from lightning_queue.client import AsyncLightningClient, LightningClient
from lightning_queue.core.errors import (
    AgentNotConfiguredError,
    AgentSignatureError,
    ConfigurationError,
    EnqueueError,
    ExperimentError,
    ExperimentExistsError,
    ExperimentNotFoundError,
    ExperimentStateError,
    ExperimentUnitError,
    InvalidExperimentError,
    InvalidResourcesError,
    InvalidRolloutResultError,
    LightningQueueError,
    MissingResourceError,
    NoLatestResourcesError,
    PointerError,
    RedisUnavailableError,
    ResourcesExistError,
    ResourcesNotFoundError,
    RolloutFailed,
    RolloutNotFoundError,
    SnapshotCorruptedError,
    SnapshotInUseError,
    SnapshotTooLargeError,
    UnknownResourceTypeError,
    VersionConflictError,
)
from lightning_queue.core.metrics import RewardSummary
from lightning_queue.core.models import (
    LLM,
    Attempt,
    ErrorInfo,
    NamedResources,
    PromptTemplate,
    Resource,
    ResourcesUpdate,
    Rollout,
    RolloutConfig,
    RolloutRequest,
    RolloutResult,
)
from lightning_queue.core.settings import Settings
from lightning_queue.experiments.manager import (
    Conclusion,
    Experiment,
    Experiments,
    Variant,
)
from lightning_queue.storage.registry import (
    DeleteReport,
    PointerMove,
    retry_on_conflict,
)
from lightning_queue.storage.retention import RetentionReport
from lightning_queue.worker.agent import FunctionalLitAgent, LitAgent, rollout
from lightning_queue.worker.app import create_app

__version__ = "0.1.0"

# Loaded on first use: they need scipy, whose import (about half a second) every worker
# process and CLI command would otherwise pay for nothing.
_LAZY = {"ExperimentReport": "report", "Canary": "canary", "CanaryResult": "canary", "Guardrail": "canary"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "LLM",
    "AgentNotConfiguredError",
    "AgentSignatureError",
    "AsyncLightningClient",
    "Attempt",
    "ConfigurationError",
    "EnqueueError",
    "ErrorInfo",
    "FunctionalLitAgent",
    "InvalidResourcesError",
    "InvalidRolloutResultError",
    "LightningClient",
    "LightningQueueError",
    "LitAgent",
    "MissingResourceError",
    "NamedResources",
    "NoLatestResourcesError",
    "PointerError",
    "DeleteReport",
    "PointerMove",
    "RetentionReport",
    "RewardSummary",
    "RolloutFailed",
    "SnapshotInUseError",
    "SnapshotTooLargeError",
    "VersionConflictError",
    "retry_on_conflict",
    "PromptTemplate",
    "RedisUnavailableError",
    "Resource",
    "ResourcesExistError",
    "ResourcesNotFoundError",
    "ResourcesUpdate",
    "Rollout",
    "RolloutConfig",
    "RolloutNotFoundError",
    "RolloutRequest",
    "RolloutResult",
    "Settings",
    "SnapshotCorruptedError",
    "UnknownResourceTypeError",
    "create_app",
    "rollout",
    "Canary",
    "CanaryResult",
    "Conclusion",
    "Experiment",
    "ExperimentError",
    "ExperimentExistsError",
    "ExperimentNotFoundError",
    "ExperimentReport",
    "ExperimentStateError",
    "ExperimentUnitError",
    "Experiments",
    "Guardrail",
    "InvalidExperimentError",
    "Variant",
]
