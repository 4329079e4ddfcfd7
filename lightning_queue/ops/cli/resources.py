"""``lightning-queue resources``: store, read, point at, roll back and delete resource snapshots.

These commands talk to the snapshot registry alone (:meth:`CliContext.registry`), never
loading the client or Celery; ``gc`` also prunes rollout indexes, so it uses the client.
"""

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from lightning_queue.ops.cli.context import cli_context
from lightning_queue.ops.cli.output import Listing, console, fail, when

if TYPE_CHECKING:
    from lightning_queue.core.models import ResourcesUpdate

app = typer.Typer(help="Store and inspect resource snapshots and the pointers naming them.", no_args_is_help=True)

ResourcesArgument = Annotated[
    str | None,
    typer.Argument(
        help="The resources as JSON, e.g. "
        '\'{"prompt": {"resource_type": "prompt_template", "template": "Q: {question}"}}\'',
        show_default=False,
    ),
]
FileOption = Annotated[
    Path | None,
    typer.Option("--file", "-f", exists=True, dir_okay=False, help="Read the resources' JSON from this file."),
]


def _read_json(value: str | None, file: Path | None, what: str) -> Any:
    from lightning_queue.core.errors import ConfigurationError

    if (value is None) == (file is None):
        raise ConfigurationError(f"give the {what} either as a JSON argument or with --file, not both or neither")
    text = file.read_text() if file is not None else value
    assert text is not None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        source = str(file) if file is not None else "argument"
        raise ConfigurationError(
            f"the {what} ({source}) is not valid JSON: {exc}; in a shell, wrap the JSON in single quotes"
        ) from None


def _show_snapshot(update: "ResourcesUpdate") -> None:
    console.print(f"[bold]{update.resources_id}[/] version {update.version}")
    # model_dump_json masks secrets (api keys print as **********).
    console.print_json(update.model_dump_json(include={"resources"}))


@app.command("add")
def add(
    ctx: typer.Context,
    resources: ResourcesArgument = None,
    file: FileOption = None,
    resources_id: Annotated[str | None, typer.Option("--id", help="Choose the id (default: generated).")] = None,
) -> None:
    """Store a new snapshot; it becomes the latest."""
    registry = cli_context(ctx).registry()
    _show_snapshot(registry.add_resources(_read_json(resources, file, "resources"), resources_id))


@app.command("update")
def update(
    ctx: typer.Context,
    resources_id: Annotated[str, typer.Argument(help="The snapshot to store a new version of.")],
    resources: ResourcesArgument = None,
    file: FileOption = None,
    expected_version: Annotated[
        int | None,
        typer.Option(min=1, help="Write only if the current version is this one (refused if another writer got "
                                 "there first)."),
    ] = None,
) -> None:
    """Store a new version under an existing id; it becomes the latest."""
    registry = cli_context(ctx).registry()
    _show_snapshot(registry.update_resources(resources_id, _read_json(resources, file, "resources"), expected_version))


@app.command("get")
def get(
    ctx: typer.Context,
    resources_id: Annotated[str, typer.Argument(help="A snapshot id or a pointer name.")],
    version: Annotated[int | None, typer.Option(min=1, help="An earlier version (default: the current one).")] = None,
) -> None:
    """Show one snapshot (secrets masked)."""
    _show_snapshot(cli_context(ctx).registry().get_resources_by_id(resources_id, version))


@app.command("latest")
def latest(ctx: typer.Context) -> None:
    """Show the latest snapshot."""
    snapshot = cli_context(ctx).registry().get_latest_resources()
    if snapshot is None:
        raise typer.Exit(fail("no snapshot has been stored yet; add one with `lightning-queue resources add`"))
    _show_snapshot(snapshot)


@app.command("list")
def list_(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(min=1, help="Snapshots to show.")] = 20,
    offset: Annotated[int, typer.Option(min=0, help="Newest snapshots to skip.")] = 0,
) -> None:
    """List snapshots, newest first, with the pointers naming each (every id printed whole)."""
    registry = cli_context(ctx).registry()
    snapshots = registry.query_resources(offset, limit)
    naming: dict[str, list[str]] = {}
    for name, target in sorted(registry.pointers().items()):
        naming.setdefault(target, []).append(name)
    shown = Listing("resources_id", "version", "updated", "resources", "pointers",
                    wrap=["updated", "resources", "pointers"])
    for s in snapshots:
        kinds = ", ".join(f"{n}: {r.resource_type}" for n, r in s.resources.items())
        pointed = ", ".join(naming.get(s.resources_id, []))
        shown.add_row(s.resources_id, str(s.version), when(s.update_time), kinds, pointed)
    console.print(shown)


