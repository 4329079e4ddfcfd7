"""Tracing on the worker: an OpenTelemetry tracer provider per process, a root span per attempt,
and what an agent emits while it runs.

Each process that runs rollouts sets up one tracer provider (the first time it runs one), made
the global one, so the spans an agent opens with plain OpenTelemetry
(``trace.get_tracer(...).start_as_current_span(...)``) and those of auto-instrumented httpx or
OpenAI calls (when ``opentelemetry-instrumentation-httpx`` / ``-openai-v2`` are installed: the
``tracing`` extra) nest under the attempt's root span. A provider the agent's module set up
itself is kept and given the collector below. When ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set the spans are also exported to that collector.

Each attempt is one root span (:data:`~lightning_queue.core.traces.ATTEMPT_SPAN`, its parent the
span that enqueued the rollout, from the task message's ``traceparent``) carrying the rollout and
attempt ids, the snapshot and its version, the experiment and variant. A span processor collects
the spans of each open attempt (a span belongs to the attempt its parent belongs to), encoding
each as it ends within ``LQ_TRACE_MAX_BYTES``; past it spans are counted and dropped and an
``lq.truncated`` span says so. When the attempt ends, :meth:`AttemptTrace.finish` gives the batch
and the LLM usage it records to the store, which writes them with the attempt's outcome, in one
script: no round trip per span.

``emit_reward``, ``emit_message``, ``emit_object`` and ``emit_exception`` are spans too. Outside
an attempt (an agent called directly, in a unit test) they do nothing.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace as trace_api
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from lightning_queue.core import traces as t
from lightning_queue.core.errors import InvalidRewardError
from lightning_queue.core.keys import Keys
from lightning_queue.core.models import LLM, ProxyLLM, Resource, ResourcesUpdate, Rollout, RolloutResult
from lightning_queue.core.settings import Settings
from lightning_queue.core.traces import LLMPrice, Usage
from lightning_queue.storage.traces import (
    SpanBatch,
    TraceWrite,
    compact_root,
    encode_batch,
    encode_entry,
    rollup_keys,
    span_entry,
)

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace import Span as SdkSpan

__all__ = ["AttemptTrace", "LLMCall", "Tracing", "emit_exception", "emit_message", "emit_object", "emit_reward",
           "llm_call"]

log = logging.getLogger(__name__)

TRACER_NAME = "lightning_queue"
SERVICE_NAME = "lightning-queue-worker"


# --------------------------------------------------------------------------- the process's tracer provider


class _Collector:  # an SDK SpanProcessor by its methods: subclassing would import the SDK with the worker
    """A span processor that hands each finished span to the attempt it belongs to.

    The root span of an attempt is registered by :meth:`register`; a span started under a
    registered span joins its attempt (so spans opened in threads or tasks that carry the
    context join too). The entries of an attempt are dropped when it finishes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: dict[int, AttemptTrace] = {}

    def register(self, span_id: int, attempt: AttemptTrace) -> None:
        with self._lock:
            self._owner[span_id] = attempt
            attempt.span_ids.append(span_id)

    def release(self, attempt: AttemptTrace) -> None:
        with self._lock:
            for span_id in attempt.span_ids:
                self._owner.pop(span_id, None)

    def owner(self, span_id: int) -> AttemptTrace | None:
        return self._owner.get(span_id)

    # -- the SpanProcessor interface ------------------------------------------------------
    def on_start(self, span: SdkSpan, parent_context: otel_context.Context | None = None) -> None:
        parent = span.parent
        attempt = self._owner.get(parent.span_id) if parent is not None else None
        if attempt is not None and span.context is not None:
            self.register(span.context.span_id, attempt)

    def _on_ending(self, span: SdkSpan) -> None:  # the SDK calls it on every processor
        pass

    def on_end(self, span: ReadableSpan) -> None:
        attempt = self._owner.get(span.context.span_id) if span.context is not None else None
        if attempt is not None:
            attempt.ended(span)

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


@dataclass
class _ProcessTracing:
    provider: TracerProvider
    tracer: trace_api.Tracer
    collector: _Collector


_process: _ProcessTracing | None = None
_process_lock = threading.Lock()


