"""``lightning-queue resources``: store, read, diff, point at, protect, roll back and delete resource snapshots.

These commands talk to the snapshot registry alone (:meth:`CliContext.registry`), never
loading the client or Celery; ``gc`` also prunes rollout indexes, so it uses the client.
"""

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

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
MessageOption = Annotated[str | None, typer.Option("--message", "-m", help="Why this version: what changed.")]
AuthorOption = Annotated[
    str | None, typer.Option("--author", help="Who wrote it (default: user@host, or LQ_ACTOR).", show_default=False)]
TagOption = Annotated[
    list[str] | None, typer.Option("--tag", "-t", help="A tag for this version (repeat for more).", show_default=False)]
ParentOption = Annotated[
    str | None, typer.Option("--parent", help="What it derives from: an id, a pointer, or id@version.",
                             show_default=False)]
ActorOption = Annotated[
    str | None, typer.Option("--actor", help="Who does this, for the pointer's history (default: user@host, or "
                                             "LQ_ACTOR).", show_default=False)]
ReasonOption = Annotated[
    str | None, typer.Option("--reason", help="Why, recorded in the pointer's history (needed with --force).",
                             show_default=False)]
ForceOption = Annotated[bool, typer.Option("--force", help="Move even a protected pointer (needs --reason).")]


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
    # One JSON document: the version's metadata, then its resources. model_dump_json masks secrets
    # (api keys print as **********).
    console.print_json(update.model_dump_json(
        include={"message", "author", "tags", "parent_id", "parent_version", "resources"}))


@app.command("add")
def add(
    ctx: typer.Context,
    resources: ResourcesArgument = None,
    file: FileOption = None,
    resources_id: Annotated[str | None, typer.Option("--id", help="Choose the id (default: generated).")] = None,
    message: MessageOption = None,
    author: AuthorOption = None,
    tag: TagOption = None,
    parent: ParentOption = None,
) -> None:
    """Store a new snapshot; it becomes the latest."""
    registry = cli_context(ctx).registry()
    _show_snapshot(registry.add_resources(_read_json(resources, file, "resources"), resources_id, message=message,
                                          author=author, tags=tag, parent=parent))


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
    message: MessageOption = None,
    author: AuthorOption = None,
    tag: TagOption = None,
    parent: ParentOption = None,
) -> None:
    """Store a new version under an existing id; it becomes the latest (its parent: the version replaced)."""
    registry = cli_context(ctx).registry()
    _show_snapshot(registry.update_resources(resources_id, _read_json(resources, file, "resources"), expected_version,
                                             message=message, author=author, tags=tag, parent=parent))


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
    messages = any(s.message for s in snapshots)  # the column only when there is something to show
    shown = Listing("resources_id", "version", "updated", "resources", "pointers", *(["message"] if messages else []),
                    wrap=["updated", "resources", "pointers", "message"])
    for s in snapshots:
        kinds = ", ".join(f"{n}: {r.resource_type}" for n, r in s.resources.items())
        pointed = ", ".join(naming.get(s.resources_id, []))
        shown.add_row(s.resources_id, str(s.version), when(s.update_time), kinds, pointed,
                      *([escape(s.message)] if messages else []))
    console.print(shown)


@app.command("versions")
def versions(
    ctx: typer.Context,
    resources_id: Annotated[str, typer.Argument(help="A snapshot id or a pointer name.")],
    limit: Annotated[int, typer.Option(min=1, help="Versions to show.")] = 20,
) -> None:
    """A snapshot's versions, newest first: when, who, from what, tags and message."""
    shown = Listing("version", "updated", "author", "parent", "tags", "message",
                    wrap=["updated", "author", "tags", "message"])
    for v in cli_context(ctx).registry().versions(resources_id, limit):
        parent = f"{v.parent_id}@{v.parent_version}" if v.parent_id else ""
        shown.add_row(str(v.version), when(v.update_time), escape(v.author or ""), parent, escape(", ".join(v.tags)),
                      escape(v.message))
    console.print(shown)