@app.command("pointer")
def pointer(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The pointer: prod, canary...")],
    target: Annotated[str, typer.Argument(help="A snapshot id, or another pointer (its current target is copied).")],
) -> None:
    """Point NAME at TARGET (recorded in the pointer's history)."""
    registry = cli_context(ctx).registry()
    old = registry.get_pointer(name)
    # Compare-and-set on what we read, so the old -> new printed is exactly the move made.
    new = registry.set_pointer(name, target, expected=old)
    console.print(f"{name}: {old or '(unset)'} -> {new}")


@app.command("pointers")
def pointers(ctx: typer.Context) -> None:
    """List the pointers and the snapshot each names."""
    registry = cli_context(ctx).registry()
    named = registry.pointers()
    versions = registry.current_versions(sorted(named))
    shown = Listing("pointer", "resources_id", "version")
    for name in sorted(named):
        current = versions.get(name)
        shown.add_row(name, named[name], str(current[1]) if current else "")
    console.print(shown)


@app.command("history")
def history(
    ctx: typer.Context,
    pointer: Annotated[str, typer.Argument(help="The pointer.")] = "latest",
    limit: Annotated[int, typer.Option(min=1, help="Moves to show.")] = 20,
) -> None:
    """Show a pointer's last moves, newest first."""
    moves = cli_context(ctx).registry().pointer_history(pointer, limit)
    if not moves:
        raise typer.Exit(fail(f"pointer {pointer!r} has never been moved; list pointers with `resources pointers`"))
    shown = Listing("from", "to", "when", "by", wrap=["when"])
    for m in moves:
        shown.add_row(m.from_id or "(unset)", m.to_id or "(unset)", when(m.time), m.by)
    console.print(shown)


@app.command("rollback")
def rollback(ctx: typer.Context, pointer: Annotated[str, typer.Argument(help="The pointer.")] = "latest") -> None:
    """Move a pointer back to its previous target (a second rollback undoes the first)."""
    move = cli_context(ctx).registry().rollback(pointer)
    console.print(f"{pointer}: {move.from_id or '(unset)'} -> {move.to_id}")


@app.command("delete")
def delete(
    ctx: typer.Context,
    resources_id: Annotated[str, typer.Argument(help="The snapshot to delete, with all its versions.")],
    force: Annotated[
        bool,
        typer.Option("--force", help="Delete even if in use: pointers naming it are unset, rollouts using it fail."),
    ] = False,
) -> None:
    """Delete a snapshot and all its versions; refused while pointers or queued/running rollouts use it."""
    registry = cli_context(ctx).registry()
    report = registry.delete_resources(resources_id, force=force)
    console.print(f"deleted {report.resources_id}")
    for name in sorted(report.moved_pointers):
        if name == "latest":
            console.print(f"  latest: {resources_id} -> {registry.get_pointer('latest') or '(unset)'}")
        else:
            console.print(f"  {name}: unset")
    if report.failed_rollouts:
        console.print(f"  {len(report.failed_rollouts)} queued/running rollouts failed: "
                      + ", ".join(report.failed_rollouts))


@app.command("gc")
def gc(
    ctx: typer.Context,
    keep: Annotated[int | None, typer.Option(min=0, help="Newest snapshots to keep (default: LQ_GC_KEEP).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be deleted; delete nothing.")] = False,
) -> None:
    """Apply the retention policy: keep the newest snapshots and every one pointed at or in use."""
    report = cli_context(ctx).client().apply_retention(keep, dry_run)
    shown = Listing("resources_id", "action", "why", wrap=["action", "why"])
    for rid, reasons in report.kept.items():
        shown.add_row(rid, "keep", ", ".join(reasons))
    for rid in report.deleted:
        shown.add_row(rid, "would delete" if report.dry_run else "deleted", "")
    for rid, reason in report.skipped.items():
        shown.add_row(rid, "skipped", reason)
    console.print(shown)
    console.print(report.summary())


@app.command("usage")
def usage(ctx: typer.Context, resources_id: Annotated[str, typer.Argument(help="The snapshot id.")]) -> None:
    """What each version of a snapshot cost: attempts, LLM calls, tokens and cost."""
    from lightning_queue.ops.cli.usage import show_usage

    rollups = cli_context(ctx).client().usage_by_version(resources_id)
    show_usage(f"snapshot {resources_id}", "version", {str(v): u for v, u in rollups.items()})
