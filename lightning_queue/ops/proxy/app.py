"""The proxy's HTTP face: an OpenAI-compatible ASGI app (FastAPI), one base URL per attempt and
LLM resource (:data:`~lightning_queue.core.models.PROXY_PATH`)::

    POST {base}/chat/completions    a chat completion, streamed (server-sent events) or not
    GET  {base}/models              the one model the attempt's snapshot gives this resource

Errors the proxy answers itself are OpenAI-shaped (``{"error": {"message", "type", "code"}}``):
400 a body that is not a JSON object, 403 an attempt that is not running (finished,
superseded, cancelled, or unknown: its agent should stop), 404 a resource the snapshot does not
hold as an LLM, 502 an LLM endpoint that cannot be reached, 503 Redis unreachable. The LLM
endpoint's own answers (errors included) are passed through as they are.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from lightning_queue.core.models import PROXY_PATH
from lightning_queue.core.settings import Settings
from lightning_queue.core.traces import LLMPrice
from lightning_queue.ops.proxy.service import LLMProxy, ProxyError, traceparent_of


def create_proxy_app(settings: Settings, prices: Mapping[str, LLMPrice] | None = None,
                     upstream_timeout: float = 300.0) -> FastAPI:
    """The proxy as an ASGI app (serve it with uvicorn: ``lightning-queue proxy`` does).
    ``prices`` (USD per million tokens by model) defaults to ``settings.llm_prices``."""
    proxy = LLMProxy(settings, prices, upstream_timeout)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await proxy.start()
        try:
            yield
        finally:
            await proxy.close()

    app = FastAPI(title="lightning-queue LLM proxy", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.proxy = proxy
    base = PROXY_PATH

    @app.exception_handler(ProxyError)
    async def _proxy_error(_: Request, exc: ProxyError) -> JSONResponse:
        return JSONResponse(exc.payload(), status_code=exc.status)

    @app.post(f"{base}/chat/completions")
    async def chat_completions(rollout_id: str, attempt_id: str, resource: str, request: Request) -> Response:
        started = time.perf_counter()
        try:
            body = json.loads(await request.body())
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise ProxyError(400, "the request body must be a JSON object (an OpenAI chat completion request)",
                             "invalid_request_error")
        scope = await proxy.scope(rollout_id, attempt_id)
        upstream = await proxy.upstream(scope, resource, body.get("model"))
        sent = upstream.body(body)
        span = proxy.open_span(scope, upstream, sent, request.headers)
        traceparent = traceparent_of(span)
        if sent.get("stream"):
            try:
                response = await proxy.open_stream(upstream, sent, traceparent)
            except ProxyError:
                proxy.finish_span(span, None, time.perf_counter() - started, 502)
                proxy.record(scope, span)
                raise
            if response.status_code < 400:
                return StreamingResponse(proxy.relay(response, scope, span, started), status_code=response.status_code,
                                         media_type=response.headers.get("content-type", "text/event-stream"))
            content = await response.aread()
            await response.aclose()
            proxy.finish_span(span, None, time.perf_counter() - started, response.status_code)
            return Response(content, status_code=response.status_code, media_type="application/json",
                            background=BackgroundTask(proxy.write, scope, span))
        try:
            answered, seconds = await proxy.forward(upstream, sent, traceparent)
        except ProxyError:
            proxy.finish_span(span, None, time.perf_counter() - started, 502)
            proxy.record(scope, span)
            raise
        completion = _json(answered.content) if answered.status_code < 400 else None
        proxy.finish_span(span, completion, seconds, answered.status_code)
        return Response(answered.content, status_code=answered.status_code,
                        media_type=answered.headers.get("content-type", "application/json"),
                        background=BackgroundTask(proxy.write, scope, span))

    @app.get(f"{base}/models")
    async def models(rollout_id: str, attempt_id: str, resource: str) -> dict[str, Any]:
        scope = await proxy.scope(rollout_id, attempt_id)
        upstream = await proxy.upstream(scope, resource, None)
        model = {"id": upstream.llm.model, "object": "model", "owned_by": "lightning-queue"}
        return {"object": "list", "data": [model]}

    return app


def _json(content: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(content)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
