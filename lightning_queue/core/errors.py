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


class NonFiniteRewardError(InvalidRolloutResultError, ValueError):
    """An agent reported a reward (or a step reward) that is NaN or infinite: JSON cannot hold it,
    and a mean over it means nothing. The attempt fails with this error instead of storing null."""

    def __init__(self, field: str, value: float) -> None:
        super().__init__(
            f"the agent reported {field} = {value!r}; rewards must be finite numbers (JSON has no NaN or "
            "infinity): return a finite float, or None for no reward"
        )
        self.field = field
        self.value = value


class AgentExitError(LightningQueueError):
    """An agent raised ``SystemExit`` (``sys.exit()``) or ``KeyboardInterrupt`` inside a rollout: the
    attempt fails with this error (naming which) and the worker process goes on."""

    def __init__(self, exc: BaseException) -> None:
        what = f"called sys.exit({exc.code!r}) (SystemExit)" if isinstance(exc, SystemExit) else \
            f"raised {type(exc).__name__}"
        super().__init__(
            f"the agent {what} inside the rollout; an agent reports failure by raising an Exception, never by "
            "exiting: the attempt failed and the worker process went on"
        )
        self.exit_type = type(exc).__name__


class RolloutNotFoundError(LightningQueueError, LookupError):
    """No rollout is stored under the requested id (never was, or it finished and expired)."""

    def __init__(self, rollout_id: str) -> None:
        super().__init__(
            f"no rollout with id {rollout_id!r}: it was never enqueued here, or it finished and its record "
            "expired (finished rollouts are kept LQ_ROLLOUT_TTL_SECONDS); list rollouts with "
            "`lightning-queue rollouts list`"
        )
        self.rollout_id = rollout_id


class RegistryLostError(RolloutNotFoundError):
    """Redis lost its data (restarted without persistence, flushed, or failed over to an empty
    replica): the registry epoch this process knew is gone or was replaced, and with it every
    snapshot, pointer and rollout record written before. A :class:`RolloutNotFoundError` when a
    wait finds its records gone for this reason (``rollout_id`` names one of them)."""

    def __init__(self, known: str, current: str | None, rollout_id: str | None = None) -> None:
        now = f"a new registry (epoch {current!r}) has been started since" if current else "it is empty now"
        what = f"rollout {rollout_id!r} and " if rollout_id else ""
        LightningQueueError.__init__(
            self,
            f"Redis lost its data: the registry epoch {known!r} this process knew is gone and {now}, so {what}every "
            "snapshot, pointer and rollout written before are gone; store the snapshots again and enqueue the "
            "rollouts again (and give Redis persistence: appendonly yes, see docs/operations.md)",
        )
        self.rollout_id = rollout_id or ""
        self.known_epoch = known
        self.current_epoch = current


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


class ProtectedPointerError(PointerError):
    """A protected pointer (``prod``...) was asked to move, or its snapshot to be deleted, without
    ``force=True`` and a reason; nothing was changed."""

    def __init__(self, pointer: str, protection_reason: str = "", protected_by: str = "", *,
                 operation: str = "move") -> None:
        why = f" ({protection_reason}" + (f", by {protected_by}" if protected_by else "") + ")" \
            if protection_reason or protected_by else ""
        if operation == "delete":
            todo = "unprotect it first (`lightning-queue resources unprotect`) or point it at another snapshot"
        else:
            todo = "move it with force=True and a reason (`--force --reason ...` on the command line)"
        super().__init__(f"pointer {pointer!r} is protected{why}; it was not changed: {todo}")
        self.pointer = pointer
        self.protection_reason = protection_reason
        self.protected_by = protected_by


class InvalidVersionMetadataError(LightningQueueError, ValueError):
    """A snapshot version's message, author, tags or parent is not acceptable; nothing was written."""

    def __init__(self, problems: str) -> None:
        super().__init__(
            f"invalid version metadata: {problems}. Messages hold up to 4000 characters, authors up to 200, "
            "tags up to 32 of 1-64 letters, digits, '.', '_', ':', '/', '=' or '-' (starting with a letter or "
            "digit); a parent is 'resources_id' or 'resources_id@version'"
        )
        self.problems = problems


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


class InvalidRolloutIdError(LightningQueueError, ValueError):
    """A caller-chosen rollout id holds characters that could address another key (``:``...)."""

    def __init__(self, rollout_id: object) -> None:
        super().__init__(
            f"invalid rollout id {rollout_id!r}: use 1-200 letters, digits, '.', '_', '@' or '-', starting with a "
            "letter or digit (no ':': such an id could address another rollout's attempt record); or pass an "
            "idempotency_key, which may hold anything"
        )
        self.rollout_id = rollout_id


class InvalidQueueNameError(LightningQueueError, ValueError):
    """A queue name (``enqueue_rollouts(queue=...)``, ``LQ_QUEUE``, a route) that cannot name a
    broker queue: outside the safe characters, or one of kombu's own keys."""

    def __init__(self, name: object, reason: str) -> None:
        super().__init__(f"queue name {name!r} cannot be used: {reason}")
        self.name = name


class ConnectionBudgetError(ConfigurationError):
    """A worker's broker connection limits are below what its pool needs at its concurrency."""

    def __init__(self, setting: str, configured: int, needed: int, pool: str, concurrency: int) -> None:
        super().__init__(
            f"{setting} is {configured}, but a {pool} pool of {concurrency} needs at least {needed} broker "
            f"connections; raise {setting} in LQ_CELERY or lower the concurrency"
        )
        self.setting, self.configured, self.needed = setting, configured, needed