@app.command("diff")
def diff(
    ctx: typer.Context,
    a: Annotated[str, typer.Argument(help="id, pointer, id@N or pointer@N.")],
    b: Annotated[str | None, typer.Argument(help="The same; default: the version before A.", show_default=False)]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the diff as JSON.")] = False,
) -> None:
    """What changed from A to B, per resource and field; templates as a unified diff (secrets masked)."""
    result = cli_context(ctx).registry().diff(a, b)
    if as_json:
        console.print_json(result.model_dump_json(exclude={"changes": {"__all__": {"segments"}}}))
        return
    console.print(f"{result.left} -> {result.right}", markup=False, highlight=False)
    if not result.changes:
        console.print("no difference", highlight=False)
        return
    for resource, changes in result.by_resource().items():
        console.print(f"[bold]{escape(resource)}[/]", highlight=False)
        for c in changes:
            if c.unified and not c.secret:
                console.print(f"  {c.path}: changed", markup=False, highlight=False)
                for line in c.unified.splitlines():
                    style = "green" if line.startswith("+") else "red" if line.startswith("-") else None
                    console.print(f"    {line}", style=style, markup=False, highlight=False)
            elif c.kind == "changed":
                console.print(f"  {c.path}: {json.dumps(c.old)} -> {json.dumps(c.new)}", markup=False,
                              highlight=False)
            else:
                value = c.new if c.kind == "added" else c.old
                console.print(f"  {c.path}: {c.kind} {json.dumps(value)}", markup=False, highlight=False)


@app.command("pointer")
def pointer(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The pointer: prod, canary...")],
    target: Annotated[str, typer.Argument(help="A snapshot id, or another pointer (its current target is copied).")],
    actor: ActorOption = None,
    reason: ReasonOption = None,
    force: ForceOption = False,
) -> None:
    """Point NAME at TARGET (recorded in the pointer's history; a protected pointer needs --force --reason)."""
    registry = cli_context(ctx).registry()
    old = registry.get_pointer(name)
    # Compare-and-set on what we read, so the old -> new printed is exactly the move made.
    new = registry.set_pointer(name, target, expected=old, by=actor, reason=reason, force=force)
    console.print(f"{name}: {old or '(unset)'} -> {new}")


@app.command("pointers")
def pointers(ctx: typer.Context) -> None:
    """List the pointers and the snapshot each names."""
    registry = cli_context(ctx).registry()
    named = registry.pointers()
    versions = registry.current_versions(sorted(named))
    protections = registry.protections()
    shown = Listing("pointer", "resources_id", "version", "protected", wrap=["protected"])
    for name in sorted(named):
        current = versions.get(name)
        protection = protections.get(name)
        shown.add_row(name, named[name], str(current[1]) if current else "",
                      escape(f"yes: {protection.reason} ({protection.by})") if protection else "")
    console.print(shown)


@app.command("protect")
def protect(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The pointer to protect (e.g. prod).")],
    reason: Annotated[str, typer.Option("--reason", help="Why it is protected.")],
    actor: ActorOption = None,
) -> None:
    """Protect a pointer: moving it then needs --force and --reason, and its snapshot cannot be deleted."""
    protection = cli_context(ctx).registry().protect_pointer(name, reason, by=actor)
    console.print(f"{name}: protected ({protection.reason})", markup=False, highlight=False)


@app.command("unprotect")
def unprotect(ctx: typer.Context, name: Annotated[str, typer.Argument(help="The pointer.")]) -> None:
    """Lift a pointer's protection."""
    lifted = cli_context(ctx).registry().unprotect_pointer(name)
    console.print(f"{name}: " + ("no longer protected" if lifted else "was not protected"), markup=False,
                  highlight=False)


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
    shown = Listing("from", "to", "when", "by", "op", "reason", wrap=["when", "by", "op", "reason"])
    for m in moves:
        shown.add_row(m.from_id or "(unset)", m.to_id or "(unset)", when(m.time), escape(m.by), escape(m.op),
                      escape(m.reason))
    console.print(shown)


@app.command("rollback")
def rollback(
    ctx: typer.Context,
    pointer: Annotated[str, typer.Argument(help="The pointer.")] = "latest",
    actor: ActorOption = None,
    reason: ReasonOption = None,
    force: ForceOption = False,
) -> None:
    """Move a pointer back to its previous target (a second rollback undoes the first; a protected pointer
    needs --force --reason)."""
    move = cli_context(ctx).registry().rollback(pointer, by=actor, reason=reason, force=force)
    console.print(f"{pointer}: {move.from_id or '(unset)'} -> {move.to_id}")


@app.command("delete")
def delete(
    ctx: typer.Context,
    resources_id: Annotated[str, typer.Argument(help="The snapshot to delete, with all its versions.")],
    force: Annotated[
        bool,
        typer.Option("--force", help="Delete even if in use: pointers naming it are unset, rollouts using it fail."),
    ] = False,
    actor: ActorOption = None,
) -> None:
    """Delete a snapshot and all its versions; refused while pointers or queued/running rollouts use it (and,
    even with --force, while a protected pointer names it)."""
    registry = cli_context(ctx).registry()
    report = registry.delete_resources(resources_id, force=force, by=actor)
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
