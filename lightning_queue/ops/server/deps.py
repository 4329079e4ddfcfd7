"""What every route gets: the services the app was built with, and the access check."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from lightning_queue.client import LightningClient
from lightning_queue.experiments.manager import Experiments
from lightning_queue.ops.server.config import ServerConfig


@dataclass(frozen=True)
class Services:
    """Built once per app by :func:`~lightning_queue.ops.server.app.create_app`."""

    client: LightningClient
    experiments: Experiments
    config: ServerConfig


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def require_access(request: Request) -> str | None:
    """Who asked (None: an anonymous read on loopback). The app's middleware checked every request
    already (:func:`~lightning_queue.ops.server.auth.check_request`) and left the answer here."""
    user: str | None = request.state.user
    return user


ServicesDep = Annotated[Services, Depends(get_services)]
UserDep = Annotated[str | None, Depends(require_access)]


def actor(user: str | None) -> str:
    """How a change made through the server is recorded (a pointer move's ``by``)."""
    return f"server:{user or 'anonymous'}"
