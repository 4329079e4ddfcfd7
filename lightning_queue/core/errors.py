"""Every error a user can cause, in one small hierarchy.

Each message says what was wrong and what to do next. Catch
:class:`LightningQueueError` to handle all of them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable


class LightningQueueError(Exception):
    """Base class of every error raised by lightning-queue."""


class ConfigurationError(LightningQueueError):
    """The settings or the command line name something unusable."""


class RedisUnavailableError(LightningQueueError):
    """Redis could not be reached (at start-up or mid-operation)."""

    def __init__(self, url: str, cause: BaseException | None = None) -> None:
        detail = f": {str(cause).rstrip('.')}" if cause else ""
        # The password never appears in the message (it is logged and printed).
        super().__init__(
            f"cannot reach Redis at {redacted_url(url)}{detail}. Start a Redis server there, or point "
            "LQ_REDIS_URL at one (e.g. redis://host:6379/0)."
        )
        self.url = redacted_url(url)


class InvalidResourcesError(LightningQueueError, ValueError):
    """A resources mapping did not validate (malformed field, wrong type...)."""


class UnknownResourceTypeError(InvalidResourcesError):
    """A resource names a ``resource_type`` no class was registered for."""

    def __init__(self, resource_type: object, known: Iterable[str]) -> None:
        known_list = ", ".join(sorted(known))
        super().__init__(
            f"unknown resource_type {resource_type!r}; known types: {known_list}. "
            "Define a subclass of lightning_queue.Resource with "
            "`resource_type: Literal[...]` and import it before loading this snapshot."
        )
        self.resource_type = resource_type


class ResourcesNotFoundError(LightningQueueError, LookupError):
    """No snapshot is stored under the requested ``resources_id`` (or pointer)."""

    def __init__(self, resources_id: str, hint: str | None = None) -> None:
        message = f"no resource snapshot with resources_id {resources_id!r}"
        message += f"; {hint}" if hint else "; list the stored ones with `lightning-queue resources list`"
        super().__init__(message)
        self.resources_id = resources_id


class NoLatestResourcesError(ResourcesNotFoundError):
    """A rollout asked for the latest snapshot but none has been stored yet."""

    def __init__(self) -> None:
        super().__init__(
            "latest",
            hint="no snapshot has been stored yet: add one with client.add_resources(...) "
            "or `lightning-queue resources add` before enqueuing unpinned rollouts",
        )


class ResourcesExistError(LightningQueueError):
    """``add_resources`` was given an id that is already taken."""

    def __init__(self, resources_id: str) -> None:
        super().__init__(
            f"a snapshot with resources_id {resources_id!r} already exists; snapshots are "
            "immutable: use update_resources() to store a new version under this id, or pick another id"
        )
        self.resources_id = resources_id


class SnapshotCorruptedError(LightningQueueError):
    """A stored snapshot could not be decoded (bad payload or checksum)."""

    def __init__(self, resources_id: str, reason: str) -> None:
        super().__init__(
            f"snapshot {resources_id!r} is corrupted ({reason}); store it again with update_resources()"
        )
        self.resources_id = resources_id


class MissingResourceError(LightningQueueError, LookupError):
    """The agent asks for a resource the snapshot does not hold."""


class AgentSignatureError(LightningQueueError, TypeError):
    """A function given to ``@rollout`` has a parameter nothing can inject."""


class AgentNotConfiguredError(ConfigurationError):
    """A worker was asked to run rollouts but was given no agent."""


class InvalidRolloutResultError(LightningQueueError, TypeError):
    """An agent returned something that is neither a reward nor a RolloutResult."""


class RolloutNotFoundError(LightningQueueError, LookupError):
    """No rollout is stored under the requested id (never was, or it finished and expired)."""

    def __init__(self, rollout_id: str) -> None:
        super().__init__(
            f"no rollout with id {rollout_id!r}: it was never enqueued here, or it finished and its record "
            "expired (finished rollouts are kept LQ_ROLLOUT_TTL_SECONDS); list rollouts with "
            "`lightning-queue rollouts list`"
        )
        self.rollout_id = rollout_id


class EnqueueError(LightningQueueError):
    """Rollout records were written but their task messages could not be published.

    The affected rollouts are marked ``failed`` so nothing waits on them forever.
    """

    def __init__(self, rollout_ids: list[str], cause: BaseException) -> None:
        super().__init__(
            f"could not publish {len(rollout_ids)} rollout message(s) to the broker ({cause}); "
            "they were marked failed, enqueue them again once the broker is reachable"
        )
        self.rollout_ids = rollout_ids


class RolloutFailed(LightningQueueError):
    """Raised by the runner's task when a rollout ends ``failed``, so Celery and
    Flower show that task as failed. The rollout record holds the details."""

    def __init__(self, rollout_id: str, error_type: str, message: str) -> None:
        super().__init__(f"rollout {rollout_id} failed: {error_type}: {message}")
        self.rollout_id = rollout_id
        self.error_type = error_type
        self.error_message = message

    def __reduce__(self) -> tuple[type[RolloutFailed], tuple[str, str, str]]:
        # Celery checks that an exception survives pickling before logging it; without this it
        # becomes a plain LightningQueueError, `throws` no longer matches, and every failed
        # rollout is logged as "raised unexpected" with a traceback.
        return (type(self), (self.rollout_id, self.error_type, self.error_message))


class SnapshotTooLargeError(InvalidResourcesError):
    """A snapshot's serialized resources exceed the configured size limit."""

    def __init__(self, resources_id: str, size: int, limit: int) -> None:
        super().__init__(
            f"snapshot {resources_id!r} is {size} bytes serialized, over the limit of {limit} bytes "
            "(LQ_MAX_SNAPSHOT_BYTES); keep large data (datasets, documents) outside snapshots and store a "
            "reference to it instead"
        )
        self.size = size
        self.limit = limit


