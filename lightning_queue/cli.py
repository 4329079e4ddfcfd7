"""The ``lightning-queue`` command: workers, snapshots, rollouts, the demo."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator, List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .client import LightningClient
from .errors import ConfigurationError, LightningQueueError
from .models import ResourcesUpdate, Rollout, RolloutConfig
from .settings import Settings

console = Console()
err = Console(stderr=True)

app = typer.Typer(
    help="A distributed rollout queue for optimizing AI agents.", no_args_is_help=True, pretty_exceptions_enable=False
)
resources_app = typer.Typer(help="Store and inspect resource snapshots.", no_args_is_help=True)
rollouts_app = typer.Typer(help="Submit and follow rollouts.", no_args_is_help=True)
app.add_typer(resources_app, name="resources")
app.add_typer(rollouts_app, name="rollouts")


class _State:
    settings: Settings | None = None


@app.callback()
def _main(
    redis_url: Optional[str] = typer.Option(None, envvar="LQ_REDIS_URL", help="Redis URL (registry, store, broker)."),
    prefix: Optional[str] = typer.Option(None, envvar="LQ_KEY_PREFIX", help="Prefix of every Redis key."),
    queue: Optional[str] = typer.Option(None, envvar="LQ_QUEUE", help="Celery queue of the rollouts."),
) -> None:
    overrides = {k: v for k, v in {"redis_url": redis_url, "key_prefix": prefix, "queue": queue}.items() if v}
    _State.settings = Settings(**overrides)


def _settings() -> Settings:
    return _State.settings or Settings()


def _client() -> LightningClient:
    return LightningClient(_settings())


def _read_json(value: Optional[str], file: Optional[Path], what: str) -> Any:
    if (value is None) == (file is None):
        raise typer.BadParameter(f"give the {what} either as a JSON argument or with --file")
    text = file.read_text() if file is not None else value
    try:
        return json.loads(text)  # type: ignore[arg-type]
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"the {what} is not valid JSON: {exc}") from None


def _show_snapshot(update: ResourcesUpdate) -> None:
    console.print(f"[bold]{update.resources_id}[/] version {update.version}")
    # model_dump_json masks secrets (api keys print as **********).
    console.print_json(update.model_dump_json(include={"resources"}))


# ---------------------------------------------------------------------------------- worker


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def worker(
    ctx: typer.Context,
    agent: str = typer.Option(..., "--agent", "-a", envvar="LQ_AGENT", help="The agent, as module:attribute."),
    concurrency: Optional[int] = typer.Option(None, "--concurrency", "-c", help="Worker processes (default: CPUs)."),
    name: Optional[str] = typer.Option(None, "--name", "-n", help="Node name, e.g. gpu1@%h."),
    loglevel: str = typer.Option("INFO", "--loglevel", "-l"),
) -> None:
    """Start a Celery worker running AGENT (any other option is passed to `celery worker`)."""
    from .app import load_agent

    sys.path.insert(0, os.getcwd())
    load_agent(agent)  # fail here, with a clear message, rather than inside celery
    settings = _settings()
    env = dict(os.environ, LQ_AGENT=agent, LQ_REDIS_URL=settings.redis_url, LQ_KEY_PREFIX=settings.key_prefix,
               LQ_QUEUE=settings.queue)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [os.getcwd(), env.get("PYTHONPATH", "")] if p)
    argv = [sys.executable, "-m", "celery", "-A", "lightning_queue.app", "worker", "-Q", settings.queue,
            "--loglevel", loglevel]
    if concurrency:
        argv += ["--concurrency", str(concurrency)]
    if name:
        argv += ["--hostname", name]
    argv += list(ctx.args)
    os.execve(sys.executable, argv, env)


# ---------------------------------------------------------------------------------- resources


@resources_app.command("add")
def resources_add(
    resources: Optional[str] = typer.Argument(None, help='JSON, e.g. \'{"prompt": {"resource_type": "prompt_template", "template": "Q: {question}"}}\''),
    file: Optional[Path] = typer.Option(None, "--file", "-f", exists=True, dir_okay=False),
    resources_id: Optional[str] = typer.Option(None, "--id", help="Choose the id (default: generated)."),
) -> None:
    """Store a new snapshot; it becomes the latest."""
    with _client() as client:
        _show_snapshot(client.add_resources(_read_json(resources, file, "resources"), resources_id))


@resources_app.command("update")
def resources_update(
    resources_id: str,
    resources: Optional[str] = typer.Argument(None),
    file: Optional[Path] = typer.Option(None, "--file", "-f", exists=True, dir_okay=False),
) -> None:
    """Store a new version under an existing id; it becomes the latest."""
    with _client() as client:
        _show_snapshot(client.update_resources(resources_id, _read_json(resources, file, "resources")))


@resources_app.command("get")
def resources_get(resources_id: str) -> None:
    """Show one snapshot (secrets masked)."""
    with _client() as client:
        _show_snapshot(client.get_resources_by_id(resources_id))


@resources_app.command("latest")
def resources_latest() -> None:
    """Show the latest snapshot."""
    with _client() as client:
        latest = client.get_latest_resources()
    if latest is None:
        raise typer.Exit(_fail("no snapshot has been stored yet; add one with `lightning-queue resources add`"))
    _show_snapshot(latest)


@resources_app.command("list")
def resources_list(
    limit: int = typer.Option(20, min=1), offset: int = typer.Option(0, min=0)
) -> None:
    """List snapshots, newest first."""
    with _client() as client:
        latest = client.get_latest_resources()
        snapshots = client.query_resources(offset, limit)
    table = Table("resources_id", "version", "updated", "resources", "")
    for s in snapshots:
        kinds = ", ".join(f"{n}:{r.resource_type}" for n, r in s.resources.items())
        mark = "latest" if latest and latest.resources_id == s.resources_id else ""
        table.add_row(s.resources_id, str(s.version), _when(s.update_time), kinds, mark)
    console.print(table)


# ---------------------------------------------------------------------------------- rollouts


def _inputs(inputs: List[str], file: Optional[Path]) -> Iterator[Any]:
    for raw in inputs:
        try:
            yield json.loads(raw)
        except json.JSONDecodeError:
            yield raw  # a bare word is a string input
    if file is not None:
        for line in file.read_text().splitlines():
            if line.strip():
                yield json.loads(line)


@rollouts_app.command("submit")
def rollouts_submit(
    inputs: List[str] = typer.Argument(None, help="Task inputs, each JSON (a bare word is a string)."),
    file: Optional[Path] = typer.Option(None, "--file", "-f", exists=True, dir_okay=False, help="JSON lines, one input each."),
    resources_id: Optional[str] = typer.Option(None, "--resources-id", "-r", help="Pin to a snapshot (default: latest at run time)."),
    mode: str = typer.Option("train", help="train, val or test."),
    max_attempts: int = typer.Option(1, min=1),
    timeout: Optional[float] = typer.Option(None, help="Time limit of one attempt, seconds."),
    wait: bool = typer.Option(False, "--wait", "-w", help="Wait for them and show the results."),
) -> None:
    """Enqueue rollouts; prints their ids."""
    items = list(_inputs(inputs or [], file))
    if not items:
        raise typer.BadParameter("give at least one input, or --file")
    config = RolloutConfig(max_attempts=max_attempts, timeout_seconds=timeout)
    with _client() as client:
        rollouts = client.enqueue_rollouts(items, resources_id=resources_id, mode=mode, config=config)  # type: ignore[arg-type]
        for r in rollouts:
            console.print(r.rollout_id)
        if wait:
            _wait(client, [r.rollout_id for r in rollouts], None)


def _wait(client: LightningClient, ids: list[str], timeout: Optional[float]) -> None:
    with Progress(TextColumn("rollouts"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err) as bar:
        task = bar.add_task("wait", total=len(ids))
        finished = client.wait_for_rollouts(ids, timeout, on_finished=lambda _: bar.advance(task))
    _rollout_table(finished)
    if len(finished) < len(ids):
        raise typer.Exit(_fail(f"{len(ids) - len(finished)} of {len(ids)} rollouts did not finish in {timeout} s"))


@rollouts_app.command("wait")
def rollouts_wait(
    rollout_ids: List[str], timeout: Optional[float] = typer.Option(None, help="Give up after this many seconds.")
) -> None:
    """Wait for rollouts to finish, with a progress bar."""
    with _client() as client:
        _wait(client, rollout_ids, timeout)


@rollouts_app.command("status")
def rollouts_status(rollout_id: str) -> None:
    """Show a rollout and its attempts."""
    with _client() as client:
        rollout = client.get_rollout(rollout_id)
        attempts = client.get_attempts(rollout_id)
    console.print_json(rollout.model_dump_json())
    table = Table("#", "status", "worker", "resources_id", "version", "seconds", "error")
    for a in attempts:
        seconds = f"{a.end_time - a.start_time:.2f}" if a.end_time else ""
        error = f"{a.error.type}: {a.error.message}" if a.error else ""
        table.add_row(str(a.sequence_id), a.status, a.worker_id, a.resources_id or "", str(a.resources_version or ""),
                      seconds, error)
    console.print(table)


@rollouts_app.command("list")
def rollouts_list(
    status: Optional[str] = typer.Option(None), mode: Optional[str] = typer.Option(None),
    resources_id: Optional[str] = typer.Option(None, "--resources-id", "-r"),
    worker_id: Optional[str] = typer.Option(None, "--worker"),
    limit: int = typer.Option(20, min=1), offset: int = typer.Option(0, min=0),
) -> None:
    """List rollouts, newest first, filtered."""
    with _client() as client:
        rollouts = client.query_rollouts(status=status, mode=mode, resources_id=resources_id, worker_id=worker_id,
                                         limit=limit, offset=offset)
    _rollout_table(rollouts)


@rollouts_app.command("cancel")
def rollouts_cancel(rollout_id: str) -> None:
    """Cancel a rollout that has not finished."""
    with _client() as client:
        console.print(f"{rollout_id}: {client.cancel_rollout(rollout_id)}")


def _rollout_table(rollouts: list[Rollout]) -> None:
    table = Table("rollout_id", "status", "mode", "resources_id", "attempts", "reward", "error")
    for r in rollouts:
        reward = "" if r.reward is None else f"{r.reward:g}"
        error = f"{r.error.type}: {r.error.message}"[:80] if r.error else ""
        table.add_row(r.rollout_id, r.status, r.mode or "", r.resources_id or "(latest)", str(r.attempt_count), reward,
                      error)
    console.print(table)


# ---------------------------------------------------------------------------------- demo


@app.command()
def demo(
    workers: int = typer.Option(2, min=1, help="Worker processes to start (separate `celery worker`s)."),
    concurrency: int = typer.Option(2, min=1, help="Pool processes in each worker."),
    keep: bool = typer.Option(False, help="Leave the demo's keys in Redis afterwards."),
) -> None:
    """Run prompt search end to end: snapshots, real workers, promotion of the best prompt."""
    from .demo import run_demo

    run_demo(_settings(), workers=workers, concurrency=concurrency, keep=keep, console=console)


# ---------------------------------------------------------------------------------- helpers


def _when(timestamp: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def _fail(message: str) -> int:
    err.print(f"[bold red]error:[/] {message}")
    return 1


def main() -> None:
    """Entry point: user errors print one line, not a traceback."""
    try:
        app()
    except (LightningQueueError, ConfigurationError) as exc:
        raise SystemExit(_fail(str(exc))) from None
    except Exception as exc:  # noqa: BLE001 - redis errors and pydantic errors at the edge
        import redis
        from pydantic import ValidationError

        if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
            raise SystemExit(_fail(f"cannot reach Redis at {_settings().redis_url}: {exc}")) from None
        if isinstance(exc, ValidationError):
            raise SystemExit(_fail(str(exc))) from None
        raise