def process_tracing() -> _ProcessTracing:
    """This process's tracer provider, tracer and collector, set up on first use (see the module
    docstring). After a fork the child keeps its parent's: the collector holds no thread, and the
    SDK's batch exporter restarts its own in the child."""
    global _process
    with _process_lock:
        if _process is None:
            _process = _set_up()
        return _process


def _set_up() -> _ProcessTracing:
    from opentelemetry.sdk.trace import TracerProvider

    current = trace_api.get_tracer_provider()
    if isinstance(current, TracerProvider):
        provider = current  # the agent's module set one up: keep it, and its exporters
    else:
        provider = new_provider(SERVICE_NAME)
        trace_api.set_tracer_provider(provider)
    collector = _Collector()
    provider.add_span_processor(collector)  # type: ignore[arg-type]  # SpanProcessor by its methods
    _instrument()
    return _ProcessTracing(provider, provider.get_tracer(TRACER_NAME), collector)


def new_provider(service_name: str) -> TracerProvider:
    """A tracer provider that records every span (whatever the caller sampled: a trace is the
    record of an attempt), exporting them over OTLP when the standard variables name a
    collector. ``OTEL_SERVICE_NAME`` overrides ``service_name``."""
    from opentelemetry.sdk.resources import Resource as OtelResource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON

    resource = OtelResource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or service_name})
    provider = TracerProvider(resource=resource, sampler=ALWAYS_ON)
    exporter = _otlp_exporter()
    if exporter is not None:
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _otlp_exporter() -> Any:
    """The OTLP/HTTP span exporter when the standard variables name a collector, else None."""
    if not (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        return None
    if os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but the OTLP exporter is not installed: spans are kept in "
                    "Redis only; install lightning-queue[tracing] on the workers to export them")
        return None
    return OTLPSpanExporter()


def _instrument() -> None:
    """Instrument httpx and the OpenAI client when their instrumentations are installed (and
    not listed in ``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS``)."""
    disabled = {name.strip() for name in os.environ.get("OTEL_PYTHON_DISABLED_INSTRUMENTATIONS", "").split(",")}
    wanted = [("httpx", "httpx", "opentelemetry.instrumentation.httpx", "HTTPXClientInstrumentor"),
              ("openai", "openai-v2", "opentelemetry.instrumentation.openai_v2", "OpenAIInstrumentor")]
    for library, name, module, cls in wanted:
        if name in disabled or library in disabled:
            continue
        if importlib.util.find_spec(library) is None or importlib.util.find_spec(module.rsplit(".", 1)[0]) is None:
            continue
        try:
            instrumentor = getattr(importlib.import_module(module), cls)()
            if not instrumentor.is_instrumented_by_opentelemetry:
                instrumentor.instrument()
        except Exception as exc:  # noqa: BLE001 - an instrumentation that fails must not stop the worker
            log.warning("could not instrument %s for tracing: %s", library, exc)


def parent_context(traceparent: str | None) -> otel_context.Context | None:
    """The context a ``traceparent`` header names (None: no header, or not a valid one)."""
    if not traceparent:
        return None
    extracted = TraceContextTextMapPropagator().extract({"traceparent": traceparent})
    return extracted if trace_api.get_current_span(extracted).get_span_context().is_valid else None


# --------------------------------------------------------------------------- one attempt


@dataclass(frozen=True)
class AttemptInfo:
    """What the root span of an attempt says about it."""

    rollout: Rollout
    sequence_id: int
    attempt_id: str
    snapshot: ResourcesUpdate
    worker_id: str

    def attributes(self) -> dict[str, Any]:
        rollout = self.rollout
        return t.attempt_attributes(rollout.rollout_id, self.attempt_id, self.sequence_id,
                                    self.snapshot.resources_id, self.snapshot.version, self.worker_id, rollout.mode,
                                    rollout.metadata)


@dataclass
class _Reward:
    name: str
    value: float
    primary: bool
    time: float


