"""The proxy's HTTP face: an OpenAI-compatible ASGI app, one base URL per attempt and LLM resource
(:data:`~lightning_queue.core.models.PROXY_PATH`)::

    POST {base}/chat/completions    a chat completion, streamed (server-sent events) or not
    GET  {base}/models              the one model the attempt's snapshot gives this resource

Errors the proxy answers itself are OpenAI-shaped (``{"error": {"message", "type", "code"}}``):
400 a body that is not a JSON object, 403 an attempt that is not running (finished,
superseded, cancelled, or unknown: its agent should stop), 404 a resource the snapshot does not
hold as an LLM, 502 an LLM endpoint that cannot be reached, 503 Redis unreachable. The LLM
endpoint's own answers (errors included) are passed through as they are.

Plain Starlette (FastAPI's own core, from the ``server`` extra): two routes that read raw bodies
need none of FastAPI's validation or schema, and every microsecond here is added to each call.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from lightning_queue.core.models import PROXY_PATH
from lightning_queue.core.settings import Settings
from lightning_queue.core.traces import LLMPrice
from lightning_queue.ops.proxy.service import LLMProxy, ProxyError, traceparent_of


def create_proxy_app(settings: Settings, prices: Mapping[str, LLMPrice] | None = None,
                     upstream_timeout: float = 300.0) -> Starlette:
    """The proxy as an ASGI app (serve it with uvicorn: ``lightning-queue proxy`` does).
    ``prices`` (USD per million tokens by model) defaults to ``settings.llm_prices``."""
    proxy = LLMProxy(settings, prices, upstream_timeout)

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await proxy.start()
        try:
            yield
        finally:
            await proxy.close()

    async def proxy_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, ProxyError)
        return JSONResponse(exc.payload(), status_code=exc.status)

    async def chat_completions(request: Request) -> Response:
        started = time.perf_counter()
        params = request.path_params
        try:
            body = json.loads(await request.body())
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise ProxyError(400, "the request body must be a JSON object (an OpenAI chat completion request)",
                             "invalid_request_error")
        scope = await proxy.scope(params["rollout_id"], params["attempt_id"])
        upstream = await proxy.upstream(scope, params["resource"], body.get("model"))
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
        # The span is completed and written once the answer has gone out.
        return Response(answered.content, status_code=answered.status_code,
                        media_type=answered.headers.get("content-type", "application/json"),
                        background=BackgroundTask(proxy.finish_and_write, scope, span, answered, seconds,
                                                  time.time_ns()))

    async def models(request: Request) -> Response:
        params = request.path_params
        scope = await proxy.scope(params["rollout_id"], params["attempt_id"])
        upstream = await proxy.upstream(scope, params["resource"], None)
        model = {"id": upstream.llm.model, "object": "model", "owned_by": "lightning-queue"}
        return JSONResponse({"object": "list", "data": [model]})

    base = PROXY_PATH
    app = Starlette(routes=[Route(f"{base}/chat/completions", chat_completions, methods=["POST"]),
                            Route(f"{base}/models", models, methods=["GET"])],
                    exception_handlers={ProxyError: proxy_error}, lifespan=lifespan)
    app.state.proxy = proxy
    return app

