"""What every command shares: the settings the global options chose, and the connections made from them.

The root callback builds one :class:`CliContext` per run and hands it to every command as
``ctx.obj``; nothing is kept at module level. Settings are read, and Redis reached, on first
use only, so ``--help`` and usage errors touch neither and a bad ``LQ_*`` variable is reported
by the command that needed it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from lightning_queue.client import LightningClient
    from lightning_queue.core.settings import Settings
    from lightning_queue.storage.registry import SnapshotRegistry


class CliContext:
    """The settings and connections of one run of ``lightning-queue``.

    ``client`` hands in a ready client (tests give one on fakeredis): every command then uses
    it, and it is left open for its owner to close. Otherwise connections are made on demand
    from ``overrides`` (the ``--redis-url``/``--prefix``/``--queue`` options) over the ``LQ_*``
    environment, and closed by :meth:`close` when the command ends.
    """

    def __init__(self, overrides: dict[str, str] | None = None, *, client: LightningClient | None = None) -> None:
        self.overrides = dict(overrides or {})
        self._settings: Settings | None = client.settings if client is not None else None
        self._client = client
        self._registry: SnapshotRegistry | None = client.registry if client is not None else None
        self._closers: list[Callable[[], None]] = []

    @property
    def settings(self) -> Settings:
        """The settings, read from the environment and the global options on first use
        (raises pydantic's ``ValidationError`` for a bad value)."""
        if self._settings is None:
            from lightning_queue.core.settings import Settings

            self._settings = Settings(**self.overrides)  # type: ignore[arg-type]  # str values, validated
        return self._settings

    def client(self) -> LightningClient:
        """The algorithm-side client (loads Celery on first publish): for commands that enqueue,
        wait, cancel or read rollouts, experiments and workers."""
        if self._client is None:
            from lightning_queue.client import LightningClient

            self._client = LightningClient(self.settings)
            self._closers.append(self._client.close)
        return self._client

    def registry(self) -> SnapshotRegistry:
        """The snapshot registry alone, without the client and Celery behind it: the ``resources``
        commands only read and write snapshots and pointers, and start faster for it."""
        if self._registry is None:
            from lightning_queue.storage.connections import connect
            from lightning_queue.storage.registry import SnapshotRegistry

            settings = self.settings
            connection = connect(settings.redis_url, settings.sentinel_master,
                                 retry_seconds=settings.redis_retry_seconds)
            self._registry = SnapshotRegistry(connection, settings.keys, settings)
            self._closers.append(connection.close)
        return self._registry

    def close(self) -> None:
        """Close the connections this context opened (not a client handed in)."""
        while self._closers:
            self._closers.pop()()


def cli_context(ctx: typer.Context) -> CliContext:
    """The :class:`CliContext` of the run ``ctx`` belongs to (made by the root callback)."""
    return ctx.ensure_object(CliContext)
