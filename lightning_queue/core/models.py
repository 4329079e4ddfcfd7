"""The shared vocabulary: resources, snapshots, rollouts, attempts, results.

Every component (registry, store, client, runner, CLI) speaks in these models.
Resource types form a discriminated union on ``resource_type`` that users can
extend: any subclass of :class:`Resource` that declares
``resource_type: Literal["my_type"] = "my_type"`` is registered when it is defined.
"""

from __future__ import annotations

import getpass
import os
import re
import socket
import string
import time
import typing
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlparse

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    SerializationInfo,
    SerializeAsAny,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticSerializationError, to_json

from lightning_queue.core.errors import (
    InvalidResourcesError,
    InvalidRolloutIdError,
    InvalidRolloutInputError,
    InvalidRolloutMetadataError,
    InvalidVersionMetadataError,
    TemplateRenderError,
    UnknownResourceTypeError,
)
from lightning_queue.core.traces import Usage

RolloutMode = Literal["train", "val", "test"]
ResolveMode = Literal["pinned", "following"]

# Every status is spelled here once; the sets below, the keys, the store and the Lua scripts
# (which receive them as arguments) all derive from these.
RolloutStatus = Literal["queuing", "preparing", "running", "requeuing", "succeeded", "failed", "cancelled"]
AttemptStatus = Literal[
    "preparing", "running", "succeeded", "failed", "timeout", "worker_lost", "unresponsive", "cancelled"
]
RetryableStatus = Literal["failed", "timeout", "worker_lost", "unresponsive"]

ROLLOUT_STATUSES: tuple[RolloutStatus, ...] = typing.get_args(RolloutStatus)
"""Every rollout status, in the order of the status index keys the Lua scripts receive."""
TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
"""A rollout in one of these statuses never changes again."""
OPEN_STATUSES: frozenset[str] = frozenset({"preparing", "running"})
"""A rollout in one of these has an open attempt on some worker (which heartbeats it)."""
WAITING_STATUSES: frozenset[str] = frozenset({"queuing", "requeuing"})
"""Waiting for a worker: the rollout's task message must exist (queued, held by a worker, or its retry
scheduled); the reaper looks for it."""
ACTIVE_STATUSES: tuple[RolloutStatus, ...] = tuple(s for s in ROLLOUT_STATUSES if s not in TERMINAL_STATUSES)
"""Not finished yet: waiting for a worker, on one, or waiting to be retried."""
CLOSED_ATTEMPT_STATUSES: frozenset[str] = frozenset({"timeout", "worker_lost", "unresponsive"})
"""Attempt outcomes recorded from outside the attempt: a late result from it is refused."""

REVEAL_SECRETS = {"reveal_secrets": True}
"""Serialization context under which secrets are written in clear (only for storage)."""


def new_id(prefix: str) -> str:
    """``prefix-`` and 16 random hex digits (64 bits)."""
    return f"{prefix}-{os.urandom(8).hex()}"


# --------------------------------------------------------------------------- resources


