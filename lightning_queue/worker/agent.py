"""Agents: a :class:`LitAgent` base class and the :func:`rollout` decorator.

The runner hands an agent the task input, the snapshot's resources and the
rollout record; the agent returns a reward (a number), a
:class:`~lightning_queue.models.RolloutResult`, or ``None`` (no reward).

:func:`snapshot_ref` and :func:`run_agent` are the rules of one attempt (which
snapshot a rollout runs with; how the agent's return or exception becomes the
attempt's outcome), shared by the runner and by the Trainer's inline dev mode.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import numbers
import types
import typing
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from billiard.common import terminate_handler_fired
from billiard.exceptions import SoftTimeLimitExceeded
from celery.exceptions import WorkerShutdown, WorkerTerminate
from pydantic import ValidationError
from pydantic_core import PydanticSerializationError

from lightning_queue.core.errors import (
    AgentExitError,
    AgentSignatureError,
    InvalidRolloutResultError,
    MissingResourceError,
    NonFiniteRewardError,
)
from lightning_queue.core.models import ErrorInfo, Resource, ResourcesUpdate, Rollout, RolloutResult
from lightning_queue.core.policy import is_retryable

RawResult = float | int | RolloutResult | Mapping[str, Any] | None


def to_result(raw: Any) -> RolloutResult:
    """Normalize what an agent returned into a :class:`RolloutResult`."""
    if raw is None:
        return RolloutResult()
    if isinstance(raw, RolloutResult):
        return raw
    if isinstance(raw, numbers.Real):
        return RolloutResult(reward=float(raw))
    if isinstance(raw, Mapping):
        try:
            return RolloutResult.model_validate(raw)
        except ValidationError as exc:
            raise InvalidRolloutResultError(
                f"the agent returned a mapping that is not a RolloutResult: {exc}"
            ) from None
    raise InvalidRolloutResultError(
        f"the agent returned a {type(raw).__name__}; return a float reward, a RolloutResult "
        "(reward, step_rewards, trace, output) or None"
    )


class LitAgent:
    """Base class of agents. Implement :meth:`rollout` (sync) or :meth:`rollout_async`.

    ``resources`` maps names to the resources of the snapshot the rollout
    runs with; ``rollout`` is the rollout record (id, mode, metadata, ...).

    ``default_resources`` (a snapshot id or pointer name, e.g. ``"prod"``) is
    what rollouts that name no snapshot run with on this agent's workers;
    ``None`` means ``latest``.
    """

    name: str | None = None
    default_resources: str | None = None

    def rollout(self, task: Any, resources: Mapping[str, Resource], rollout: Rollout) -> RawResult:
        raise NotImplementedError(f"{type(self).__name__} must implement rollout() or rollout_async()")

    async def rollout_async(self, task: Any, resources: Mapping[str, Resource], rollout: Rollout) -> RawResult:
        raise NotImplementedError(f"{type(self).__name__} must implement rollout() or rollout_async()")

    @property
    def is_async(self) -> bool:
        return type(self).rollout_async is not LitAgent.rollout_async

    def execute(self, task: Any, resources: Mapping[str, Resource], rollout: Rollout) -> RolloutResult:
        """Run one rollout to completion (an async agent in a fresh event loop)."""
        if self.is_async:
            raw = asyncio.run(self.rollout_async(task, resources, rollout))
        else:
            raw = self.rollout(task, resources, rollout)
        return to_result(raw)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name or ''}>".replace(" >", ">")


@dataclass(frozen=True)
class _Injection:
    parameter: str
    kind: typing.Literal["resources", "rollout", "resource"]
    resource_type: type[Resource] | None = None
    optional: bool = False


def pick_resource(
    resources: Mapping[str, Resource], resource_type: type[Resource], parameter: str, optional: bool = False
) -> Resource | None:
    """The resource a parameter asks for: the one named like the parameter, else the
    only one of that type. Raises :class:`MissingResourceError` when there is none
    (unless ``optional``) or when several fit and none has the parameter's name."""
    fitting = {name: r for name, r in resources.items() if isinstance(r, resource_type)}
    if parameter in fitting:
        return fitting[parameter]
    if len(fitting) == 1:
        return next(iter(fitting.values()))
    held = ", ".join(f"{n} ({r.resource_type})" for n, r in resources.items()) or "nothing"
    if not fitting:
        if optional:
            return None
        raise MissingResourceError(
            f"parameter {parameter!r} needs a {resource_type.__name__} resource but the snapshot holds {held}"
        )
    raise MissingResourceError(
        f"parameter {parameter!r} needs a {resource_type.__name__} resource and the snapshot holds several "
        f"({', '.join(sorted(fitting))}); rename the parameter to one of those names"
    )


