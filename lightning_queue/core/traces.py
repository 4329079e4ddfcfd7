"""Traces: the spans of an attempt as read back, the LLM usage and cost they record, and the
(prompt, response, reward) triplets an RL trainer consumes.

Every name a span carries is spelled here once: the worker's tracer, the LLM proxy, the
readers and the adapter all use these. LLM calls follow the OpenTelemetry GenAI semantic
conventions (``gen_ai.*``: request and response model, sampling parameters, token usage,
input and output messages as JSON); lightning-queue's own names start with ``lq.``. Trace
context travels in W3C ``traceparent`` form (:func:`current_traceparent`).

An attempt's trace is one root span (:data:`ATTEMPT_SPAN`) carrying the rollout and attempt
ids, the snapshot and its version, the experiment and variant; the spans the agent opened,
its emitted rewards, messages, objects and exceptions, and the LLM calls (recorded by the
agent or by the proxy) nest under it. Nothing here touches Redis or the OpenTelemetry SDK.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

# --------------------------------------------------------------------------- span names

ATTEMPT_SPAN = "lq.attempt"
"""The root span of one attempt."""
REWARD_SPAN = "lq.reward"
MESSAGE_SPAN = "lq.message"
OBJECT_SPAN = "lq.object"
EXCEPTION_SPAN = "lq.exception"
TRUNCATED_SPAN = "lq.truncated"
"""Stands in for the spans of an attempt dropped past ``LQ_TRACE_MAX_BYTES``."""
PROXY_SPAN_PREFIX = "lq.proxy"

# --------------------------------------------------------------------------- attribute names

ROLLOUT_ID = "lq.rollout_id"
ATTEMPT_ID = "lq.attempt_id"
SEQUENCE_ID = "lq.sequence_id"
RESOURCES_ID = "lq.resources_id"
RESOURCES_VERSION = "lq.resources_version"
MODE = "lq.mode"
EXPERIMENT = "lq.experiment"
VARIANT = "lq.variant"
WORKER_ID = "lq.worker_id"
STATUS = "lq.status"
FINAL_REWARD = "lq.final_reward"



def attempt_attributes(rollout_id: str, attempt_id: str, sequence_id: int, resources_id: str | None,
                       resources_version: int | None, worker_id: str | None, mode: str | None,
                       metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The attributes an attempt's root span opens with: what the rollout and attempt records say
    about it (so a root span that carries nothing else is stored as a few fields of the attempt
    hash and rebuilt from the records, see :mod:`lightning_queue.storage.traces`)."""
    attributes: dict[str, Any] = {
        ROLLOUT_ID: rollout_id, ATTEMPT_ID: attempt_id, SEQUENCE_ID: sequence_id,
        RESOURCES_ID: resources_id, RESOURCES_VERSION: resources_version, WORKER_ID: worker_id,
    }
    if mode:
        attributes[MODE] = mode
    for name, key in ((EXPERIMENT, "experiment"), (VARIANT, "variant")):
        if isinstance(metadata.get(key), str):
            attributes[name] = metadata[key]
    return attributes


REWARD_VALUE = "lq.reward.value"
REWARD_NAME = "lq.reward.name"
REWARD_PRIMARY = "lq.reward.primary"
MESSAGE_TEXT = "lq.message.text"
OBJECT_JSON = "lq.object.json"
OBJECT_TYPE = "lq.object.type"
DROPPED_SPANS = "lq.dropped.spans"
DROPPED_BYTES = "lq.dropped.bytes"
MAX_BYTES = "lq.max_bytes"

LLM_PROXIED = "lq.llm.proxied"
"""On an LLM span the agent recorded around a call through the proxy: the proxy's own span of
that call is the record (usage and triplets come from it), this one only shows the client side."""
LLM_COST = "lq.llm.cost_usd"
LLM_LATENCY = "lq.llm.latency_ms"
LLM_RESOURCE = "lq.llm.resource"

GEN_AI_OPERATION = "gen_ai.operation.name"
GEN_AI_SYSTEM = "gen_ai.system"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_RESPONSE_ID = "gen_ai.response.id"
GEN_AI_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_INPUT_MESSAGES = "gen_ai.input.messages"
GEN_AI_OUTPUT_MESSAGES = "gen_ai.output.messages"
GEN_AI_TOOL_NAME = "gen_ai.tool.name"
GEN_AI_TOOL_CALL_ID = "gen_ai.tool.call.id"
# Older names some instrumentations still write (read, never written).
_LEGACY_INPUT_TOKENS = "gen_ai.usage.prompt_tokens"
_LEGACY_OUTPUT_TOKENS = "gen_ai.usage.completion_tokens"

