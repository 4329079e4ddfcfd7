"""``lightning-queue worker``: start a standard Celery worker running an agent."""

import os
import sys
from typing import Annotated

import typer

from lightning_queue.ops.cli.context import cli_context

app = typer.Typer()


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def worker(
    ctx: typer.Context,
    agent: Annotated[str, typer.Option("--agent", "-a", envvar="LQ_AGENT", help="The agent, as module:attribute.")],
    concurrency: Annotated[
        int | None, typer.Option("--concurrency", "-c", help="Worker processes (default: CPUs).")
    ] = None,
    name: Annotated[str | None, typer.Option("--name", "-n", help="Node name, e.g. gpu1@%h.")] = None,
    loglevel: Annotated[str, typer.Option("--loglevel", "-l", help="Celery's log level.")] = "INFO",
) -> None:
    """Start a Celery worker running AGENT (any other option is passed to `celery worker`)."""
    from lightning_queue.ops.fleet import worker_env
    from lightning_queue.storage.connections import check_connection
    from lightning_queue.worker.app import load_agent

    sys.path.insert(0, os.getcwd())
    load_agent(agent)  # fail here, with a clear message, rather than inside celery
    settings = cli_context(ctx).settings
    # Celery would retry an unreachable or password-refusing broker forever, logging each try:
    # a worker started by hand says what is wrong at once instead.
    check_connection(settings.redis_url)
    env = worker_env(settings, agent, pythonpath=[os.getcwd()])
    argv = [sys.executable, "-m", "celery", "-A", "lightning_queue.app", "worker", "-Q", settings.queue,
            "--loglevel", loglevel]
    if concurrency:
        argv += ["--concurrency", str(concurrency)]
    if name:
        argv += ["--hostname", name]
    argv += list(ctx.args)
    os.execve(sys.executable, argv, env)