@dataclass
class AttemptTrace:
    """The trace of one attempt while it runs. Made by :meth:`Tracing.start`; the runner runs the
    agent inside :meth:`active` and ends it with :meth:`finish`."""

    info: AttemptInfo
    root: SdkSpan
    collector: _Collector
    batch: SpanBatch
    prices: Mapping[str, LLMPrice]
    keys: Keys
    span_ids: list[int] = field(default_factory=list)
    rewards: list[_Reward] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    proxied: set[str] = field(default_factory=set)
    root_entry: list[Any] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def scope(self, resources: Mapping[str, Resource]) -> dict[str, Resource]:
        """The resources the agent gets (see :func:`scope_resources`)."""
        scoped, self.proxied = scope_resources(resources, self.info.rollout.rollout_id, self.info.attempt_id)
        return scoped

    @contextmanager
    def active(self) -> Iterator[None]:
        """Run the agent under the root span: the spans it opens nest under it; an exception
        it raises is recorded on it (and raised on)."""
        with trace_api.use_span(self.root, end_on_exit=False):
            yield

    def ended(self, span: ReadableSpan) -> None:
        """A span of this attempt ended (the collector calls this): encode it, count its usage."""
        is_root = span.context is not None and span.context.span_id == self.root.get_span_context().span_id
        entry = span_entry(span, self.trace_id)
        if is_root:
            self.root_entry = entry
        piece = encode_entry(entry)
        attributes = span.attributes or {}
        usage = t.call_usage(attributes, self.prices)
        with self._lock:
            self.batch.add(piece, keep=is_root)
            if usage is not None:
                self.usage = self.usage + usage

    @property
    def trace_id(self) -> str:
        context = self.root.get_span_context()
        return format(context.trace_id, "032x")

    def add_reward(self, name: str, value: float, primary: bool) -> None:
        with self._lock:
            self.rewards.append(_Reward(name, value, primary, time.time()))

    def finish(self, status: str, result: RolloutResult | None) -> tuple[TraceWrite | None, RolloutResult | None]:
        """End the root span and give what the store writes with the attempt's outcome, and the
        result completed with the emitted rewards: ``reward`` the primary one unless the agent
        returned one, ``rewards`` each name's last value. Never raises: a trace that cannot be
        encoded is logged and left out, the outcome is recorded all the same."""
        try:
            return self._finish(status, result)
        except Exception:
            log.exception("rollout %s attempt %d: the trace could not be recorded", self.info.rollout.rollout_id,
                          self.info.sequence_id)
            self.collector.release(self)
            return None, result

    def _finish(self, status: str, result: RolloutResult | None) -> tuple[TraceWrite | None, RolloutResult | None]:
        if result is not None and self.rewards:
            named = {r.name: r.value for r in self.rewards}
            marked = [r.value for r in self.rewards if r.primary]
            update: dict[str, Any] = {"rewards": {**named, **(result.rewards or {})}}
            if result.reward is None:
                update["reward"] = marked[-1] if marked else self.rewards[-1].value
            result = result.model_copy(update=update)
        self.root.set_attribute(t.STATUS, status)
        if result is not None and result.reward is not None:
            self.root.set_attribute(t.FINAL_REWARD, result.reward)
        self.root.end()
        self.collector.release(self)
        with self._lock:
            pieces = list(self.batch.pieces)
            if self.batch.dropped:
                pieces.append(encode_entry(self._truncation_marker()))
                log.warning("rollout %s attempt %d: trace over LQ_TRACE_MAX_BYTES (%d bytes): %d spans (%d bytes) "
                            "dropped", self.info.rollout.rollout_id, self.info.sequence_id, self.batch.max_bytes,
                            self.batch.dropped, self.batch.dropped_bytes)
            usage = self.usage + Usage(attempts=1)
        info = self.info
        rollups = rollup_keys(self.keys, info.snapshot.resources_id, info.snapshot.version, info.rollout.metadata)
        # A trace of the root span alone (most short attempts) is a few fields of the attempt hash.
        root = compact_root(self.root_entry, self.trace_id, info.attributes()) \
            if len(pieces) == 1 and self.root_entry is not None else None
        batch = root if root is not None else encode_batch(self.trace_id, pieces)
        return TraceWrite(batch, self.batch.dropped, usage, rollups), result

    def _truncation_marker(self) -> list[Any]:
        now = time.time_ns()
        attributes = {t.DROPPED_SPANS: self.batch.dropped, t.DROPPED_BYTES: self.batch.dropped_bytes,
                      t.MAX_BYTES: self.batch.max_bytes}
        root_id = format(self.root.get_span_context().span_id, "016x")
        return [os.urandom(8).hex(), root_id, t.TRUNCATED_SPAN, 0, now, now, 2,
                f"{self.batch.dropped} spans past LQ_TRACE_MAX_BYTES ({self.batch.max_bytes} bytes) were dropped",
                attributes, None, None]


