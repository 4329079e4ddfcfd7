"""The LLM proxy's work, apart from HTTP routing: which attempt calls, with which LLM, and the
record of each call.

For each call it reads the attempt (one script: is it still the rollout's running attempt, and
with which concrete snapshot), takes the named LLM resource of that snapshot (snapshots are
immutable per version: each is read from Redis once and kept), sends the agent's request to
that LLM's endpoint with the snapshot's model, sampling parameters and key (the caller's
choice of those is overridden; its own ``Authorization`` is never forwarded), and records the
call as a span (GenAI conventions: model, parameters, messages, token counts; latency and cost
from the price table) in the attempt's trace, with its usage added to the rollups, in one
script after the answer has gone back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import redis.asyncio
from opentelemetry import trace as trace_api
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from lightning_queue.core import traces as t
from lightning_queue.core.errors import AttemptClosedError, ProxyResourceError
from lightning_queue.core.models import LLM, ProxyLLM, ResourcesUpdate
from lightning_queue.core.settings import Settings
from lightning_queue.core.traces import LLMPrice
from lightning_queue.storage.connections import connect, connect_async
from lightning_queue.storage.registry import SnapshotRegistry
from lightning_queue.storage.scripts import script_source
from lightning_queue.storage.traces import (
    AttemptScope,
    TraceWrite,
    encode_batch,
    encode_entry,
    record_call_args,
    scope_call,
    span_entry,
)
from lightning_queue.worker.tracing import new_provider

log = logging.getLogger(__name__)

SERVICE_NAME = "lightning-queue-proxy"

SNAPSHOTS_KEPT = 256
"""Snapshot versions the proxy keeps in memory (each is immutable)."""


@dataclass
class Upstream:
    """Where one call goes, from the attempt's snapshot."""

    llm: LLM
    resource: str
    requested_model: Any

    def url(self, path: str) -> str:
        return f"{self.llm.endpoint.rstrip('/')}/{path}"

    def headers(self, traceparent: str | None) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.llm.api_key is not None:
            headers["Authorization"] = f"Bearer {self.llm.api_key.get_secret_value()}"
        if traceparent:
            headers["traceparent"] = traceparent
        return headers

    def body(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """The request as the snapshot says it must be sent: its model and sampling parameters
        over the caller's; a stream asks for the usage chunk (token counts are the record)."""
        body = {**request, **self.llm.sampling_parameters, "model": self.llm.model}
        if body.get("stream"):
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        return body


class ProxyError(Exception):
    """An answer the proxy gives itself (not the upstream's), OpenAI-shaped."""

    def __init__(self, status: int, message: str, kind: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind

    def payload(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "code": self.status}}


@dataclass
class _Stream:
    """What a streamed completion said, gathered from its chunks for the record."""

    content: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    role: str = "assistant"
    finish_reasons: list[str] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    model: str | None = None
    id: str | None = None
    _pending: bytes = b""

    def feed(self, chunk: bytes) -> None:
        self._pending += chunk
        *lines, self._pending = self._pending.split(b"\n")
        for line in lines:
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                continue
            try:
                event = json.loads(data)
            except ValueError:
                continue
            if isinstance(event, dict):
                self._event(event)

    def _event(self, event: dict[str, Any]) -> None:
        self.model = event.get("model") or self.model
        self.id = event.get("id") or self.id
        if isinstance(event.get("usage"), dict):
            self.usage = event["usage"]
        for choice in event.get("choices") or []:
            delta = choice.get("delta") or {}
            self.role = delta.get("role") or self.role
            if delta.get("content"):
                self.content.append(str(delta["content"]))
            for call in delta.get("tool_calls") or []:
                into = self.tool_calls.setdefault(int(call.get("index", 0)), {"type": "function",
                                                                              "function": {"arguments": ""}})
                if call.get("id"):
                    into["id"] = call["id"]
                function = call.get("function") or {}
                if function.get("name"):
                    into["function"]["name"] = function["name"]
                into["function"]["arguments"] += function.get("arguments") or ""
            if choice.get("finish_reason"):
                self.finish_reasons.append(str(choice["finish_reason"]))

    def completion(self) -> dict[str, Any]:
        """The chunks as one chat completion (for :func:`~lightning_queue.core.traces.chat_response_attributes`)."""
        message: dict[str, Any] = {"role": self.role, "content": "".join(self.content) or None}
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        choice = {"index": 0, "message": message,
                  "finish_reason": self.finish_reasons[-1] if self.finish_reasons else None}
        return {"id": self.id, "model": self.model, "choices": [choice], "usage": self.usage}


class LLMProxy:
    """The proxy's state: Redis (asyncio, for the per-call reads and writes), the registry (for
    snapshots, read once per version), the HTTP client to the LLM endpoints, the tracer, and the
    price table. Use :meth:`start` and :meth:`close` (the ASGI app's lifespan does)."""

    def __init__(self, settings: Settings, prices: Mapping[str, LLMPrice] | None = None,
                 upstream_timeout: float = 300.0) -> None:
        self.settings = settings
        self.keys = settings.keys
        self.prices = dict(settings.llm_prices if prices is None else prices)
        self.upstream_timeout = upstream_timeout
        self.redis: redis.asyncio.Redis = connect_async(settings.redis_url, settings.sentinel_master, io_timeout=5.0)
        self._scope = self.redis.register_script(script_source("attempt_scope"))
        self._record = self.redis.register_script(script_source("_trace_prelude") + script_source("record_llm_call"))
        self._sync = connect(settings.redis_url, settings.sentinel_master, check=False,
                             retry_seconds=settings.redis_retry_seconds)
        self.registry = SnapshotRegistry(self._sync, self.keys, settings)
        self._snapshots: OrderedDict[tuple[str, int], ResourcesUpdate] = OrderedDict()
        self.http: httpx.AsyncClient | None = None
        # Its own provider (not the global one): every call is a recording span, exported over OTLP
        # when OTEL_EXPORTER_OTLP_* name a collector.
        self.tracer = new_provider(SERVICE_NAME).get_tracer("lightning_queue.proxy")
        self._background: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=100)
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(self.upstream_timeout, connect=10.0), limits=limits)

    async def close(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self.http is not None:
            await self.http.aclose()
        await self.redis.aclose()
        self._sync.close()

    # -- who calls, with what -------------------------------------------------------------------

    async def scope(self, rollout_id: str, attempt_id: str) -> AttemptScope:
        """The attempt, if it may call; raises :class:`ProxyError` (403) when it may not."""
        keys, args = scope_call(self.keys, rollout_id)
        try:
            reply = await self._scope(keys=keys, args=args)
        except redis.RedisError as exc:
            raise ProxyError(503, f"the proxy cannot reach Redis ({exc}); retry shortly",
                             "service_unavailable") from exc
        scope = AttemptScope.parse(rollout_id, attempt_id, reply)
        if not scope.is_open:
            raise ProxyError(403, str(AttemptClosedError(scope.reason)), "attempt_closed")
        return scope

    async def upstream(self, scope: AttemptScope, resource: str, requested_model: Any) -> Upstream:
        """The LLM the attempt's snapshot names ``resource``; raises :class:`ProxyError` (404)."""
        assert scope.resources_id is not None and scope.version is not None
        snapshot = await self._snapshot(scope.resources_id, scope.version)
        held = snapshot.resources.get(resource)
        llm = held.llm if isinstance(held, ProxyLLM) else held
        if not isinstance(llm, LLM):
            error = ProxyResourceError(scope.resources_id, scope.version, resource,
                                       [f"{name} ({r.resource_type})" for name, r in snapshot.resources.items()])
            raise ProxyError(404, str(error), "resource_not_found")
        return Upstream(llm, resource, requested_model)

    async def _snapshot(self, resources_id: str, version: int) -> ResourcesUpdate:
        key = (resources_id, version)
        cached = self._snapshots.get(key)
        if cached is not None:
            self._snapshots.move_to_end(key)
            return cached
        snapshot = (await asyncio.to_thread(self.registry.fetch, resources_id, version)).snapshot
        self._snapshots[key] = snapshot
        while len(self._snapshots) > SNAPSHOTS_KEPT:
            self._snapshots.popitem(last=False)
        return snapshot

    # -- the call and its record ------------------------------------------------------------------

    def open_span(self, scope: AttemptScope, upstream: Upstream, body: Mapping[str, Any],
                  headers: Mapping[str, str]) -> trace_api.Span:
        """The span of one call, a child of the caller's span when its request carries trace
        context (else it hangs under the attempt's root span when read back)."""
        parent = TraceContextTextMapPropagator().extract({k.lower(): v for k, v in headers.items()})
        attributes = {**t.chat_request_attributes(body), t.ROLLOUT_ID: scope.rollout_id,
                      t.ATTEMPT_ID: scope.attempt_id, t.LLM_RESOURCE: upstream.resource}
        if upstream.requested_model is not None:
            attributes["lq.proxy.requested_model"] = str(upstream.requested_model)
        return self.tracer.start_span(f"{t.PROXY_SPAN_PREFIX} chat {upstream.llm.model}", context=parent,
                                      kind=trace_api.SpanKind.SERVER, attributes=attributes)

    def finish_span(self, span: trace_api.Span, completion: Mapping[str, Any] | None, latency: float,
                    status: int, end_ns: int | None = None) -> None:
        """End the call's span with what the LLM answered (``end_ns``: when it did, if earlier)."""
        attributes = t.chat_response_attributes(completion) if completion else {}
        attributes.update(t.cost_attributes(self.prices, {t.GEN_AI_REQUEST_MODEL: span_model(span), **attributes}))
        attributes[t.LLM_LATENCY] = round(latency * 1000, 3)
        attributes["http.response.status_code"] = status
        span.set_attributes(attributes)
        if status >= 400:
            span.set_status(trace_api.Status(trace_api.StatusCode.ERROR, f"the LLM endpoint answered HTTP {status}"))
        span.end(end_time=end_ns)

    async def finish_and_write(self, scope: AttemptScope, span: trace_api.Span, answered: httpx.Response,
                               latency: float, end_ns: int) -> None:
        """Read the answer into the span and write it: after the answer went out, off its path."""
        completion = None
        if answered.status_code < 400:
            try:
                parsed = json.loads(answered.content)
                completion = parsed if isinstance(parsed, dict) else None
            except ValueError:
                pass
        self.finish_span(span, completion, latency, answered.status_code, end_ns)
        await self.write(scope, span)

    def record(self, scope: AttemptScope, span: trace_api.Span) -> None:
        """Write the ended span and its usage in the background (after the answer went out)."""
        task = asyncio.get_running_loop().create_task(self.write(scope, span))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def write(self, scope: AttemptScope, span: Any) -> None:
        """Write the ended span of one call and its usage to the attempt's trace and rollups."""
        trace_id = format(span.get_span_context().trace_id, "032x")
        entry = span_entry(span, trace_id)
        # A call the LLM endpoint refused (or never answered) cost nothing.
        usage = None if span.status.status_code == trace_api.StatusCode.ERROR else t.call_usage(
            span.attributes or {}, self.prices)
        write = TraceWrite(encode_batch(trace_id, [encode_entry(entry)]), 0, usage, scope.rollups(self.keys))
        keys, args = record_call_args(self.keys, scope, write, self.settings.trace_max_bytes)
        try:
            await self._record(keys=keys, args=args)
        except redis.RedisError as exc:
            log.warning("rollout %s attempt %s: the call's span could not be recorded (%s)", scope.rollout_id,
                        scope.attempt_id, exc)

    async def forward(self, upstream: Upstream, body: dict[str, Any], traceparent: str | None
                      ) -> tuple[httpx.Response, float]:
        """Send a non-streamed call; returns the response (read) and the seconds it took."""
        assert self.http is not None
        started = time.perf_counter()
        try:
            response = await self.http.post(upstream.url("chat/completions"), content=json.dumps(body),
                                            headers=upstream.headers(traceparent))
        except httpx.HTTPError as exc:
            raise ProxyError(502, f"the LLM endpoint {upstream.llm.endpoint} could not be reached: "
                             f"{type(exc).__name__}: {exc}", "upstream_unreachable") from exc
        return response, time.perf_counter() - started

    async def open_stream(self, upstream: Upstream, body: dict[str, Any], traceparent: str | None
                          ) -> httpx.Response:
        assert self.http is not None
        request = self.http.build_request("POST", upstream.url("chat/completions"), content=json.dumps(body),
                                          headers=upstream.headers(traceparent))
        try:
            return await self.http.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise ProxyError(502, f"the LLM endpoint {upstream.llm.endpoint} could not be reached: "
                             f"{type(exc).__name__}: {exc}", "upstream_unreachable") from exc

    async def relay(self, response: httpx.Response, scope: AttemptScope, span: trace_api.Span,
                    started: float) -> AsyncIterator[bytes]:
        """Pass a streamed completion's chunks through as they come, then record the call."""
        gathered = _Stream()
        try:
            async for chunk in response.aiter_raw():
                gathered.feed(chunk)
                yield chunk
        finally:
            await response.aclose()
            self.finish_span(span, gathered.completion(), time.perf_counter() - started, response.status_code)
            self.record(scope, span)


def span_model(span: Any) -> Any:
    return (getattr(span, "attributes", None) or {}).get(t.GEN_AI_REQUEST_MODEL)


def traceparent_of(span: trace_api.Span) -> str | None:
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context=trace_api.set_span_in_context(span))
    return carrier.get("traceparent")