class VersionConflictError(LightningQueueError):
    """A compare-and-set update lost to a concurrent writer."""

    def __init__(self, resources_id: str, expected: int, current: int) -> None:
        super().__init__(
            f"snapshot {resources_id!r} is at version {current}, not the expected {expected}: another writer "
            "updated it first; read it again and retry (see lightning_queue.retry_on_conflict)"
        )
        self.resources_id = resources_id
        self.expected = expected
        self.current_version = current


class PointerError(LightningQueueError):
    """A pointer operation that cannot be done (bad name, nothing to roll back to...)."""


class SnapshotInUseError(LightningQueueError):
    """A snapshot cannot be deleted: rollouts or pointers still need it."""

    def __init__(self, resources_id: str, pointers: list[str], rollout_ids: list[str]) -> None:
        reasons = []
        if pointers:
            reasons.append(f"pointers {', '.join(sorted(pointers))} name it")
        if rollout_ids:
            shown = ", ".join(rollout_ids[:5]) + (" ..." if len(rollout_ids) > 5 else "")
            reasons.append(f"{len(rollout_ids)} queued or running rollouts use it ({shown})")
        super().__init__(
            f"snapshot {resources_id!r} is in use: {'; '.join(reasons)}. Move the pointers and let the rollouts "
            "finish, or delete with force=True (`--force` on the command line; those rollouts then fail with "
            "'snapshot deleted')"
        )
        self.resources_id = resources_id
        self.pointers = pointers
        self.rollout_ids = rollout_ids


class SnapshotDeletedError(LightningQueueError):
    """A rollout's snapshot was force-deleted while the rollout waited or ran; it failed at once
    and its message is dropped unrun (the ``error.type`` of such a rollout)."""

    def __init__(self, resources_id: str) -> None:
        super().__init__(
            f"snapshot {resources_id!r} was deleted (forced) while this rollout waited for it; enqueue it again "
            "with another snapshot"
        )
        self.resources_id = resources_id


