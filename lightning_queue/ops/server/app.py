"""The ASGI app: the API routers under ``/api/v1``, the change stream, the page, one access check."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from importlib import resources as importlib_resources
from typing import Any

import redis
import redis.asyncio
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPBasic, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from lightning_queue.client import LightningClient
from lightning_queue.core.errors import (
    AuthenticationRequiredError,
    ConfigurationError,
    CrossSiteRequestError,
    ExperimentError,
    ExperimentNotFoundError,
    ExperimentUnitError,
    InvalidCursorError,
    InvalidExperimentError,
    InvalidResourcesError,
    LightningQueueError,
    PointerError,
    RedisUnavailableError,
    ResourcesExistError,
    ResourcesNotFoundError,
    RolloutNotFoundError,
    SnapshotInUseError,
    VersionConflictError,
)
from lightning_queue.experiments.manager import Experiments
from lightning_queue.ops.server import events, experiments, rollouts, snapshots, workers
from lightning_queue.ops.server.auth import check_request
from lightning_queue.ops.server.config import ServerConfig
from lightning_queue.ops.server.deps import Services
from lightning_queue.storage.connections import connect_async

API_PREFIX = "/api/v1"
REALM = 'Basic realm="lightning-queue", charset="UTF-8"'

# The first class an error is an instance of decides its HTTP status.
_STATUS: list[tuple[type[LightningQueueError], int]] = [
    (AuthenticationRequiredError, 401),
    (CrossSiteRequestError, 403),
    (ResourcesNotFoundError, 404),
    (RolloutNotFoundError, 404),
    (ExperimentNotFoundError, 404),
    (InvalidCursorError, 400),
    (InvalidResourcesError, 400),
    (InvalidExperimentError, 400),
    (ExperimentUnitError, 400),
    (VersionConflictError, 409),
    (ResourcesExistError, 409),
    (SnapshotInUseError, 409),
    (PointerError, 409),
    (ExperimentError, 409),
    (RedisUnavailableError, 503),
    (ConfigurationError, 500),
]

# The page loads only what the server itself serves: no inline script, no other origin.
_PAGE_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


def status_of(exc: LightningQueueError) -> int:
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 400


def _error(exc: LightningQueueError) -> JSONResponse:
    status = status_of(exc)
    headers = {"WWW-Authenticate": REALM} if status == 401 else None
    return JSONResponse({"error": type(exc).__name__, "detail": str(exc)}, status_code=status, headers=headers)


class ErrorOut(BaseModel):
    """Every error answer: the error's class (see docs/troubleshooting.md) and what to do."""

    error: str
    detail: str


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorOut, "description": "A value the schema allows but that means nothing here (a cursor "
                                             "not handed out, an invalid definition)."},
    401: {"model": ErrorOut, "description": "No or wrong credentials (AuthenticationRequiredError)."},
    403: {"model": ErrorOut, "description": "A change from a page of another origin (CrossSiteRequestError)."},
    404: {"model": ErrorOut, "description": "No such snapshot, rollout or experiment."},
    409: {"model": ErrorOut, "description": "The change conflicts with the state (pointer moved, experiment "
                                             "stopped...)."},
    503: {"model": ErrorOut, "description": "Redis is unreachable (RedisUnavailableError)."},
}

# Declared for the OpenAPI schema (and so for API clients); the check itself is the middleware's.
_basic = HTTPBasic(auto_error=False, description="LQ_SERVER_USER and LQ_SERVER_PASSWORD")
_bearer = HTTPBearer(auto_error=False, description="LQ_SERVER_TOKEN")


def create_app(
    config: ServerConfig | None = None,
    *,
    client: LightningClient | None = None,
    async_redis: Callable[[], redis.asyncio.Redis] | None = None,
) -> FastAPI:
    """The server's app. ``client`` defaults to one from the environment's settings;
    ``async_redis`` makes the asyncio client the change stream subscribes with (default: one
    to the client's Redis, made when the app starts). The config is made safe first
    (:meth:`ServerConfig.with_credentials`): a password it made up is in
    ``app.state.generated_password``."""
    config, generated = (config or ServerConfig()).with_credentials()
    client = client or LightningClient()
    services = Services(client=client, experiments=Experiments(client), config=config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        shared: list[redis.asyncio.Redis] = []

        def connection() -> redis.asyncio.Redis:
            if not shared:
                settings = client.settings
                shared.append(async_redis() if async_redis else connect_async(
                    settings.redis_url, settings.sentinel_master, io_timeout=5.0))
            return shared[0]

        app.state.async_redis = connection
        try:
            yield
        finally:
            for made in shared:
                await made.aclose()

    app = FastAPI(
        title="lightning-queue",
        version="1",
        summary="Snapshots, pointers, rollouts, experiments and workers of one lightning-queue deployment.",
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=None,  # Swagger UI loads from a CDN: the page policy and closed networks forbid it
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.services = services
    app.state.generated_password = generated
    app.state.async_redis = None

    @app.middleware("http")
    async def access(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        try:
            request.state.user = check_request(config, request)
        except (AuthenticationRequiredError, CrossSiteRequestError) as exc:
            return _error(exc)
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        if request.url.path.startswith(API_PREFIX):
            response.headers.setdefault("Cache-Control", "no-store")
        else:
            response.headers.setdefault("Content-Security-Policy", _PAGE_POLICY)
        return response

    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_credentials=True,
                           allow_methods=["GET", "PUT", "POST"], allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(LightningQueueError)
    async def lightning_error(request: Request, exc: LightningQueueError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(redis.ConnectionError)
    @app.exception_handler(redis.TimeoutError)
    async def redis_down(request: Request, exc: Exception) -> JSONResponse:
        return _error(RedisUnavailableError(client.settings.redis_url, exc))

    api = APIRouter(prefix=API_PREFIX, dependencies=[Depends(_basic), Depends(_bearer)], responses=_ERRORS)
    for module in (snapshots, rollouts, experiments, workers, events):
        api.include_router(module.router)
    app.include_router(api)

    static = importlib_resources.files("lightning_queue.ops.server").joinpath("static")
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(str(static.joinpath("index.html")), media_type="text/html")

    return app