def scope_resources(resources: Mapping[str, Resource], rollout_id: str, attempt_id: str
                    ) -> tuple[dict[str, Resource], set[str]]:
    """The resources an attempt's agent gets: each :class:`ProxyLLM` replaced by the :class:`LLM`
    scoped to the rollout and attempt (its calls go through the proxy, which knows them by it);
    and the scoped endpoints."""
    scoped: dict[str, Resource] = {}
    endpoints: set[str] = set()
    for name, resource in resources.items():
        if isinstance(resource, ProxyLLM):
            llm = resource.scoped(name, rollout_id, attempt_id)
            endpoints.add(llm.endpoint)
            scoped[name] = llm
        else:
            scoped[name] = resource
    return scoped, endpoints


class UntracedAttempt:
    """An attempt on a worker with ``LQ_TRACING=false``: the same steps as :class:`AttemptTrace`,
    recording nothing (ProxyLLMs are still scoped: the proxy needs them)."""

    def __init__(self, rollout_id: str, attempt_id: str) -> None:
        self.rollout_id, self.attempt_id = rollout_id, attempt_id

    def scope(self, resources: Mapping[str, Resource]) -> dict[str, Resource]:
        return scope_resources(resources, self.rollout_id, self.attempt_id)[0]

    @contextmanager
    def active(self) -> Iterator[None]:
        yield

    def finish(self, status: str, result: RolloutResult | None) -> tuple[TraceWrite | None, RolloutResult | None]:
        return None, result


class Tracing:
    """The tracing of one :class:`~lightning_queue.worker.context.WorkerContext`: starts each
    attempt's trace. The process's provider is set up on the first attempt, so a worker's main
    process (which runs none) never sets one up."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def start(self, rollout: Rollout, sequence_id: int, attempt_id: str, snapshot: ResourcesUpdate, worker_id: str,
              traceparent: str | None = None) -> AttemptTrace | UntracedAttempt:
        """Open the root span of the attempt (a child of ``traceparent``'s span when given);
        with tracing off, an attempt that records nothing."""
        if not self.settings.tracing:
            return UntracedAttempt(rollout.rollout_id, attempt_id)
        process = process_tracing()
        info = AttemptInfo(rollout, sequence_id, attempt_id, snapshot, worker_id)
        root = process.tracer.start_span(t.ATTEMPT_SPAN, context=parent_context(traceparent or rollout.traceparent),
                                         kind=trace_api.SpanKind.CONSUMER, attributes=info.attributes())
        attempt = AttemptTrace(info, root, process.collector, SpanBatch(self.settings.trace_max_bytes),  # type: ignore[arg-type]
                               self.settings.llm_prices, self.settings.keys)
        process.collector.register(root.get_span_context().span_id, attempt)
        return attempt


# --------------------------------------------------------------------------- what agents call


def _current_attempt() -> AttemptTrace | None:
    context = trace_api.get_current_span().get_span_context()
    if not context.is_valid or _process is None:
        return None
    return _process.collector.owner(context.span_id)


def _tracer() -> trace_api.Tracer:
    # The process's tracer (from the global provider, or the agent's own one it joined): getting a
    # tracer anew costs more than the span it starts.
    return _process.tracer if _process is not None else trace_api.get_tracer(TRACER_NAME)


def _emit(name: str, attributes: Mapping[str, Any]) -> trace_api.Span | None:
    if _current_attempt() is None:
        return None
    return _tracer().start_span(name, attributes=attributes)


def emit_reward(value: float, name: str = "reward", *, primary: bool = False) -> None:
    """Record a reward of the running attempt, as a span; an agent may emit several, under
    several names. The attempt's reward is the one the agent returns, else the last reward
    emitted with ``primary=True``, else the last one emitted; ``result.rewards`` holds each
    name's last value. Raises :class:`InvalidRewardError` for a value that is not a finite number.
    Outside an attempt it does nothing."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRewardError(f"emit_reward({value!r}): a reward must be a finite number (int or float)")
    if not isinstance(name, str) or not name:
        raise InvalidRewardError(f"emit_reward(name={name!r}): name a reward with a non-empty string")
    attempt = _current_attempt()
    if attempt is None:
        return
    span = _emit(t.REWARD_SPAN, {t.REWARD_VALUE: float(value), t.REWARD_NAME: name, t.REWARD_PRIMARY: primary})
    attempt.add_reward(name, float(value), primary)
    if span is not None:
        span.end()


def emit_message(message: str, **attributes: Any) -> None:
    """Record a message of the running attempt (a log line worth keeping with its trace), as a
    span carrying ``attributes`` too. Outside an attempt it does nothing."""
    span = _emit(t.MESSAGE_SPAN, {t.MESSAGE_TEXT: str(message), **_attribute_values(attributes)})
    if span is not None:
        span.end()


def emit_object(obj: Any, name: str | None = None) -> None:
    """Record any JSON-able object of the running attempt (as JSON; other objects as their
    ``repr``), as a span. Outside an attempt it does nothing."""
    try:
        encoded = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError):
        encoded = json.dumps(repr(obj))
    attributes = {t.OBJECT_JSON: encoded, t.OBJECT_TYPE: type(obj).__name__}
    span = _emit(t.OBJECT_SPAN if name is None else f"{t.OBJECT_SPAN} {name}", attributes)
    if span is not None:
        span.end()


