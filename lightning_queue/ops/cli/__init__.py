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
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from lightning_queue.client import LightningClient
from lightning_queue.core.errors import (
    ConfigurationError,
    LightningQueueError,
    RedisAuthError,
    RedisUnavailableError,
)
from lightning_queue.core.models import ResourcesUpdate, Rollout, RolloutConfig
from lightning_queue.core.settings import Settings
from lightning_queue.storage.retention import RetentionReport

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
    from lightning_queue.worker.app import load_agent

    sys.path.insert(0, os.getcwd())
    load_agent(agent)  # fail here, with a clear message, rather than inside celery
    from lightning_queue.ops.fleet import worker_env
    from lightning_queue.storage.connections import check_connection

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
    """Show each live worker's consumption health (stalled or not) and each worker process's
    snapshot cache. Exits with status 1 when a worker is stalled (alive but not consuming)."""
    import time

    with _client() as client:
        health = client.worker_health()
        stats = client.cache_stats()
    now = time.time()
    if health:
        table = Table("worker", "state", "active", "queued", "last message", "consuming")
        for h in health:
            last = "never" if h.last_received is None else f"{now - h.last_received:.0f} s ago"
            queued = ", ".join(f"{q}: {n}" for q, n in h.queued.items())
            table.add_row(h.hostname, "[bold red]STALLED[/]" if h.stalled else "ok", f"{h.active}/{h.concurrency}",
                          escape(queued), last, escape(", ".join(h.consuming) or "(nothing)"))
        console.print(table)
        for h in health:
            if h.stalled:
                err.print(f"[bold red]stalled:[/] {escape(h.hostname)}: {escape(h.reason or '')}", soft_wrap=True,
                          highlight=False)
    else:
        console.print("no worker has reported its health (workers do every LQ_WATCHDOG_INTERVAL seconds)")
    if not stats:
        console.print("no worker process has reported cache stats (they do every LQ_CACHE_STATS_INTERVAL_SECONDS)")
    else:
        table = Table("worker process", "hits", "misses", "hit ratio", "entries", "MB", "evictions", "mean load ms")
        for process, s in stats.items():
            table.add_row(process, str(s["hits"]), str(s["misses"]), f"{s['hit_ratio']:.1%}", str(s["entries"]),
                          f"{s['bytes'] / 1e6:.2f}", str(s["evictions"]), f"{s['mean_load_ms']:.2f}")
        hits, misses = sum(s["hits"] for s in stats.values()), sum(s["misses"] for s in stats.values())
        console.print(table)
        console.print(f"fleet: {len(stats)} process(es), hit ratio {hits / max(1, hits + misses):.1%}")
    if any(h.stalled for h in health):
        raise typer.Exit(1)


# ---------------------------------------------------------------------------------- demo


@app.command()
def demo(
    workers: int = typer.Option(2, min=1, help="Worker processes to start (separate `celery worker`s)."),
    concurrency: int = typer.Option(2, min=1, help="Pool processes in each worker."),
    keep: bool = typer.Option(False, help="Leave the demo's keys in Redis afterwards."),
) -> None:
    """Run prompt search end to end: snapshots, real workers, promotion of the best prompt."""
    from lightning_queue.ops.demo.run import run_demo

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
        from lightning_queue.core.models import describe_validation_error

        where = " (from LQ_* variables or --redis-url/--prefix/--queue)" if exc.title == "Settings" else ""
        return f"invalid {exc.title}{where}: {describe_validation_error(exc)}"
    if isinstance(exc, (LightningQueueError, ConfigurationError)):
        return str(exc)
    if isinstance(exc, redis.AuthenticationError):
        return str(RedisAuthError(_settings().redis_url, exc))
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
        return str(RedisUnavailableError(_settings().redis_url, exc))  # names the URL, password masked
    return None


# ---------------------------------------------------------------------------------- experiments
# The `experiments` sub-app: A/B experiments, canaries' state and promotion (lightning_queue.experiments).

experiments_app = typer.Typer(help="A/B experiments: create, start, stop, report, promote.", no_args_is_help=True)
app.add_typer(experiments_app, name="experiments")


def _experiments(client: LightningClient) -> Any:
    from lightning_queue.experiments.manager import Experiments

    return Experiments(client)


def _parse_variant(spec: str) -> dict[str, Any]:
    name, sep, rest = spec.partition("=")
    ref, _, weight = rest.partition(":")  # ids and pointer names never hold ':'
    if not sep or not name or not ref:
        raise ConfigurationError(f"--variant {spec!r}: write NAME=RESOURCES or NAME=RESOURCES:WEIGHT, e.g. "
                                 "control=prod or treatment=rs-new:0.2")
    try:
        return {"name": name, "resources_id": ref, "weight": float(weight) if weight else 1.0}
    except ValueError:
        raise ConfigurationError(f"--variant {spec!r}: the weight {weight!r} is not a number") from None