class FunctionalLitAgent(LitAgent):
    """An agent made from a plain function by :func:`rollout`."""

    def __init__(
        self,
        func: Callable[..., RawResult | Awaitable[RawResult]],
        name: str | None = None,
        default_resources: str | None = None,
    ) -> None:
        self.func = func
        self.name = name or func.__name__
        self.default_resources = default_resources
        self._async = inspect.iscoroutinefunction(func)
        self._plan = self._plan_injections(func)
        self.__doc__ = func.__doc__

    @property
    def is_async(self) -> bool:
        return self._async

    @staticmethod
    def _plan_injections(func: Callable[..., Any]) -> list[_Injection]:
        signature = inspect.signature(func)
        params = list(signature.parameters.values())
        if not params or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
            raise AgentSignatureError(f"{func.__qualname__} must take the task input as its first parameter")
        try:
            hints = typing.get_type_hints(func)
        except Exception as exc:  # unresolvable forward references
            raise AgentSignatureError(f"cannot read the annotations of {func.__qualname__}: {exc}") from exc
        plan = []
        for param in params[1:]:
            annotation = _resource_class(hints.get(param.name))
            has_default = param.default is not param.empty
            if annotation is not None:
                plan.append(_Injection(param.name, "resource", annotation, optional=has_default))
            elif param.name == "resources":
                plan.append(_Injection(param.name, "resources"))
            elif param.name == "rollout":
                plan.append(_Injection(param.name, "rollout"))
            elif not has_default and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                raise AgentSignatureError(
                    f"{func.__qualname__}: nothing can be injected into parameter {param.name!r}; annotate it "
                    "with a resource type (LLM, PromptTemplate, ...), name it 'resources' or 'rollout', "
                    "or give it a default"
                )
        return plan

    def _kwargs(self, resources: Mapping[str, Resource], rollout: Rollout) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        for step in self._plan:
            if step.kind == "resources":
                kwargs[step.parameter] = resources
            elif step.kind == "rollout":
                kwargs[step.parameter] = rollout
            else:
                assert step.resource_type is not None
                value = pick_resource(resources, step.resource_type, step.parameter, step.optional)
                if value is not None:
                    kwargs[step.parameter] = value
        return kwargs

    def rollout(self, task: Any, resources: Mapping[str, Resource], rollout: Rollout) -> RawResult:
        raw = typing.cast(RawResult, self.func(task, **self._kwargs(resources, rollout)))
        return raw

    async def rollout_async(self, task: Any, resources: Mapping[str, Resource], rollout: Rollout) -> RawResult:
        raw = await typing.cast(Awaitable[RawResult], self.func(task, **self._kwargs(resources, rollout)))
        return raw

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the wrapped function directly (handy in unit tests of the agent)."""
        return self.func(*args, **kwargs)


def _resource_class(annotation: Any) -> type[Resource] | None:
    """``LLM``, ``LLM | None`` or ``Optional[LLM]`` -> LLM; anything else -> None."""
    if inspect.isclass(annotation) and issubclass(annotation, Resource):
        return annotation
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return None  # list[LLM], dict[str, LLM]... are not one resource
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(args) == 1 and inspect.isclass(args[0]) and issubclass(args[0], Resource):
        return args[0]
    return None


def rollout(
    func: Callable[..., Any] | None = None, *, name: str | None = None, default_resources: str | None = None
) -> FunctionalLitAgent | Callable[[Callable[..., Any]], FunctionalLitAgent]:
    """Turn a sync or async function into an agent, injecting by parameter.

    The first parameter receives the task input. Then:

    * a parameter annotated with a resource type (``LLM``, ``PromptTemplate``,
      or your own) gets the snapshot's resource of that type; when the
      snapshot holds several, the one whose name equals the parameter name;
    * a parameter named ``resources`` gets the whole mapping;
    * a parameter named ``rollout`` gets the rollout record.

    A snapshot lacking a requested resource fails the rollout with
    :class:`MissingResourceError` (unless the parameter has a default).

    ``@rollout(default_resources="prod")`` runs rollouts that name no
    snapshot with the one ``prod`` names when they start, instead of ``latest``.
    """

    def wrap(f: Callable[..., Any]) -> FunctionalLitAgent:
        return FunctionalLitAgent(f, name=name, default_resources=default_resources)

    return wrap(func) if func is not None else wrap


# --------------------------------------------------------------------------- one attempt


def check_finite(result: RolloutResult) -> None:
    """Raise :class:`NonFiniteRewardError` when the reward or a step reward is NaN or infinite
    (JSON would store it as null, and a succeeded rollout would read as having no reward)."""
    if result.reward is not None and not math.isfinite(result.reward):
        raise NonFiniteRewardError("reward", result.reward)
    for i, value in enumerate(result.step_rewards or ()):
        if not math.isfinite(value):
            raise NonFiniteRewardError(f"step_rewards[{i}]", value)


def snapshot_ref(rollout: Rollout, agent: LitAgent) -> tuple[str | None, int | None]:
    """Which snapshot ``rollout`` runs with on ``agent``: ``(reference, version)``.

    The reference is the rollout's ``resources_id`` (a concrete id when pinned, an id or
    pointer name when following), else the agent's ``default_resources``; ``None`` means
    ``latest``. The version is fixed only for a pinned rollout (``None``: the current one).
    """
    version = rollout.resources_version if rollout.resolve == "pinned" else None
    return rollout.resources_id or agent.default_resources, version


@dataclass(frozen=True)
class AttemptOutcome:
    """How one attempt of the agent ended: what the runner records, and what dev mode reports.

    ``retryable`` is False for an error another attempt cannot fix (see
    :func:`lightning_queue.core.policy.is_retryable`).
    """

    status: Literal["succeeded", "failed", "timeout"]
    result: RolloutResult | None = None
    error: ErrorInfo | None = None
    retryable: bool = True


def run_agent(
    agent: LitAgent, rollout: Rollout, snapshot: ResourcesUpdate, time_limit: float | None = None, *,
    resources: Mapping[str, Resource] | None = None, context: AbstractContextManager[Any] | None = None,
) -> AttemptOutcome:
    """Run ``agent`` on ``rollout`` with ``snapshot``'s resources and say how it ended.

    The agent gets a read-only view of the resources (the snapshot may be a cache's shared
    copy), or of ``resources`` when given (the worker's, scoped to the attempt for tracing);
    ``context`` (the attempt's root span, on workers) is entered around the agent's run. Its
    result must be JSON-serializable to be stored. Every exception the agent raises becomes a
    ``failed`` outcome carrying it; a soft time limit (``time_limit``, for the message) a
    ``timeout``; a NaN or infinite reward a ``failed`` one (:class:`NonFiniteRewardError`), and
    so does an agent calling ``sys.exit`` or raising ``KeyboardInterrupt``
    (:class:`AgentExitError`), unless the process really was told to end (a cancel's SIGTERM, a
    shutdown), which is re-raised. Never raises for the agent's own failures.
    """
    view: Mapping[str, Resource] = MappingProxyType(
        dict(resources) if resources is not None else snapshot.resources
    )
    try:
        with context if context is not None else nullcontext():
            result = agent.execute(rollout.input, view, rollout)
        check_finite(result)
        result.model_dump_json()  # the output must be JSON-able to be stored
    except (WorkerShutdown, WorkerTerminate):
        raise  # Celery's own shutdown (solo pool), not the agent's
    except (SystemExit, KeyboardInterrupt) as exc:
        if terminate_handler_fired():
            raise  # the process was told to end (a cancel's SIGTERM, a shutdown), not the agent's doing
        # The agent tried to end the worker process: report what it did, and go on.
        error = ErrorInfo.from_exception(AgentExitError(exc), with_traceback=False)
        error.traceback = ErrorInfo.from_exception(exc).traceback
        return AttemptOutcome("failed", error=error)
    except SoftTimeLimitExceeded as exc:
        return AttemptOutcome("timeout", error=ErrorInfo(
            type="SoftTimeLimitExceeded",
            message=f"the rollout ran past its time limit of {time_limit} s",
            traceback=ErrorInfo.from_exception(exc).traceback,
        ))
    except PydanticSerializationError as exc:
        return AttemptOutcome("failed", error=ErrorInfo.from_exception(
            InvalidRolloutResultError(f"the agent's output is not JSON-serializable: {exc}")
        ))
    except Exception as exc:  # noqa: BLE001 - the agent's own failure, whatever it is
        retryable = is_retryable(exc)
        if isinstance(exc, MissingResourceError):
            exc = MissingResourceError(f"snapshot {snapshot.resources_id!r} (version {snapshot.version}): {exc}")
        return AttemptOutcome("failed", error=ErrorInfo.from_exception(exc), retryable=retryable)
    return AttemptOutcome("succeeded", result=result)