class Resource(BaseModel):
    """Base of every resource type. Subclasses are registered by their ``resource_type``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    resource_type: str
    _registry: ClassVar[dict[str, type[Resource]]] = {}

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        name = cls.model_fields["resource_type"].default
        if not isinstance(name, str):
            raise TypeError(
                f"{cls.__name__} must declare `resource_type: Literal['<name>'] = '<name>'` "
                "so snapshots can name it"
            )
        existing = Resource._registry.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise TypeError(f"resource_type {name!r} is already registered by {existing.__qualname__}")
        Resource._registry[name] = cls

    @classmethod
    def registered_types(cls) -> dict[str, type[Resource]]:
        return dict(Resource._registry)

    @field_serializer("*", mode="wrap")
    def _serialize_secret(self, value: Any, handler: Any, info: SerializationInfo) -> Any:
        # Every SecretStr field (LLM.api_key, and any a user's resource declares) is written in
        # clear only for storage (the REVEAL_SECRETS context); JSON anywhere else shows it masked.
        if not isinstance(value, SecretStr):
            return handler(value)
        if (info.context or {}).get("reveal_secrets"):
            return value.get_secret_value()
        return value if info.mode == "python" else "**********"


class LLM(Resource):
    """An LLM endpoint (any OpenAI-compatible server) and how to sample from it.

    ``api_key`` is a secret: ``repr``, ``str``, logs and the CLI show ``**********``.
    """

    resource_type: Literal["llm"] = "llm"
    endpoint: str
    model: str
    api_key: SecretStr | None = None
    sampling_parameters: dict[str, Any] = Field(default_factory=dict)

    @field_validator("endpoint")
    @classmethod
    def _endpoint_is_a_url(cls, value: str) -> str:
        # Checked when the snapshot is stored, not when the first rollout calls it on a worker.
        return _http_url("endpoint", value, "http://llm-host:8000/v1")


def _http_url(field: str, value: str, example: str) -> str:
    parsed = urlparse(value)
    if parsed.scheme not in ("http", "https") or not parsed.netloc or any(c.isspace() for c in value):
        raise ValueError(f"{field} {value!r} is not an http(s) URL; give the server's base URL, e.g. {example}")
    return value


PROXY_PATH = "/rollout/{rollout_id}/attempt/{attempt_id}/llm/{resource}/v1"
"""Where ``lightning-queue proxy`` serves one attempt's calls to one LLM resource of its snapshot
(an OpenAI base URL: ``/chat/completions`` follows)."""


class ProxyLLM(Resource):
    """An :class:`LLM` the agent reaches through ``lightning-queue proxy``, which records every
    call (tokens, latency, cost) in the attempt's trace.

    The agent never sees ``llm`` nor its key: the worker hands it, under this resource's name,
    an :class:`LLM` whose ``endpoint`` is the proxy's base URL scoped to the rollout and attempt
    (:meth:`scoped`), with ``llm``'s model and sampling parameters and no key. Whatever model or
    sampling parameters the agent then sends, the proxy forwards the call to ``llm``'s endpoint
    with ``llm``'s model, sampling parameters and key, read from the snapshot the attempt runs
    with: an agent that only knows "an OpenAI endpoint" is still optimized selectively.
    """

    resource_type: Literal["proxy_llm"] = "proxy_llm"
    proxy_url: str
    llm: LLM

    @field_validator("proxy_url")
    @classmethod
    def _proxy_url_is_a_url(cls, value: str) -> str:
        return _http_url("proxy_url", value, "http://lq-proxy:8088").rstrip("/")

    def scoped(self, resource: str, rollout_id: str, attempt_id: str) -> LLM:
        """The LLM the agent is given for attempt ``attempt_id`` of ``rollout_id``, this resource
        being named ``resource`` in the snapshot."""
        from urllib.parse import quote

        path = PROXY_PATH.format(rollout_id=quote(rollout_id, safe=""), attempt_id=quote(attempt_id, safe=""),
                                 resource=quote(resource, safe=""))
        return LLM(endpoint=self.proxy_url + path, model=self.llm.model,
                   sampling_parameters=dict(self.llm.sampling_parameters))


class PromptTemplate(Resource):
    """A text template, formatted with ``str.format`` (``f-string``) or Jinja2."""

    resource_type: Literal["prompt_template"] = "prompt_template"
    template: str
    engine: Literal["f-string", "jinja"] = "f-string"

    @model_validator(mode="after")
    def _template_parses(self) -> PromptTemplate:
        # A template with a syntax error is refused when the snapshot is stored, not at rollout time.
        try:
            if self.engine == "f-string":
                list(string.Formatter().parse(self.template))
            else:
                import jinja2  # here, not above: every snapshot read validates its f-string templates

                try:
                    jinja2.Environment().parse(self.template)
                except jinja2.TemplateSyntaxError as exc:
                    raise ValueError(str(exc)) from None
        except ValueError as exc:
            raise ValueError(
                f"field template: {self.engine} template does not parse ({exc}); "
                + ("double literal braces as {{ and }}" if self.engine == "f-string" else "fix its Jinja syntax")
            ) from None
        return self

    def format(self, **kwargs: Any) -> str:
        """Fill the template. A variable it uses but is not given raises
        :class:`TemplateRenderError` (a ``KeyError``) naming it, with both engines."""
        if self.engine == "f-string":
            try:
                return self.template.format(**kwargs)
            except KeyError as exc:
                raise TemplateRenderError(self.template, f"missing variable {exc}", kwargs) from None
            except IndexError as exc:
                raise TemplateRenderError(
                    self.template, f"positional field {{}} or {{0}} ({exc}): name every field", kwargs
                ) from None
        import jinja2

        env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)
        try:
            return env.from_string(self.template).render(**kwargs)
        except jinja2.UndefinedError as exc:
            raise TemplateRenderError(self.template, str(exc), kwargs) from None

    def variables(self) -> set[str]:
        """Names the template uses (f-string engine: top-level field names only)."""
        if self.engine == "f-string":
            fields = (name for _, name, _, _ in string.Formatter().parse(self.template) if name)
            return {name.split(".")[0].split("[")[0] for name in fields}
        import jinja2
        from jinja2 import meta

        return set(meta.find_undeclared_variables(jinja2.Environment().parse(self.template)))


class PromptLineage(Resource):
    """Where a candidate prompt came from, stored in the candidate's own snapshot by an optimizer
    (:mod:`lightning_queue.training`): the run, the template it describes (by resource name), the
    parent snapshot it was edited from and the critique that led to the edit. Agents never need it;
    it is defined here so that every process (workers too) can read a snapshot that holds one."""

    resource_type: Literal["prompt_lineage"] = "prompt_lineage"
    run: str
    prompt: str
    parent_id: str | None = None
    parent_version: int | None = None
    critique: str | None = None
    round: int = 0
    critic_model: str | None = None


def _parse_resource(value: Any) -> Any:
    if isinstance(value, Resource):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"a resource must be an object with a resource_type, got {type(value).__name__}")
    resource_type = value.get("resource_type")
    cls = Resource._registry.get(resource_type) if isinstance(resource_type, str) else None
    if cls is None:
        raise UnknownResourceTypeError(resource_type, Resource._registry)
    return cls.model_validate(value)


AnyResource = Annotated[SerializeAsAny[Resource], BeforeValidator(_parse_resource)]
NamedResources = dict[str, AnyResource]
"""Resources by name, e.g. ``{"main_llm": LLM(...), "system_prompt": PromptTemplate(...)}``."""


class _ResourcesHolder(BaseModel):
    resources: NamedResources


def validate_resources(resources: Mapping[str, Any]) -> dict[str, Resource]:
    """Validate a resources mapping, raising one clear :class:`InvalidResourcesError`."""
    if not isinstance(resources, Mapping):
        raise InvalidResourcesError(f"resources must be a mapping of name -> resource, got {type(resources).__name__}")
    if not resources:
        raise InvalidResourcesError("resources must hold at least one resource")
    try:
        return _ResourcesHolder(resources=dict(resources)).resources
    except UnknownResourceTypeError:
        raise
    except ValidationError as exc:
        for error in exc.errors():
            cause = (error.get("ctx") or {}).get("error")
            if isinstance(cause, UnknownResourceTypeError):
                raise UnknownResourceTypeError(cause.resource_type, Resource._registry) from None
        raise InvalidResourcesError(_resources_error(exc)) from None


def describe_validation_error(exc: ValidationError, drop: int = 0) -> str:
    """Every bad field of ``exc`` on one line, each named as a path (``llm.endpoint``) with what is
    wrong and the type it got (never the value: it may be a secret); ``drop`` leading path parts
    (wrapper models) are left out."""
    problems = []
    for error in exc.errors(include_url=False):
        path = ".".join(str(part) for part in error["loc"][drop:]) or "(the value itself)"
        given = "" if error["type"] == "missing" else f" (got {type(error['input']).__name__})"
        message = error["msg"].removeprefix("Value error, ")
        problems.append(f"{path}: {message}{given}")
    return "; ".join(problems)


def _resources_error(exc: ValidationError) -> str:
    return (
        f"invalid resources: {describe_validation_error(exc, drop=1)}. Fix the field(s) named and store the "
        "snapshot again (each resource type's fields: lightning_queue.LLM, PromptTemplate, or your Resource subclass)"
    )


def dump_resources(resources: Mapping[str, Resource]) -> str:
    """Serialize resources for storage, secrets included."""
    return _ResourcesHolder.model_construct(resources=dict(resources)).model_dump_json(context=REVEAL_SECRETS)


def default_actor() -> str:
    """Who is acting when nobody says: ``user@host`` of this process (``LQ_ACTOR`` overrides it,
    e.g. for a CI job). Recorded as a version's author and in pointer histories."""
    configured = os.environ.get("LQ_ACTOR", "").strip()
    if configured:
        return configured[:200]
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"[:200]