@experiments_app.command("create")
def experiments_create(
    name: str,
    variant: List[str] = typer.Option(
        ..., "--variant", "-v", help="NAME=RESOURCES[:WEIGHT] (an id or pointer); repeat it; the first is the control."
    ),
    unit_key: str = typer.Option("input", help="What is assigned: input.<field>, metadata.<field>, or the whole input."),
    salt: Optional[str] = typer.Option(None, help="Hash salt (default: the name)."),
    coverage: float = typer.Option(1.0, min=0.0, max=1.0, help="Share of units in the experiment."),
    fallback: Optional[str] = typer.Option(None, help="Snapshot for units outside coverage (default: the control's)."),
    paired: bool = typer.Option(False, "--paired", help="Run every input under every variant (paired comparison)."),
    description: str = typer.Option("", help="What the experiment tests."),
) -> None:
    """Create an experiment (a draft: start it to route rollouts)."""
    from lightning_queue.experiments.manager import parse_experiment

    spec = {"name": name, "variants": [_parse_variant(v) for v in variant], "unit_key": unit_key,
            "salt": salt or "", "coverage": coverage, "fallback": fallback, "paired": paired,
            "description": description}
    with _client() as client:
        exp = _experiments(client).create(parse_experiment(spec))
    console.print(f"created {exp.name} (draft): " + ", ".join(f"{v.name}={v.resources_id}:{v.weight:g}"
                                                               for v in exp.variants))


@experiments_app.command("start")
def experiments_start(
    name: str, rebucket: bool = typer.Option(False, "--rebucket", help="New bucket version: assign every unit afresh.")
) -> None:
    """Start (or restart) routing rollouts through an experiment."""
    with _client() as client:
        exp = _experiments(client).start(name, rebucket=rebucket)
    console.print(f"{exp.name}: running (bucket version {exp.bucket_version})")


@experiments_app.command("stop")
def experiments_stop(name: str, reason: str = typer.Option("stopped by hand", help="Recorded with the stop.")) -> None:
    """Stop routing; enqueued rollouts still count in the report."""
    with _client() as client:
        exp = _experiments(client).stop(name, reason)
    console.print(f"{exp.name}: stopped ({exp.stop_reason})")


@experiments_app.command("status")
def experiments_status(name: Optional[str] = typer.Argument(None, help="One experiment (default: list them all).")) -> None:
    """List experiments, or show one's definition and state."""
    with _client() as client:
        ex = _experiments(client)
        if name is not None:
            console.print_json(ex.get(name).model_dump_json())
            return
        experiments = ex.all()
    table = Table("name", "status", "variants", "unit", "coverage", "bucket v", "created", "note")
    for e in experiments:
        variants = ", ".join(f"{v.name}={v.resources_id}" + ("" if e.paired else f":{v.weight:g}") for v in e.variants)
        table.add_row(e.name, e.status, variants, "paired" if e.paired else e.unit_key, f"{e.coverage:.0%}",
                      str(e.bucket_version), _when(e.create_time), e.stop_reason or "")
    console.print(table)


@experiments_app.command("report")
def experiments_report(
    name: str,
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    chart: Optional[Path] = typer.Option(None, "--chart", dir_okay=False, help="Write a PNG of the rewards here."),
    alpha: float = typer.Option(0.05, min=0.0001, max=0.5, help="Significance level."),
    min_sample: int = typer.Option(30, min=2, help="Rewards per variant (pairs, if paired) before any verdict."),
) -> None:
    """Per-variant metrics and each treatment against the control."""
    with _client() as client:
        report = _experiments(client).report(name, alpha=alpha, min_sample=min_sample)
    if chart is not None:
        report.save_chart(chart)
    if as_json:
        print(report.to_json())
        return
    for table in report.tables():
        console.print(table)
    if chart is not None:
        console.print(f"chart written to {chart}")


@experiments_app.command("promote")
def experiments_promote(
    name: str,
    variant: Optional[str] = typer.Option(None, help="The variant to promote (default: the report's winner)."),
    pointer: str = typer.Option("latest", help="The pointer to move to it."),
) -> None:
    """Move a pointer to the winning variant's snapshot and stop the experiment, in one atomic step."""
    with _client() as client:
        done = _experiments(client).promote(name, variant, pointer)
    console.print(f"{pointer}: {done.from_id or '(unset)'} -> {done.to_id} ({done.winner}); {name} stopped")


# ---------------------------------------------------------------------------------- monitoring: status, exporter
# (imports kept local to this block: the exporter and the live view are the only users)


def _queues(queues: Optional[str]) -> list[str]:
    return [q.strip() for q in queues.split(",") if q.strip()] if queues else [_settings().queue]


def _ping(client: LightningClient, timeout: float) -> dict[str, bool] | None:
    """Each worker node that answered a Celery ping within ``timeout`` (None: the ping itself failed)."""
    try:
        replies = client.celery.control.ping(timeout=timeout)
    except Exception:  # noqa: BLE001 - the broker may be unreachable: the frame shows it, not a traceback
        return None
    return {node: True for reply in replies for node in reply}