# Sampling parameters of a chat request recorded as gen_ai.request.<name>.
_SAMPLING = ("temperature", "top_p", "top_k", "max_tokens", "max_completion_tokens", "frequency_penalty",
             "presence_penalty", "seed", "stop")

SpanKind = Literal["internal", "server", "client", "producer", "consumer"]
SPAN_KINDS: tuple[SpanKind, ...] = ("internal", "server", "client", "producer", "consumer")
"""In OpenTelemetry's ``SpanKind`` order (its values 0..4)."""
SpanStatus = Literal["unset", "ok", "error"]
SPAN_STATUSES: tuple[SpanStatus, ...] = ("unset", "ok", "error")
"""In OpenTelemetry's ``StatusCode`` order (its values 0..2)."""


def current_traceparent() -> str | None:
    """The W3C ``traceparent`` of the caller's current OpenTelemetry span, or None (no span, or
    OpenTelemetry never imported: then no span can be open, and enqueuing does not pay its import)."""
    if "opentelemetry.trace" not in sys.modules:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return carrier.get("traceparent")


# --------------------------------------------------------------------------- models


class SpanEvent(BaseModel):
    """Something that happened at one moment of a span (an exception, a log line)."""

    name: str
    time: float
    attributes: dict[str, Any] = Field(default_factory=dict)


class Span(BaseModel):
    """One span of an attempt's trace, as stored (times in seconds since the epoch).

    ``rollout_id``, ``attempt_id`` and ``sequence_id`` say which attempt recorded it (filled
    in when it is read back).
    """

    model_config = ConfigDict(frozen=True)

    trace_id: str
    span_id: str
    parent_id: str | None = None
    name: str
    kind: SpanKind = "internal"
    start_time: float
    end_time: float
    status: SpanStatus = "unset"
    status_message: str | None = None
    attributes: dict[str, Any] = Field(default_factory=dict)
    events: list[SpanEvent] = Field(default_factory=list)
    rollout_id: str = ""
    attempt_id: str = ""
    sequence_id: int = 0

    @property
    def duration(self) -> float:
        """Seconds from start to end."""
        return max(0.0, self.end_time - self.start_time)

    @property
    def is_llm_call(self) -> bool:
        """A chat or completion call to a model (recorded by the agent, an instrumentation or the proxy)."""
        return is_llm_call(self.attributes)

    @property
    def counts_usage(self) -> bool:
        """Whether this span's tokens and cost count towards the rollups (see :func:`call_usage`)."""
        return is_llm_call(self.attributes) and not self.attributes.get(LLM_PROXIED)

    @property
    def input_tokens(self) -> int | None:
        return _int(self.attributes.get(GEN_AI_INPUT_TOKENS, self.attributes.get(_LEGACY_INPUT_TOKENS)))

    @property
    def output_tokens(self) -> int | None:
        return _int(self.attributes.get(GEN_AI_OUTPUT_TOKENS, self.attributes.get(_LEGACY_OUTPUT_TOKENS)))

    @property
    def cost(self) -> float | None:
        value = self.attributes.get(LLM_COST)
        return float(value) if isinstance(value, (int, float)) else None


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class LLMPrice(BaseModel):
    """What a model costs, in US dollars per million tokens."""

    model_config = ConfigDict(extra="forbid")

    input: float = Field(ge=0, description="USD per million prompt (input) tokens.")
    output: float = Field(ge=0, description="USD per million completion (output) tokens.")


def call_cost(prices: Mapping[str, LLMPrice], model: str | None, input_tokens: int | None,
              output_tokens: int | None) -> float | None:
    """The cost of one call from the price table (the model's own entry, else ``"*"``), or
    None when neither is priced or the token counts are unknown."""
    price = prices.get(model or "") or prices.get("*")
    if price is None or input_tokens is None or output_tokens is None:
        return None
    return (input_tokens * price.input + output_tokens * price.output) / 1_000_000


def is_llm_call(attributes: Mapping[str, Any]) -> bool:
    """Whether a span with these attributes is a chat or completion call to a model."""
    return attributes.get(GEN_AI_OPERATION) in ("chat", "text_completion") or (
        GEN_AI_REQUEST_MODEL in attributes and GEN_AI_SYSTEM in attributes
    )


def call_usage(attributes: Mapping[str, Any], prices: Mapping[str, LLMPrice]) -> Usage | None:
    """The usage one finished span records, or None when it counts for nothing: a span that is
    not an LLM call, or the client side of a call the proxy recorded itself (``lq.llm.proxied``).
    Its cost is the span's own ``lq.llm.cost_usd``, else priced from ``prices`` now (a span an
    instrumentation recorded carries none)."""
    if not is_llm_call(attributes) or attributes.get(LLM_PROXIED):
        return None
    tokens_in, tokens_out = _int(attributes.get(GEN_AI_INPUT_TOKENS)), _int(attributes.get(GEN_AI_OUTPUT_TOKENS))
    cost = attributes.get(LLM_COST)
    if not isinstance(cost, (int, float)):
        model = attributes.get(GEN_AI_REQUEST_MODEL) or attributes.get(GEN_AI_RESPONSE_MODEL)
        cost = call_cost(prices, model if isinstance(model, str) else None, tokens_in, tokens_out)
    return Usage.of_call(tokens_in, tokens_out, cost)