TAG_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/=-]{0,63}$"
"""A version tag: 1-64 letters, digits and ``._:/=-``, starting with a letter or digit."""

Tag = Annotated[str, Field(pattern=TAG_PATTERN)]


class VersionMeta(BaseModel):
    """Who wrote a snapshot version, why, and what it derives from. Stored with the version, in
    the same atomic write, and kept unchanged when the snapshot moves on to a newer version.

    ``parent_id``/``parent_version`` name the version this one derives from: for an update, the
    version it replaced unless told otherwise; for a new snapshot, only when given (a candidate
    derived from another snapshot). Bad values raise :class:`InvalidVersionMetadataError`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    message: str = Field("", max_length=4000)
    author: str = Field("", max_length=200)
    tags: tuple[Tag, ...] = Field((), max_length=32)
    parent_id: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    parent_version: int | None = Field(None, ge=1)

    @field_validator("tags")
    @classmethod
    def _unique_tags(cls, tags: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(tags))  # order kept, repeats dropped

    @classmethod
    def build(cls, **fields: Any) -> VersionMeta:
        """Validate, raising :class:`InvalidVersionMetadataError` (not pydantic's error)."""
        try:
            return cls(**fields)
        except ValidationError as exc:
            raise InvalidVersionMetadataError(describe_validation_error(exc)) from None


class ResourcesUpdate(BaseModel):
    """One immutable version of a resource snapshot, with its metadata (see :class:`VersionMeta`;
    versions written before metadata existed have none: empty message, no author, tags or parent)."""

    model_config = ConfigDict(frozen=True)

    resources_id: str
    version: int = Field(ge=1)
    create_time: float
    update_time: float
    resources: NamedResources
    message: str = ""
    author: str | None = None
    tags: tuple[str, ...] = ()
    parent_id: str | None = None
    parent_version: int | None = None

    @property
    def meta(self) -> VersionMeta:
        return VersionMeta.model_construct(message=self.message, author=self.author or "", tags=self.tags,
                                           parent_id=self.parent_id, parent_version=self.parent_version)

    @property
    def ref(self) -> str:
        """``resources_id@version``: names exactly this version (see ``LightningClient.diff``)."""
        return f"{self.resources_id}@{self.version}"


# --------------------------------------------------------------------------- rollouts


class RolloutConfig(BaseModel):
    """How a rollout is run: time limit, retries and the backoff between them.

    Whether and when an attempt is retried is decided in one place,
    :mod:`lightning_queue.core.policy`. Attempt ``n`` (``n >= 2``) is sent back
    to the queue ``policy.retry_delay(config, n - 1)`` seconds after attempt
    ``n - 1`` ended:
    ``retry_backoff_seconds * 2 ** (n - 2)``, capped at
    ``retry_backoff_max_seconds``, and with ``retry_jitter`` a uniformly
    random delay between 0 and that ("full jitter", as Celery's own
    ``retry_jitter``), so a fleet-wide failure does not come back as one wave.
    The delay is waited in Redis (the retry schedule), not in a message held by
    a worker, so it may be longer than the broker's visibility timeout.
    """

    model_config = ConfigDict(extra="forbid")

    timeout_seconds: float | None = Field(None, gt=0, description="Soft time limit of one attempt.")
    max_attempts: int = Field(1, ge=1, le=100, description="Attempts in all, the first one included.")
    retry_condition: list[RetryableStatus] = Field(
        default_factory=lambda: list(typing.get_args(RetryableStatus)),
        description="Attempt outcomes that may be retried while attempts remain.",
    )
    retry_backoff_seconds: float = Field(
        0.0, ge=0, description="Delay before the first retry; doubled for each later one (0: retry at once)."
    )
    retry_backoff_max_seconds: float = Field(600.0, ge=0, description="Upper bound of the retry delay.")
    retry_jitter: bool = Field(False, description="Draw each delay uniformly between 0 and its computed value.")


class ErrorInfo(BaseModel):
    """Why an attempt or rollout failed."""

    type: str
    message: str
    traceback: str | None = None

    @classmethod
    def from_exception(cls, exc: BaseException, with_traceback: bool = True) -> ErrorInfo:
        import traceback as tb

        text = "".join(tb.format_exception(exc)) if with_traceback else None
        return cls(type=type(exc).__name__, message=str(exc), traceback=text)


class RolloutResult(BaseModel):
    """What an agent reports: a final reward, optional per-step rewards or trace, any JSON output.

    ``reward`` is what the agent returned, else the primary reward it emitted during the run
    (:func:`lightning_queue.emit_reward`)."""

    reward: float | None = None
    step_rewards: list[float] | None = None
    trace: list[dict[str, Any]] | None = None
    output: Any = None
    rewards: dict[str, float] | None = None
    """The named rewards the agent emitted (``emit_reward``), each name's last value."""


class Rollout(BaseModel):
    """One run of the agent on one task input.

    Which snapshot it runs with:

    * ``resolve="pinned"``: ``resources_id`` and ``resources_version`` were
      fixed when it was enqueued (a pointer given then was resolved then), so
      the rollout is reproducible;
    * ``resolve="following"``: ``resources_id`` (an id or a pointer name;
      ``None`` means ``latest``) is resolved when the rollout starts, so queued
      work picks up a switch made while it waited.

    Each :class:`Attempt` records the concrete id and version it ran with, and the record
    carries those of the last attempt that started (``ran_resources_id``,
    ``ran_resources_version``; pinned or following alike), so a batch read tells which
    snapshot each rollout really ran without reading its attempts.
    """

    rollout_id: str = Field(default_factory=lambda: new_id("ro"))
    input: Any
    mode: RolloutMode | None = "train"
    resources_id: str | None = None
    resources_version: int | None = None
    resolve: ResolveMode = "following"
    status: RolloutStatus = "queuing"
    config: RolloutConfig = Field(default_factory=RolloutConfig)
    metadata: dict[str, Any] = Field(default_factory=dict)
    queue: str = "lightning_queue"
    enqueue_time: float = Field(default_factory=time.time)
    start_time: float | None = None
    end_time: float | None = None
    attempt_count: int = 0
    error: ErrorInfo | None = None
    result: RolloutResult | None = None
    traceparent: str | None = None
    """W3C trace context of the span that enqueued it (every task message of the rollout carries
    it, so each attempt's root span is that span's child)."""
    ran_resources_id: str | None = None
    """The concrete snapshot id its last started attempt ran with (None until one starts), written
    by the store with the attempt's start: what ``resources_id`` (maybe a pointer, maybe None) resolved to."""
    ran_resources_version: int | None = None
    """The version of ``ran_resources_id`` that attempt ran with."""

    @property
    def is_finished(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def reward(self) -> float | None:
        return self.result.reward if self.result else None


class Attempt(BaseModel):
    """One try at running a rollout, on one worker, with one concrete snapshot."""

    rollout_id: str
    sequence_id: int = Field(ge=1)
    attempt_id: str
    worker_id: str
    status: AttemptStatus
    start_time: float
    end_time: float | None = None
    resources_id: str | None = None
    resources_version: int | None = None
    error: ErrorInfo | None = None
    result: RolloutResult | None = None
    usage: Usage | None = None
    """The LLM calls, tokens and cost its trace recorded (None: none)."""
    spans_dropped: int = 0
    """Spans of its trace not stored: past ``LQ_TRACE_MAX_BYTES`` (see the ``lq.truncated`` span)."""


ROLLOUT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,199}$"
"""Rollout ids: 1-200 characters, letters, digits and ``._@-``. No ``:``, the key layout's separator:
an id like ``job-2:attempt:1`` would address rollout ``job-2``'s attempt record."""
_ROLLOUT_ID = re.compile(ROLLOUT_ID_PATTERN)


def is_rollout_id(value: object) -> bool:
    """Whether ``value`` can be a rollout id (and so addresses no key but its own rollout's)."""
    return isinstance(value, str) and _ROLLOUT_ID.match(value) is not None


def check_rollout_id(value: object) -> str:
    """``value``, or :class:`InvalidRolloutIdError` when it cannot be a rollout id."""
    if not is_rollout_id(value):
        raise InvalidRolloutIdError(value)
    return typing.cast(str, value)


def idempotent_rollout_id(idempotency_key: str) -> str:
    """The rollout id an idempotency key stands for: the same key always names the same rollout."""
    import hashlib

    return "ro-" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]