def emit_exception(exc: BaseException) -> None:
    """Record an exception the agent handled (it does not fail the attempt), as a span with an
    ``exception`` event and error status. Outside an attempt it does nothing."""
    span = _emit(t.EXCEPTION_SPAN, {"exception.type": type(exc).__name__})
    if span is not None:
        span.record_exception(exc)
        span.set_status(trace_api.Status(trace_api.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        span.end()


def _attribute_values(attributes: Mapping[str, Any]) -> dict[str, Any]:
    # OpenTelemetry takes str, bool, int, float and sequences of one of them; anything else as JSON.
    out: dict[str, Any] = {}
    for key, value in attributes.items():
        if isinstance(value, (str, bool, int, float)):
            out[key] = value
        else:
            out[key] = json.dumps(value, default=str, ensure_ascii=False)
    return out


class LLMCall:
    """The span of one LLM call being made (see :func:`llm_call`)."""

    def __init__(self, span: trace_api.Span, prices: Mapping[str, LLMPrice], request_model: Any) -> None:
        self.span = span
        self._prices = prices
        self._request_model = request_model

    def record(self, response: Mapping[str, Any]) -> None:
        """Record the chat completion the call answered: response model, output messages, token
        usage, and its cost from the worker's price table (``LQ_LLM_PRICES``)."""
        attributes = t.chat_response_attributes(response)
        attributes.update(t.cost_attributes(self._prices, {t.GEN_AI_REQUEST_MODEL: self._request_model, **attributes}))
        self.span.set_attributes(attributes)


@contextmanager
def llm_call(request: Mapping[str, Any], llm: LLM | None = None) -> Iterator[LLMCall]:
    """Record one OpenAI-style chat call of the running attempt as an LLM span (GenAI semantic
    conventions: model, sampling parameters, input and output messages, token usage, cost)::

        with llm_call(body, llm) as call:
            response = http.post(url, json=body).json()
            call.record(response)

    ``llm`` is the resource the call goes to: when it is one the worker scoped to the proxy (a
    :class:`~lightning_queue.ProxyLLM`), the proxy records the call itself and this span is
    marked as its client side, so its tokens are not counted twice. An exception leaving the
    block is recorded on the span. Outside an attempt the span is not recorded."""
    attempt = _current_attempt()
    attributes = t.chat_request_attributes(request)
    if attempt is not None and llm is not None and llm.endpoint in attempt.proxied:
        attributes[t.LLM_PROXIED] = True
    model = attributes.get(t.GEN_AI_REQUEST_MODEL)
    with _tracer().start_as_current_span(f"chat {model or ''}".strip(), kind=trace_api.SpanKind.CLIENT,
                                      attributes=attributes) as span:
        yield LLMCall(span, attempt.prices if attempt is not None else {}, model)