class Usage(BaseModel):
    """LLM calls, tokens and cost, summed over some attempts (one rollout's, one snapshot
    version's, one experiment variant's).

    ``attempts`` counts the attempts that ran (on a rollup); ``unpriced_calls`` the calls
    whose model the price table does not list, or whose token counts were not reported:
    ``cost_usd`` leaves them out.
    """

    attempts: int = 0
    llm_calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    unpriced_calls: int = 0

    FIELDS: ClassVar[tuple[str, ...]] = ("attempts", "llm_calls", "input_tokens", "output_tokens", "cost_usd",
                               "unpriced_calls")

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(**{f: getattr(self, f) + getattr(other, f) for f in Usage.FIELDS})

    @classmethod
    def of_calls(cls, spans: Iterable[Span]) -> Usage:
        """The usage the LLM calls among ``spans`` record (``attempts`` left 0)."""
        total = cls()
        for span in spans:
            if span.counts_usage:
                total = total + cls.of_call(span.input_tokens, span.output_tokens, span.cost)
        return total

    @classmethod
    def of_call(cls, input_tokens: int | None, output_tokens: int | None, cost: float | None) -> Usage:
        """One LLM call."""
        return cls(llm_calls=1, input_tokens=input_tokens or 0, output_tokens=output_tokens or 0,
                   cost_usd=cost or 0.0, unpriced_calls=int(cost is None))

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any], prefix: str = "") -> Usage:
        """From a Redis hash's fields named ``{prefix}{field}`` (absent fields are 0)."""
        values: dict[str, Any] = {}
        for name in cls.FIELDS:
            raw = fields.get(prefix + name)
            if raw is not None:
                values[name] = float(raw) if name == "cost_usd" else int(float(raw))
        return cls(**values)


class Triplet(BaseModel):
    """One LLM call of an attempt as an RL trainer consumes it: the prompt messages, the
    response message, and the reward that call earned (``None``: no reward followed it)."""

    prompt: list[dict[str, Any]]
    response: dict[str, Any] | None
    reward: float | None = None
    model: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    span_id: str
    attempt_id: str = ""


# --------------------------------------------------------------------------- LLM call attributes


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


def chat_request_attributes(body: Mapping[str, Any]) -> dict[str, Any]:
    """The span attributes of an OpenAI-style chat request: operation, model, sampling
    parameters, and the input messages (as JSON)."""
    attributes: dict[str, Any] = {GEN_AI_OPERATION: "chat", GEN_AI_SYSTEM: "openai"}
    if body.get("model") is not None:
        attributes[GEN_AI_REQUEST_MODEL] = str(body["model"])
    for name in _SAMPLING:
        value = body.get(name)
        if isinstance(value, (bool, int, float, str)):
            attributes[f"gen_ai.request.{name}"] = value
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            attributes[f"gen_ai.request.{name}"] = tuple(value)
    if "messages" in body:
        attributes[GEN_AI_INPUT_MESSAGES] = _json(body["messages"])
    return attributes


def chat_response_attributes(body: Mapping[str, Any]) -> dict[str, Any]:
    """The span attributes of an OpenAI-style chat completion: response model and id, finish
    reasons, the output messages (as JSON) and the token usage."""
    attributes: dict[str, Any] = {}
    if body.get("model") is not None:
        attributes[GEN_AI_RESPONSE_MODEL] = str(body["model"])
    if body.get("id") is not None:
        attributes[GEN_AI_RESPONSE_ID] = str(body["id"])
    choices = body.get("choices") or []
    if isinstance(choices, list) and choices:
        messages = [c.get("message") or {} for c in choices if isinstance(c, Mapping)]
        attributes[GEN_AI_OUTPUT_MESSAGES] = _json(messages)
        reasons = [str(c.get("finish_reason")) for c in choices if isinstance(c, Mapping) and c.get("finish_reason")]
        if reasons:
            attributes[GEN_AI_FINISH_REASONS] = tuple(reasons)
    usage = body.get("usage")
    if isinstance(usage, Mapping):
        if isinstance(usage.get("prompt_tokens"), int):
            attributes[GEN_AI_INPUT_TOKENS] = usage["prompt_tokens"]
        if isinstance(usage.get("completion_tokens"), int):
            attributes[GEN_AI_OUTPUT_TOKENS] = usage["completion_tokens"]
    return attributes


