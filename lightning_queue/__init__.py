"""lightning-queue: a distributed rollout queue for optimizing AI agents.

Versioned resource snapshots live in Redis; Celery workers run rollouts, each
with the snapshot it names (or the latest), so optimizing and optimized
versions of an agent run side by side in one fleet.

Every name below is imported on first use (PEP 562), so ``import lightning_queue``
costs nothing: an algorithm process never loads the worker side, a worker never
loads the client side, and the CLI starts fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_queue.aio import AsyncLightningClient
    from lightning_queue.app import create_app
    from lightning_queue.client import LightningClient
    from lightning_queue.core import hooks
    from lightning_queue.core.diff import SnapshotDiff
    from lightning_queue.core.errors import (
        AgentNotConfiguredError,
        AgentSignatureError,
        AttemptClosedError,
        AttemptNotFoundError,
        ConfigurationError,
        CriticError,
        EnqueueError,
        ExperimentError,
        ExperimentExistsError,
        ExperimentNotFoundError,
        ExperimentStateError,
        ExperimentUnitError,
        InvalidCursorError,
        InvalidDatasetError,
        InvalidExperimentError,
        InvalidFilterError,
        InvalidPriceTableError,
        InvalidQueueNameError,
        InvalidResourcesError,
        InvalidRewardError,
        InvalidRolloutResultError,
        InvalidVersionMetadataError,
        LightningQueueError,
        MissingResourceError,
        NoLatestResourcesError,
        NoRunnersError,
        PointerError,
        PromptNotFoundError,
        ProtectedPointerError,
        ProxyResourceError,
        RedisUnavailableError,
        RegistryLostError,
        ResourcesExistError,
        ResourcesNotFoundError,
        RolloutFailed,
        RolloutNotFoundError,
        RunConflictError,
        SnapshotCorruptedError,
        SnapshotInUseError,
        SnapshotTooLargeError,
        TrainingError,
        TrainingTimeoutError,
        UnknownResourceTypeError,
        VersionConflictError,
    )
    from lightning_queue.core.metrics import RewardSummary
    from lightning_queue.core.models import (
        LLM,
        Attempt,
        ErrorInfo,
        NamedResources,
        PromptLineage,
        PromptTemplate,
        ProxyLLM,
        Resource,
        ResourcesUpdate,
        Rollout,
        RolloutConfig,
        RolloutRequest,
        RolloutResult,
        VersionMeta,
    )
    from lightning_queue.core.queries import CancelReport, FinishedPage, FinishedRollout, RolloutFilter, RolloutPage
    from lightning_queue.core.settings import Settings
    from lightning_queue.core.traces import LLMPrice, Span, Triplet, Usage
    from lightning_queue.experiments.canary import Canary, CanaryResult, Guardrail
    from lightning_queue.experiments.manager import Conclusion, Experiment, Experiments, Variant
    from lightning_queue.experiments.report import ExperimentReport
    from lightning_queue.storage.registry import DeleteReport, PointerMove, Protection, retry_on_conflict
    from lightning_queue.storage.retention import RetentionReport
    from lightning_queue.training import APO, Algorithm, Critic, Dataset, Trainer
    from lightning_queue.worker.agent import FunctionalLitAgent, LitAgent, rollout
    from lightning_queue.worker.tracing import emit_exception, emit_message, emit_object, emit_reward, llm_call

__version__ = "0.1.0"

_EXPORTS: dict[str, tuple[str, ...]] = {
    "lightning_queue.client": ("LightningClient",),
    "lightning_queue.aio": ("AsyncLightningClient",),
    "lightning_queue.core.errors": (
        "AgentNotConfiguredError", "AgentSignatureError", "AttemptClosedError", "AttemptNotFoundError",
        "ConfigurationError", "CriticError", "EnqueueError", "ExperimentError", "ExperimentExistsError",
        "ExperimentNotFoundError", "ExperimentStateError", "ExperimentUnitError", "InvalidDatasetError",
        "InvalidExperimentError", "InvalidPriceTableError", "InvalidQueueNameError", "InvalidResourcesError",
        "InvalidRewardError", "InvalidRolloutResultError", "InvalidVersionMetadataError", "LightningQueueError",
        "MissingResourceError", "NoLatestResourcesError", "NoRunnersError", "PointerError", "PromptNotFoundError",
        "ProtectedPointerError", "ProxyResourceError",
        "RedisUnavailableError", "RegistryLostError", "ResourcesExistError", "ResourcesNotFoundError", "RolloutFailed",
        "RolloutNotFoundError", "RunConflictError", "SnapshotCorruptedError", "SnapshotInUseError",
        "SnapshotTooLargeError", "TrainingError", "TrainingTimeoutError", "UnknownResourceTypeError",
        "VersionConflictError",
        "InvalidCursorError", "InvalidFilterError",
    ),
    "lightning_queue.core.metrics": ("RewardSummary",),
    "lightning_queue.core.models": (
        "Attempt", "ErrorInfo", "LLM", "NamedResources", "PromptLineage", "PromptTemplate", "ProxyLLM", "Resource",
        "ResourcesUpdate", "Rollout", "RolloutConfig", "RolloutRequest", "RolloutResult", "VersionMeta",
    ),
    "lightning_queue.core.diff": ("SnapshotDiff",),
    "lightning_queue.core.queries": (
        "CancelReport", "FinishedPage", "FinishedRollout", "RolloutFilter", "RolloutPage",
    ),
    "lightning_queue.core.settings": ("Settings",),
    "lightning_queue.experiments.canary": (
        "Canary", "CanaryResult", "Guardrail",
    ),
    "lightning_queue.experiments.manager": (
        "Conclusion", "Experiment", "Experiments", "Variant",
    ),
    "lightning_queue.experiments.report": ("ExperimentReport",),
    "lightning_queue.storage.registry": (
        "DeleteReport", "PointerMove", "Protection", "retry_on_conflict",
    ),
    "lightning_queue.storage.retention": ("RetentionReport",),
    "lightning_queue.training": (
        "APO", "Algorithm", "Critic", "Dataset", "Trainer",
    ),
    "lightning_queue.worker.agent": (
        "FunctionalLitAgent", "LitAgent", "rollout",
    ),
    "lightning_queue.app": ("create_app",),
    "lightning_queue.core.traces": (
        "LLMPrice", "Span", "Triplet", "Usage",
    ),
    "lightning_queue.worker.tracing": (
        "emit_exception", "emit_message", "emit_object", "emit_reward", "llm_call",
    ),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
_MODULES = {"hooks": "lightning_queue.core.hooks"}  # ``from lightning_queue import hooks``

__all__ = [
    "APO",
    "LLM",
    "AgentNotConfiguredError",
    "AgentSignatureError",
    "Algorithm",
    "AsyncLightningClient",
    "Attempt",
    "AttemptClosedError",
    "AttemptNotFoundError",
    "Canary",
    "CanaryResult",
    "CancelReport",
    "Conclusion",
    "ConfigurationError",
    "Critic",
    "CriticError",
    "Dataset",
    "DeleteReport",
    "EnqueueError",
    "ErrorInfo",
    "Experiment",
    "ExperimentError",
    "ExperimentExistsError",
    "ExperimentNotFoundError",
    "ExperimentReport",
    "ExperimentStateError",
    "ExperimentUnitError",
    "Experiments",
    "FinishedPage",
    "FinishedRollout",
    "FunctionalLitAgent",
    "Guardrail",
    "InvalidCursorError",
    "InvalidDatasetError",
    "InvalidExperimentError",
    "InvalidFilterError",
    "InvalidPriceTableError",
    "InvalidQueueNameError",
    "InvalidResourcesError",
    "InvalidRewardError",
    "InvalidRolloutResultError",
    "InvalidVersionMetadataError",
    "LLMPrice",
    "LightningClient",
    "LightningQueueError",
    "LitAgent",
    "MissingResourceError",
    "NamedResources",
    "NoLatestResourcesError",
    "NoRunnersError",
    "PointerError",
    "PointerMove",
    "PromptLineage",
    "PromptNotFoundError",
    "PromptTemplate",
    "ProtectedPointerError",
    "Protection",
    "ProxyLLM",
    "ProxyResourceError",
    "RedisUnavailableError",
    "RegistryLostError",
    "Resource",
    "ResourcesExistError",
    "ResourcesNotFoundError",
    "ResourcesUpdate",
    "RetentionReport",
    "RewardSummary",
    "Rollout",
    "RolloutConfig",
    "RolloutFailed",
    "RolloutFilter",
    "RolloutNotFoundError",
    "RolloutPage",
    "RolloutRequest",
    "RolloutResult",
    "RunConflictError",
    "Settings",
    "SnapshotCorruptedError",
    "SnapshotDiff",
    "SnapshotInUseError",
    "SnapshotTooLargeError",
    "Span",
    "Trainer",
    "TrainingError",
    "TrainingTimeoutError",
    "Triplet",
    "UnknownResourceTypeError",
    "Usage",
    "Variant",
    "VersionConflictError",
    "VersionMeta",
    "create_app",
    "emit_exception",
    "emit_message",
    "emit_object",
    "emit_reward",
    "hooks",
    "llm_call",
    "retry_on_conflict",
    "rollout",
]



def __getattr__(name: str) -> Any:
    if name in _MODULES:
        value = importlib.import_module(_MODULES[name])
        globals()[name] = value
        return value
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
