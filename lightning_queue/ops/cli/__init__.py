"""The ``lightning-queue`` command.

One module per command group (:mod:`.resources`, :mod:`.rollouts`, :mod:`.experiments`) or
command (:mod:`.worker`, :mod:`.workers`, :mod:`.status`, :mod:`.exporter`, :mod:`.server`, :mod:`.proxy`,
:mod:`.demo`).
A module imports at its top only typer and rich; the client, Celery, pydantic, scipy or
Prometheus are imported inside the command that uses them, so ``--help`` and the quick reads
start fast. The global options become a :class:`~.context.CliContext` that every command gets
as ``ctx.obj``. An error the user caused ends any command with one line on stderr and exit
code 1, never a traceback (:class:`_Commands`).
"""

from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from lightning_queue.ops.cli import (
    demo,
    experiments,
    exporter,
    proxy,
    resources,
    rollouts,
    server,
    status,
    worker,
    workers,
)
from lightning_queue.ops.cli.context import CliContext
from lightning_queue.ops.cli.output import fail

__all__ = ["CliContext", "app", "main"]


class _Commands(TyperGroup):
    """The top-level group: every subcommand runs inside :meth:`invoke`, which turns an error
    the user caused into one line on stderr and exit code 1; a bug keeps its traceback."""

    def invoke(self, ctx: Any) -> Any:  # Any: typer annotates it with the click it vendors, or with click's
        try:
            return super().invoke(ctx)
        except Exception as exc:
            message = user_error(exc, ctx.find_object(CliContext))
            if message is None:
                raise
            raise typer.Exit(fail(message)) from None


def user_error(exc: BaseException, context: CliContext | None) -> str | None:
    """The one-line message for an error the user caused (bad input, unknown id, no Redis),
    or None for a bug."""
    import redis
    from pydantic import ValidationError

    from lightning_queue.core.errors import LightningQueueError, RedisAuthError, RedisUnavailableError

    if isinstance(exc, ValidationError):
        from lightning_queue.core.models import describe_validation_error

        where = " (from LQ_* variables or --redis-url/--prefix/--queue)" if exc.title == "Settings" else ""
        return f"invalid {exc.title}{where}: {describe_validation_error(exc)}"
    if isinstance(exc, LightningQueueError):
        return str(exc)
    if isinstance(exc, redis.RedisError) and context is not None:
        url = context.settings.redis_url  # read before any connection was tried: it is valid here
        if isinstance(exc, redis.AuthenticationError):
            return str(RedisAuthError(url, exc))
        if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
            return str(RedisUnavailableError(url, exc))  # names the URL, password masked
    return None


app = typer.Typer(
    help="A distributed rollout queue for optimizing AI agents.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    cls=_Commands,
)


@app.callback()
def _global_options(
    ctx: typer.Context,
    redis_url: Annotated[
        str | None, typer.Option(envvar="LQ_REDIS_URL", help="Redis URL (registry, store, broker).")
    ] = None,
    prefix: Annotated[str | None, typer.Option(envvar="LQ_KEY_PREFIX", help="Prefix of every Redis key.")] = None,
    queue: Annotated[str | None, typer.Option(envvar="LQ_QUEUE", help="Celery queue of the rollouts.")] = None,
) -> None:
    overrides = {k: v for k, v in {"redis_url": redis_url, "key_prefix": prefix, "queue": queue}.items() if v}
    handed_in = ctx.find_object(CliContext)  # CliRunner.invoke(app, args, obj=CliContext(client=...))
    if handed_in is not None:
        handed_in.overrides.update(overrides)
        return
    ctx.obj = CliContext(overrides)
    ctx.call_on_close(ctx.obj.close)


app.add_typer(worker.app)
app.add_typer(workers.app)
app.add_typer(status.app)
app.add_typer(exporter.app)
app.add_typer(server.app)
app.add_typer(proxy.app)
app.add_typer(resources.app, name="resources")
app.add_typer(rollouts.app, name="rollouts")
app.add_typer(experiments.app, name="experiments")
app.add_typer(demo.app)


def main() -> None:
    """The ``lightning-queue`` entry point (also ``python -m lightning_queue``)."""
    app(prog_name="lightning-queue")