def cost_attributes(prices: Mapping[str, LLMPrice], attributes: Mapping[str, Any]) -> dict[str, Any]:
    """The cost attribute of an LLM call span from its recorded model and usage (nothing when
    the price table does not price it)."""
    model = attributes.get(GEN_AI_REQUEST_MODEL) or attributes.get(GEN_AI_RESPONSE_MODEL)
    cost = call_cost(prices, model, _int(attributes.get(GEN_AI_INPUT_TOKENS)),
                     _int(attributes.get(GEN_AI_OUTPUT_TOKENS)))
    return {} if cost is None else {LLM_COST: cost}


# --------------------------------------------------------------------------- reading a trace


def attempt_roots(spans: Sequence[Span]) -> dict[str, Span]:
    """Each attempt's root span, by attempt id."""
    return {s.attempt_id: s for s in spans if s.name == ATTEMPT_SPAN}


def tree(spans: Sequence[Span]) -> list[tuple[int, Span]]:
    """The spans in tree order (each after its parent, siblings by start time), with their depth.

    A span whose parent is not among ``spans`` (the proxy's, when the agent's call carried no
    trace context) hangs under its attempt's root span; spans of an attempt whose root is
    missing are roots themselves.
    """
    ids = {s.span_id for s in spans}
    roots = attempt_roots(spans)
    children: dict[str | None, list[Span]] = {}
    for span in spans:
        parent = span.parent_id if span.parent_id in ids else None
        if parent is None and span.name != ATTEMPT_SPAN and span.attempt_id in roots:
            parent = roots[span.attempt_id].span_id
        children.setdefault(parent, []).append(span)
    out: list[tuple[int, Span]] = []

    def walk(parent: str | None, depth: int) -> None:
        for child in sorted(children.get(parent, []), key=lambda s: (s.start_time, s.end_time)):
            out.append((depth, child))
            walk(child.span_id, depth + 1)

    walk(None, 0)
    return out


def rewards(spans: Iterable[Span]) -> list[tuple[str, float, bool, float]]:
    """The rewards emitted, in the order emitted: ``(name, value, primary, time)``."""
    found = []
    for span in spans:
        if span.name == REWARD_SPAN and isinstance(span.attributes.get(REWARD_VALUE), (int, float)):
            found.append((str(span.attributes.get(REWARD_NAME, "reward")), float(span.attributes[REWARD_VALUE]),
                          bool(span.attributes.get(REWARD_PRIMARY)), span.end_time))
    return sorted(found, key=lambda r: r[3])


def primary_reward(emitted: Sequence[tuple[str, float, bool, float]]) -> float | None:
    """The primary reward of an attempt: the last one emitted as ``primary``, else the last one emitted."""
    marked = [value for _, value, primary, _ in emitted if primary]
    if marked:
        return marked[-1]
    return emitted[-1][1] if emitted else None


def _messages(raw: Any) -> list[dict[str, Any]] | None:
    if not isinstance(raw, str):
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return [m for m in value if isinstance(m, dict)] if isinstance(value, list) else None


def to_triplets(spans: Sequence[Span], final_reward: float | None = None) -> list[Triplet]:
    """One :class:`Triplet` per LLM call of the spans (one attempt's), in the order the calls
    started. A call's reward is the last reward emitted after it ended and before the next
    call started (the primary one when several names were emitted there); the last call
    with none gets ``final_reward`` (the attempt's result), as a sparse end-of-episode reward.
    Calls whose prompt or response was not recorded still give a triplet (empty prompt, no
    response), so the count matches the calls made.
    """
    calls = sorted((s for s in spans if s.counts_usage), key=lambda s: (s.start_time, s.end_time))
    emitted = rewards(spans)
    out = []
    for index, call in enumerate(calls):
        until = calls[index + 1].start_time if index + 1 < len(calls) else math.inf
        after = [r for r in emitted if call.end_time <= r[3] < until]
        output = _messages(call.attributes.get(GEN_AI_OUTPUT_MESSAGES))
        out.append(Triplet(
            prompt=_messages(call.attributes.get(GEN_AI_INPUT_MESSAGES)) or [],
            response=output[0] if output else None,
            reward=primary_reward(after),
            model=call.attributes.get(GEN_AI_RESPONSE_MODEL) or call.attributes.get(GEN_AI_REQUEST_MODEL),
            input_tokens=call.input_tokens,
            output_tokens=call.output_tokens,
            span_id=call.span_id,
            attempt_id=call.attempt_id,
        ))
    if out and out[-1].reward is None and final_reward is not None:
        out[-1] = out[-1].model_copy(update={"reward": final_reward})
    return out
