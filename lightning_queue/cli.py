"""The ``lightning-queue`` command: workers, snapshots and pointers, retention, rollouts, the demo."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator, List, Optional

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .client import LightningClient
from .errors import ConfigurationError, LightningQueueError, RedisAuthError, RedisUnavailableError
from .models import ResourcesUpdate, Rollout, RolloutConfig
from .retention import RetentionReport
from .settings import Settings

console = Console()
err = Console(stderr=True)


class _Commands(typer.core.TyperGroup):
    """The top-level group: an error the user caused ends the command with one line on
    stderr and exit code 1, never a traceback (every subcommand runs inside ``invoke``)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:  # noqa: BLE001 - sorted by _user_error; the rest propagates
            message = _user_error(exc)
            if message is None:
                raise
            raise typer.Exit(_fail(message)) from None


app = typer.Typer(
    help="A distributed rollout queue for optimizing AI agents.", no_args_is_help=True, pretty_exceptions_enable=False,
    cls=_Commands,
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
        source = str(file) if file is not None else "argument"
        raise ConfigurationError(
            f"the {what} ({source}) is not valid JSON: {exc}; in a shell, wrap the JSON in single quotes"
        ) from None


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
    from .connections import check_connection
    from .fleet import worker_env

    settings = _settings()
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
    expected_version: Optional[int] = typer.Option(
        None, min=1, help="Write only if the current version is this one (refused if another writer got there first)."
    ),
) -> None:
    """Store a new version under an existing id; it becomes the latest."""
    with _client() as client:
        _show_snapshot(
            client.update_resources(resources_id, _read_json(resources, file, "resources"), expected_version)
        )


@resources_app.command("get")
def resources_get(
    resources_id: str = typer.Argument(..., help="A snapshot id or a pointer name."),
    version: Optional[int] = typer.Option(None, min=1, help="An earlier version (default: the current one)."),
) -> None:
    """Show one snapshot (secrets masked)."""
    with _client() as client:
        _show_snapshot(client.get_resources_by_id(resources_id, version))


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


@resources_app.command("pointer")
def resources_pointer(
    name: str = typer.Argument(..., help="The pointer: prod, canary..."),
    target: str = typer.Argument(..., help="A snapshot id, or another pointer (its current target is copied)."),
) -> None:
    """Point NAME at TARGET (recorded in the pointer's history)."""
    with _client() as client:
        old = client.get_pointer(name)
        # Compare-and-set on what we read, so the old -> new printed is exactly the move made.
        new = client.set_pointer(name, target, expected=old)
    console.print(f"{name}: {old or '(unset)'} -> {new}")


@resources_app.command("pointers")
def resources_pointers() -> None:
    """List the pointers and the snapshot each names."""
    with _client() as client:
        pointers = client.pointers()
        versions = client.registry.current_versions(sorted(pointers))
    table = Table("pointer", "resources_id", "version")
    for name in sorted(pointers):
        current = versions.get(name)
        table.add_row(name, pointers[name], str(current[1]) if current else "")
    console.print(table)


@resources_app.command("history")
def resources_history(
    pointer: str = typer.Argument("latest"), limit: int = typer.Option(20, min=1, help="Moves to show.")
) -> None:
    """Show a pointer's last moves, newest first."""
    with _client() as client:
        moves = client.pointer_history(pointer, limit)
    if not moves:
        raise typer.Exit(_fail(f"pointer {pointer!r} has never been moved; list pointers with `resources pointers`"))
    table = Table("from", "to", "when", "by")
    for m in moves:
        table.add_row(m.from_id or "(unset)", m.to_id or "(unset)", _when(m.time), m.by)
    console.print(table)


@resources_app.command("rollback")
def resources_rollback(pointer: str = typer.Argument("latest")) -> None:
    """Move a pointer back to its previous target (a second rollback undoes the first)."""
    with _client() as client:
        move = client.rollback(pointer)
    console.print(f"{pointer}: {move.from_id or '(unset)'} -> {move.to_id}")


@resources_app.command("delete")
def resources_delete(
    resources_id: str,
    force: bool = typer.Option(
        False, "--force", help="Delete even if in use: pointers naming it are unset, rollouts using it fail."
    ),
) -> None:
    """Delete a snapshot and all its versions; refused while pointers or queued/running rollouts use it."""
    with _client() as client:
        report = client.delete_resources(resources_id, force=force)
        latest = client.get_pointer("latest") if "latest" in report.moved_pointers else None
    console.print(f"deleted {report.resources_id}")
    for name in sorted(report.moved_pointers):
        console.print(f"  {name}: {resources_id} -> {latest or '(unset)'}" if name == "latest" else f"  {name}: unset")
    if report.failed_rollouts:
        console.print(f"  {len(report.failed_rollouts)} queued/running rollouts failed: "
                      + ", ".join(report.failed_rollouts))