class WorkerLostError(LightningQueueError):
    """An attempt's worker died or lost its connection while running it (the ``error.type`` of
    such an attempt); the broker redelivered the rollout, which is retried per its config."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(
            "the worker running this attempt died or lost its connection; the broker redelivered the rollout"
            + (f" ({detail})" if detail else "")
        )


class UnresponsiveAttemptError(LightningQueueError):
    """An attempt sent no heartbeat for the heartbeat timeout (its worker process hung, was
    stopped, or lost Redis); the watchdog closed it (the ``error.type`` of such an attempt)."""

    def __init__(self, timeout_seconds: float) -> None:
        super().__init__(
            f"the attempt sent no heartbeat for {timeout_seconds:g} s (its worker process hung, was stopped or "
            "lost Redis); the watchdog closed it. If the agent holds the GIL or blocks for long stretches, raise "
            "LQ_HEARTBEAT_TIMEOUT"
        )
        self.timeout_seconds = timeout_seconds


class PublishError(LightningQueueError):
    """Task messages could not be handed to the broker."""

    def __init__(self, rollout_ids: list[str], cause: BaseException) -> None:
        super().__init__(f"could not publish {len(rollout_ids)} rollout message(s) to the broker: {cause}")
        self.rollout_ids = rollout_ids
        self.cause = cause


class DuplicateRolloutIdError(LightningQueueError, ValueError):
    """One enqueue batch names the same rollout id (or idempotency key) twice."""

    def __init__(self, rollout_id: str) -> None:
        super().__init__(
            f"rollout id {rollout_id!r} appears twice in one enqueue batch (as rollout_id or through an "
            "idempotency_key); give each rollout its own id or key, nothing was enqueued"
        )
        self.rollout_id = rollout_id


# ----------------------------------------------------------------------------- experiments


class ExperimentError(LightningQueueError):
    """An experiment operation that cannot be done (base of the experiment errors)."""


class InvalidExperimentError(ExperimentError, ValueError):
    """An experiment's definition does not hold together (variants, weights, coverage, unit key...)."""


class ExperimentNotFoundError(ExperimentError, LookupError):
    """No experiment is stored under the requested name."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"no experiment named {name!r}; list them with `lightning-queue experiments status`, or create it "
            "with `lightning-queue experiments create`"
        )
        self.name = name


class ExperimentExistsError(ExperimentError):
    """``create`` was given a name that is already taken."""

    def __init__(self, name: str) -> None:
        super().__init__(f"an experiment named {name!r} already exists; pick another name")
        self.name = name


class ExperimentStateError(ExperimentError):
    """The experiment's status does not allow the operation (e.g. enqueue while stopped)."""

    def __init__(self, name: str, status: str, wanted: str) -> None:
        super().__init__(f"experiment {name!r} is {status}; {wanted}")
        self.name = name
        self.status = status


class ExperimentUnitError(ExperimentError, KeyError):
    """A task input has no value at the experiment's unit key."""

    def __init__(self, name: str, unit_key: str, item: object) -> None:
        shown = repr(item)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        super().__init__(
            f"experiment {name!r} assigns by {unit_key!r}, but this rollout has no value there: {shown}; "
            "add the field to every input (or metadata), or pass unit=<function> to enqueue"
        )
        self.unit_key = unit_key

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


# ----------------------------------------------------------------------------- connections and input


def redacted_url(url: str) -> str:
    """``url`` for messages and logs, with what is secret masked and nothing else: the password
    of the user info (``redis://user:**@host``) and the value of a ``password`` query parameter.
    A URL without a password is returned unchanged (a user name alone, ``redis://user@host``,
    is not a secret). Works on malformed URLs too: whatever stands before the last ``@`` after
    the scheme is user info, so a password holding ``/``, ``?`` or ``@`` is still masked whole.
    A ``;``-separated list of URLs (kombu's Sentinel form) is masked URL by URL."""
    if ";" in url:
        return ";".join(redacted_url(part) for part in url.split(";"))
    head, at, rest = url.rpartition("@")
    if at:
        scheme, sep, userinfo = head.partition("://")
        if not sep:
            scheme, sep, userinfo = head.partition(":")
        user, _, password = userinfo.partition(":")
        if password:
            url = f"{scheme}{sep}{user}:**@{rest}"
    return _PASSWORD_PARAMETER.sub(r"\1**", url)


_PASSWORD_PARAMETER = re.compile(r"([?&]password=)[^&#]+", re.IGNORECASE)


