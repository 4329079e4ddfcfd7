"""``lightning-queue demo``: prompt search end to end on real worker processes."""

from typing import Annotated

import typer

from lightning_queue.ops.cli.context import cli_context
from lightning_queue.ops.cli.output import console

app = typer.Typer()


@app.command()
def demo(
    ctx: typer.Context,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes to start (separate `celery worker`s).")] = 2,
    concurrency: Annotated[int, typer.Option(min=1, help="Pool processes in each worker.")] = 2,
    keep: Annotated[bool, typer.Option(help="Leave the demo's keys in Redis afterwards.")] = False,
) -> None:
    """Run prompt search end to end: snapshots, real workers, promotion of the best prompt."""
    from lightning_queue.ops.demo.run import run_demo

    run_demo(cli_context(ctx).settings, workers=workers, concurrency=concurrency, keep=keep, console=console)