class MessageLostError(LightningQueueError):
    """A queued rollout's task message was found missing (from the queue, the workers' unacked
    messages and the retry schedule) and re-sent too many times (the ``error.type`` of such a rollout)."""

    def __init__(self, resends: int) -> None:
        super().__init__(
            f"its task message went missing {resends} times and was re-sent each time; something removes "
            "messages from the broker (see the dead-letter list and the workers' logs), enqueue it again once fixed"
        )
        self.resends = resends


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


# ----------------------------------------------------------------------------- training


class TrainingError(LightningQueueError):
    """A training run cannot go on (base of the training errors)."""


class InvalidDatasetError(TrainingError, ValueError):
    """A dataset cannot be used: a line that is not a JSON object, an input id given twice, nothing to split..."""


class NoRunnersError(TrainingError):
    """``Trainer(n_runners=...)`` waited for that many rollout slots on the queue and did not find them."""

    def __init__(self, queue: str, wanted: int, found: int, waited: float) -> None:
        super().__init__(
            f"the Trainer waited {waited:g} s for {wanted} rollout slot(s) consuming queue {queue!r} and found "
            f"{found}; start workers on it (`lightning-queue worker --agent module:attr --queue {queue}`), or pass "
            "n_runners=0 to enqueue without waiting for them"
        )
        self.queue = queue
        self.wanted = wanted
        self.found = found


class TrainingTimeoutError(TrainingError, TimeoutError):
    """A training run's rollouts did not finish within the Trainer's ``rollout_timeout``."""

    def __init__(self, run: str, pending: int, timeout: float) -> None:
        super().__init__(
            f"training run {run!r}: {pending} rollout(s) did not finish within {timeout:g} s; check that workers "
            "consume the queue (`lightning-queue workers`) or raise rollout_timeout, then run again with the same "
            "run name: it resumes, and finished rollouts are not run again"
        )
        self.run = run
        self.pending = pending


class CriticError(TrainingError):
    """The critic model's endpoint could not be reached, or answered something that is not a chat completion."""

    def __init__(self, endpoint: str, detail: str) -> None:
        super().__init__(
            f"the critic at {endpoint} failed: {detail}; check the critic's LLM (endpoint, model, api_key), or "
            "LQ_CRITIC_ENDPOINT / LQ_CRITIC_MODEL / LQ_CRITIC_API_KEY"
        )
        self.endpoint = endpoint


class PromptNotFoundError(TrainingError, LookupError):
    """The snapshot an optimizer starts from holds no prompt template of the name asked for (or
    several templates and no name)."""

    def __init__(self, resources_id: str, held: Iterable[str], name: str | None) -> None:
        templates = ", ".join(sorted(held)) or "none"
        asked = f"no prompt template named {name!r}" if name else "several prompt templates"
        super().__init__(
            f"snapshot {resources_id!r} holds {asked} (its prompt templates: {templates}); pass "
            "prompt_name=<one of them>, or start from a snapshot that holds the template to optimize"
        )
        self.resources_id = resources_id
        self.name = name


class RunConflictError(TrainingError):
    """A training run's name is reused with another starting snapshot or another algorithm."""

    def __init__(self, run: str, recorded: str, given: str) -> None:
        super().__init__(
            f"training run {run!r} was started from {recorded}, not {given}; resume it with what it started from, "
            "or give this run a new run_name"
        )
        self.run = run


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

    what = "input"

    def __init__(self, cause: BaseException) -> None:
        super().__init__(
            f"the rollout {self.what} is not JSON-serializable ({cause}); pass dicts, lists, strings, numbers, "
            "booleans and None only (convert other objects, e.g. to str or a dict, before enqueuing)"
        )


class InvalidRolloutMetadataError(InvalidRolloutInputError):
    """A rollout's metadata cannot be stored: it is not JSON-serializable."""

    what = "metadata"


# ----------------------------------------------------------------------------- the HTTP server


class ServerCredentialsError(ConfigurationError):
    """``lightning-queue server`` was asked to listen beyond loopback without credentials."""

    def __init__(self, host: str) -> None:
        super().__init__(
            f"the server would listen on {host!r}, beyond loopback, without credentials; set LQ_SERVER_PASSWORD "
            "(HTTP basic auth, user LQ_SERVER_USER) or LQ_SERVER_TOKEN (bearer), or listen on 127.0.0.1"
        )
        self.host = host


class AuthenticationRequiredError(LightningQueueError):
    """An HTTP request to the server carried no credentials, or wrong ones, where they are required
    (every request when it listens beyond loopback; every change always). Answered with 401."""

    def __init__(self, changing: bool) -> None:
        what = "this call changes state and needs" if changing else "this server needs"
        super().__init__(
            f"{what} credentials: send HTTP basic auth (LQ_SERVER_USER / LQ_SERVER_PASSWORD) or "
            "'Authorization: Bearer <LQ_SERVER_TOKEN>'"
        )


class CrossSiteRequestError(LightningQueueError):
    """A state-changing HTTP request came from a page of another origin (a possible cross-site request
    forgery). Answered with 403."""

    def __init__(self, origin: str) -> None:
        super().__init__(
            f"refused a change requested by a page of another origin ({origin!r}); make it from the dashboard "
            "itself, from a non-browser client, or list that origin in LQ_SERVER_CORS_ORIGINS"
        )
        self.origin = origin


class InvalidCursorError(LightningQueueError, ValueError):
    """A rollouts page cursor was not one the server handed out."""

    def __init__(self, cursor: str) -> None:
        shown = cursor if len(cursor) <= 40 else cursor[:37] + "..."
        super().__init__(
            f"invalid page cursor {shown!r}; pass the next_cursor of the previous page as it was returned, or "
            "leave it out to start from the newest rollout"
        )


class InvalidFilterError(LightningQueueError, ValueError):
    """A rollout filter (query, bulk cancel, finished-rollouts cursor) that does not hold together."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"invalid rollout filter: {problem}")


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