@resources_app.command("gc")
def resources_gc(
    keep: Optional[int] = typer.Option(None, min=0, help="Newest snapshots to keep (default: LQ_GC_KEEP)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would be deleted; delete nothing."),
) -> None:
    """Apply the retention policy: keep the newest snapshots and every one pointed at or in use."""
    with _client() as client:
        report = client.apply_retention(keep, dry_run)
    _show_retention(report)


def _show_retention(report: RetentionReport) -> None:
    table = Table("resources_id", "action", "why")
    for rid, reasons in report.kept.items():
        table.add_row(rid, "keep", ", ".join(reasons))
    for rid in report.deleted:
        table.add_row(rid, "would delete" if report.dry_run else "deleted", "")
    for rid, reason in report.skipped.items():
        table.add_row(rid, "skipped", reason)
    console.print(table)
    console.print(report.summary())


# ---------------------------------------------------------------------------------- rollouts


def _inputs(inputs: List[str], file: Optional[Path]) -> Iterator[Any]:
    for raw in inputs:
        try:
            yield json.loads(raw)
        except json.JSONDecodeError:
            yield raw  # a bare word is a string input
    if file is not None:
        for number, line in enumerate(file.read_text().splitlines(), 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ConfigurationError(
                        f"{file}, line {number}: not valid JSON ({exc}); put one JSON value per line"
                    ) from None


@rollouts_app.command("submit")
def rollouts_submit(
    inputs: List[str] = typer.Argument(None, help="Task inputs, each JSON (a bare word is a string)."),
    file: Optional[Path] = typer.Option(None, "--file", "-f", exists=True, dir_okay=False, help="JSON lines, one input each."),
    resources_id: Optional[str] = typer.Option(
        None, "--resources-id", "-r",
        help="A snapshot id or pointer name, pinned now (default: latest at run time).",
    ),
    follow: bool = typer.Option(
        False, "--follow", help="Resolve the id or pointer when each rollout runs, not at submit time."
    ),
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
        rollouts = client.enqueue_rollouts(
            items, resources_id=resources_id, resolve="following" if follow else None, mode=mode,  # type: ignore[arg-type]
            config=config,
        )
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


# ---------------------------------------------------------------------------------- workers


@app.command()
def workers() -> None:
    """Show each live worker process's snapshot cache: hit ratio, size, load latency."""
    with _client() as client:
        stats = client.cache_stats()
    if not stats:
        console.print("no worker process has reported cache stats (they do every LQ_CACHE_STATS_INTERVAL_SECONDS)")
        return
    table = Table("worker process", "hits", "misses", "hit ratio", "entries", "MB", "evictions", "mean load ms")
    for process, s in stats.items():
        table.add_row(process, str(s["hits"]), str(s["misses"]), f"{s['hit_ratio']:.1%}", str(s["entries"]),
                      f"{s['bytes'] / 1e6:.2f}", str(s["evictions"]), f"{s['mean_load_ms']:.2f}")
    hits, misses = sum(s["hits"] for s in stats.values()), sum(s["misses"] for s in stats.values())
    console.print(table)
    console.print(f"fleet: {len(stats)} process(es), hit ratio {hits / max(1, hits + misses):.1%}")


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
    # soft_wrap: one line whatever the width, so scripts can grep it and terminals wrap it.
    # escape: messages quote user input, which may hold [brackets] rich would read as markup.
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)
    return 1


def _user_error(exc: BaseException) -> str | None:
    """The one-line message for an error the user caused (bad input, unknown id, no Redis),
    or None for a bug, which keeps its traceback."""
    import redis
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        from .models import describe_validation_error

        where = " (from LQ_* variables or --redis-url/--prefix/--queue)" if exc.title == "Settings" else ""
        return f"invalid {exc.title}{where}: {describe_validation_error(exc)}"
    if isinstance(exc, (LightningQueueError, ConfigurationError)):
        return str(exc)
    if isinstance(exc, redis.AuthenticationError):
        return str(RedisAuthError(_settings().redis_url, exc))
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
        return str(RedisUnavailableError(_settings().redis_url, exc))  # names the URL, password masked
    return None


def main() -> None:
    """Entry point: user errors print one line, not a traceback (see :class:`_Commands`)."""
    app()


if __name__ == "__main__":
    main()