def _status_frame(client: LightningClient, queues: list[str], ping: float | None, max_snapshots: int) -> Any:
    """One frame of ``lightning-queue status``: workers, queues, rollouts per status and per snapshot."""
    from rich.console import Group

    from lightning_queue.core.errors import redacted_url
    from lightning_queue.ops.monitoring import (
        FleetCache,
        node_of,
        read_overview,
        worker_liveness,
    )

    overview = read_overview(client, queues, max_snapshots)
    stats = client.cache_stats()
    pinged = _ping(client, ping) if ping is not None else None
    liveness = worker_liveness(client)
    nodes: dict[str, dict[str, dict[str, Any]]] = {}
    for process, s in stats.items():
        nodes.setdefault(node_of(process), {})[process] = s
    for node in pinged or {}:
        nodes.setdefault(node, {})
    workers = Table("worker", "processes", "ping", "consuming", "cache hit ratio", "snapshot loads", "mean load ms",
                    "cache MB", title="workers")
    for node, processes in sorted(nodes.items()):
        fleet = FleetCache.of(processes)
        ping_text = "-" if ping is None else "ping failed" if pinged is None else (
            "pong" if node in pinged else "[red]no reply[/]")
        workers.add_row(node, str(fleet.processes), ping_text, liveness.get(node, "-"),
                        f"{fleet.hit_ratio:.1%}" if processes else "-", str(fleet.loads),
                        f"{1000 * fleet.mean_load_seconds:.2f}",
                        f"{sum(s.get('bytes', 0) for s in processes.values()) / 1e6:.2f}")
    if not nodes:
        workers.caption = "no worker answered the ping or reported cache stats"
    fleet = FleetCache.of(stats)
    queue_table = Table("queue", "waiting", "by priority", title="queues")
    for queue, steps in overview.queue_depth.items():
        by_priority = " ".join(f"p{step}:{n}" for step, n in steps.items() if n)
        queue_table.add_row(queue, str(sum(steps.values())), by_priority)
    status_table = Table(*overview.rollouts_by_status, title="rollouts")
    status_table.add_row(*(str(n) for n in overview.rollouts_by_status.values()))
    snapshot_table = Table("resources_id", "pointers", "rollouts",
                           title=f"snapshots ({len(overview.rollouts_by_resources)} of {overview.snapshots})")
    for rid, n in overview.rollouts_by_resources.items():
        snapshot_table.add_row(rid, ", ".join(overview.pointers_naming(rid)), str(n))
    header = (f"[bold]lightning-queue[/] {escape(redacted_url(client.settings.redis_url))} "
              f"prefix {escape(client.keys.prefix)}  {_when(overview.time)}  "
              f"{len(nodes)} worker(s), fleet cache hit ratio {fleet.hit_ratio:.1%}, "
              f"{overview.unacked} message(s) held by workers")
    return Group(header, workers, queue_table, status_table, snapshot_table)


@app.command()
def status(
    interval: float = typer.Option(2.0, min=0.1, help="Seconds between refreshes."),
    once: bool = typer.Option(False, "--once", help="Print one frame and exit."),
    queues: Optional[str] = typer.Option(None, "--queues", help="Comma-separated queues to show (default: LQ_QUEUE)."),
    ping: bool = typer.Option(True, "--ping/--no-ping", help="Ping the workers through Celery each frame."),
    ping_timeout: float = typer.Option(1.0, min=0.1, help="Seconds to wait for ping replies."),
    snapshots: int = typer.Option(10, min=1, help="Newest snapshots to show (pointer targets always are)."),
) -> None:
    """A live view of the fleet: workers, queue depth, rollouts per status and per snapshot."""
    import time

    import redis

    from lightning_queue.core.errors import redacted_url

    client = _client()
    watched = _queues(queues)

    def frame() -> Any:
        return _status_frame(client, watched, ping_timeout if ping else None, snapshots)

    if once:
        console.print(frame())
        return
    from rich.live import Live

    with Live(frame(), console=console, auto_refresh=False) as live:
        try:
            while True:
                time.sleep(interval)
                try:
                    live.update(frame(), refresh=True)
                except redis.RedisError as exc:  # keep watching: Redis may come back
                    url = redacted_url(_settings().redis_url)  # never show the password
                    live.update(f"[red]cannot read Redis at {escape(url)}: {escape(str(exc))}[/]", refresh=True)
        except KeyboardInterrupt:
            pass


@app.command()
def exporter(
    port: int = typer.Option(9808, help="Port of the /metrics endpoint."),
    address: str = typer.Option("0.0.0.0", help="Address to listen on."),
    queues: Optional[str] = typer.Option(None, "--queues", help="Comma-separated queues (default: LQ_QUEUE)."),
    snapshots: int = typer.Option(50, min=1, help="Newest snapshots to count rollouts of (pointer targets always)."),
) -> None:
    """Serve Prometheus metrics (rollouts per status and snapshot, queue depth, worker caches) until stopped."""
    import signal
    import threading

    from lightning_queue.ops.monitoring import Exporter

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with Exporter(_client(), port, address, _queues(queues), snapshots) as served:
        err.print(f"serving metrics on http://{address}:{served.port}/metrics (prefix {_settings().key_prefix})")
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass


def main() -> None:
    """Entry point: user errors print one line, not a traceback (see :class:`_Commands`)."""
    app()


if __name__ == "__main__":
    main()