class InvalidRedisUrlError(ConfigurationError):
    """``LQ_REDIS_URL`` (or ``--redis-url``) is not a URL Redis clients understand."""

    def __init__(self, url: str, cause: BaseException | None = None) -> None:
        detail = f" ({cause})" if cause else ""
        super().__init__(
            f"LQ_REDIS_URL {redacted_url(url)!r} is not a usable Redis URL{detail}; write it as "
            "redis://[[user]:password@]host:port/db, rediss://... for TLS (CA options as query parameters, "
            "e.g. ?ssl_ca_certs=/path/ca.pem), or unix:///path/redis.sock"
        )
        self.url = redacted_url(url)


class RedisAuthError(RedisUnavailableError):
    """Redis answered but refused the credentials in the URL (wrong or missing password or user)."""

    def __init__(self, url: str, cause: BaseException | None = None) -> None:
        LightningQueueError.__init__(
            self,
            f"Redis at {redacted_url(url)} refused the credentials ({cause}); put the right user and password in "
            "LQ_REDIS_URL (redis://user:password@host:port/db, or redis://:password@... for requirepass) or "
            "--redis-url",
        )
        self.url = redacted_url(url)


class TemplateRenderError(LightningQueueError, KeyError):
    """A prompt template names a variable it was not given (or fails to render with those it was given)."""

    def __init__(self, template: str, missing: str, given: Iterable[str]) -> None:
        shown = template if len(template) <= 60 else template[:57] + "..."
        given_list = ", ".join(sorted(given)) or "none"
        LightningQueueError.__init__(
            self,
            f"prompt template {shown!r} cannot render: {missing} (variables given: {given_list}); pass every "
            "variable the template uses to format(), or change the template",
        )
        self.template = template
        self.missing = missing

    def __str__(self) -> str:  # KeyError would show the message quoted, as if it were a key
        return str(self.args[0])


class InvalidRolloutInputError(LightningQueueError, TypeError):
    """A rollout's task input cannot be stored: it is not JSON-serializable."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(
            f"the rollout input is not JSON-serializable ({cause}); pass dicts, lists, strings, numbers, "
            "booleans and None only (convert other objects, e.g. to str or a dict, before enqueuing)"
        )


# ----------------------------------------------------------------------------- traces and the LLM proxy


class AttemptNotFoundError(LightningQueueError, LookupError):
    """A rollout has no attempt with the requested id."""

    def __init__(self, rollout_id: str, attempt_id: str, known: Iterable[str] = ()) -> None:
        ids = ", ".join(known) or "none yet"
        super().__init__(
            f"rollout {rollout_id} has no attempt {attempt_id!r} (its attempts: {ids}); see them with "
            f"`lightning-queue rollouts status {rollout_id}`"
        )
        self.rollout_id = rollout_id
        self.attempt_id = attempt_id


class AttemptClosedError(LightningQueueError):
    """The LLM proxy refused a call: the attempt its URL names is not open (it finished, was
    superseded or closed, or its rollout is gone). Its agent should stop calling."""

    def __init__(self, reason: str) -> None:
        super().__init__(
            f"the LLM proxy refuses this call: {reason}. It forwards the calls of running attempts only; an agent "
            "gets its base URL from the ProxyLLM resource of the attempt it runs"
        )
        self.reason = reason


class ProxyResourceError(LightningQueueError, LookupError):
    """The LLM proxy was asked for a resource the attempt's snapshot does not hold as an LLM."""

    def __init__(self, resources_id: str, version: int | None, resource: str, held: Iterable[str]) -> None:
        super().__init__(
            f"snapshot {resources_id!r} (version {version}) has no LLM or ProxyLLM resource named {resource!r} "
            f"(it holds: {', '.join(held) or 'nothing'}); give the agent the scoped LLM the worker injects instead "
            "of building the proxy URL by hand"
        )
        self.resource = resource


class InvalidRewardError(LightningQueueError, ValueError):
    """``emit_reward`` was given something that is not a finite number, or an empty name."""


class InvalidPriceTableError(ConfigurationError):
    """An LLM price table (``LQ_LLM_PRICES``, ``--prices``) does not parse."""

    def __init__(self, source: str, problem: str) -> None:
        super().__init__(
            f"the LLM price table in {source} is not valid ({problem}); write JSON mapping each model name (or "
            "'*') to USD per million tokens, e.g. {\"gpt-4o-mini\": {\"input\": 0.15, \"output\": 0.6}}"
        )