def _json_input(value: Any) -> Any:
    # Refused at enqueue, before anything is written: the input is stored and sent as JSON.
    try:
        to_json(value)
    except PydanticSerializationError as exc:
        raise InvalidRolloutInputError(exc) from None
    return value


def _json_metadata(value: dict[str, Any]) -> dict[str, Any]:
    # As the input: stored as JSON, so refused at enqueue with an error of its own.
    try:
        to_json(value)
    except PydanticSerializationError as exc:
        raise InvalidRolloutMetadataError(exc) from None
    return value


class RolloutRequest(BaseModel):
    """One rollout to enqueue in a batch, with its own snapshot, mode, config or metadata.

    ``resolve`` defaults to ``"pinned"`` when ``resources_id`` is given and
    ``"following"`` (the latest at run time) when it is not.

    ``rollout_id`` (or ``idempotency_key``, which names a rollout id derived
    from it) makes the enqueue idempotent: enqueuing a request whose rollout
    already exists returns the stored rollout and creates nothing.
    """

    input: Annotated[Any, AfterValidator(_json_input)]
    rollout_id: Annotated[str | None, AfterValidator(lambda v: v if v is None else check_rollout_id(v))] = None
    idempotency_key: str | None = Field(None, min_length=1, max_length=1000)

    @model_validator(mode="after")
    def _one_id_source(self) -> RolloutRequest:
        if self.rollout_id is not None and self.idempotency_key is not None:
            raise ValueError("give rollout_id or idempotency_key, not both (the key names a rollout id itself)")
        return self

    @property
    def requested_id(self) -> str | None:
        """The rollout id the caller asked for, if any."""
        if self.idempotency_key is not None:
            return idempotent_rollout_id(self.idempotency_key)
        return self.rollout_id
    resources_id: str | None = None
    resolve: ResolveMode | None = None
    mode: RolloutMode | None = "train"
    config: RolloutConfig | None = None
    metadata: Annotated[dict[str, Any], AfterValidator(_json_metadata)] = Field(default_factory=dict)
