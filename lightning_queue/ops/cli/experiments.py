"""``lightning-queue experiments``: A/B experiments between snapshots: create, start, stop, report, promote.

Rollouts are fed into a running experiment with ``lightning-queue rollouts submit --experiment NAME``.
"""

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from lightning_queue.ops.cli.context import cli_context
from lightning_queue.ops.cli.output import Listing, console, when

if TYPE_CHECKING:
    from lightning_queue.experiments.manager import Experiments

app = typer.Typer(
    help="A/B experiments between snapshots: create, start, stop, report, promote. Feed one with "
         "`lightning-queue rollouts submit --experiment NAME ...`.",
    no_args_is_help=True,
)


def _experiments(ctx: typer.Context) -> "Experiments":
    from lightning_queue.experiments.manager import Experiments

    return Experiments(cli_context(ctx).client())


def _parse_variant(spec: str) -> dict[str, Any]:
    from lightning_queue.core.errors import ConfigurationError

    name, sep, rest = spec.partition("=")
    ref, _, weight = rest.partition(":")  # ids and pointer names never hold ':'
    if not sep or not name or not ref:
        raise ConfigurationError(f"--variant {spec!r}: write NAME=RESOURCES or NAME=RESOURCES:WEIGHT, e.g. "
                                 "control=prod or treatment=rs-new:0.2")
    try:
        return {"name": name, "resources_id": ref, "weight": float(weight) if weight else 1.0}
    except ValueError:
        raise ConfigurationError(f"--variant {spec!r}: the weight {weight!r} is not a number") from None


@app.command("create")
def create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The experiment's name.")],
    variant: Annotated[
        list[str],
        typer.Option("--variant", "-v",
                     help="NAME=RESOURCES[:WEIGHT] (an id or pointer); repeat it; the first is the control."),
    ],
    unit_key: Annotated[
        str, typer.Option(help="What is assigned: input.<field>, metadata.<field>, or the whole input.")
    ] = "input",
    salt: Annotated[str | None, typer.Option(help="Hash salt (default: the name).")] = None,
    coverage: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of units in the experiment.")] = 1.0,
    fallback: Annotated[
        str | None, typer.Option(help="Snapshot for units outside coverage (default: the control's).")
    ] = None,
    paired: Annotated[
        bool, typer.Option("--paired", help="Run every input under every variant (paired comparison).")
    ] = False,
    description: Annotated[str, typer.Option(help="What the experiment tests.")] = "",
) -> None:
    """Create an experiment (a draft: start it to route rollouts)."""
    from lightning_queue.experiments.manager import parse_experiment

    spec = {"name": name, "variants": [_parse_variant(v) for v in variant], "unit_key": unit_key,
            "salt": salt or "", "coverage": coverage, "fallback": fallback, "paired": paired,
            "description": description}
    exp = _experiments(ctx).create(parse_experiment(spec))
    console.print(f"created {exp.name} (draft): " + ", ".join(f"{v.name}={v.resources_id}:{v.weight:g}"
                                                               for v in exp.variants))


@app.command("start")
def start(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The experiment.")],
    rebucket: Annotated[bool, typer.Option("--rebucket", help="New bucket version: assign every unit afresh.")] = False,
) -> None:
    """Start (or restart) routing rollouts through an experiment."""
    exp = _experiments(ctx).start(name, rebucket=rebucket)
    console.print(f"{exp.name}: running (bucket version {exp.bucket_version})")


@app.command("stop")
def stop(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The experiment.")],
    reason: Annotated[str, typer.Option(help="Recorded with the stop.")] = "stopped by hand",
) -> None:
    """Stop routing; enqueued rollouts still count in the report."""
    exp = _experiments(ctx).stop(name, reason)
    console.print(f"{exp.name}: stopped ({exp.stop_reason})")


@app.command("status")
def status(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="One experiment (default: list them all).")] = None,
) -> None:
    """List experiments, or show one's definition and state."""
    experiments = _experiments(ctx)
    if name is not None:
        console.print_json(experiments.get(name).model_dump_json())
        return
    shown = Listing("name", "status", "variants", "unit", "coverage", "bucket v", "created", "note",
                    wrap=["unit", "bucket v", "created", "note"])
    for e in experiments.all():
        variants = "\n".join(f"{v.name}={v.resources_id}" + ("" if e.paired else f":{v.weight:g}") for v in e.variants)
        shown.add_row(e.name, e.status, variants, "paired" if e.paired else e.unit_key, f"{e.coverage:.0%}",
                      str(e.bucket_version), when(e.create_time), e.stop_reason or "")
    console.print(shown)


@app.command("report")
def report(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The experiment.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    chart: Annotated[
        Path | None, typer.Option("--chart", dir_okay=False, help="Write a PNG of the rewards here.")
    ] = None,
    alpha: Annotated[float, typer.Option(min=0.0001, max=0.5, help="Significance level.")] = 0.05,
    min_sample: Annotated[
        int, typer.Option(min=2, help="Rewards per variant (pairs, if paired) before any verdict.")
    ] = 30,
) -> None:
    """Per-variant metrics and each treatment against the control."""
    result = _experiments(ctx).report(name, alpha=alpha, min_sample=min_sample)
    if chart is not None:
        result.save_chart(chart)
    if as_json:
        print(result.to_json())
        return
    for shown in result.tables():
        console.print(shown)
    if chart is not None:
        console.print(f"chart written to {chart}")


@app.command("promote")
def promote(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The experiment.")],
    variant: Annotated[str | None, typer.Option(help="The variant to promote (default: the report's winner).")] = None,
    pointer: Annotated[str, typer.Option(help="The pointer to move to it.")] = "latest",
    actor: Annotated[str | None, typer.Option("--actor", help="Who promotes, for the pointer's history (default: "
                                              "user@host, or LQ_ACTOR).", show_default=False)] = None,
    reason: Annotated[str | None, typer.Option("--reason", help="Why (needed with --force).",
                                               show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Move even a protected pointer (needs --reason).")] = False,
) -> None:
    """Move a pointer to the winning variant's snapshot and stop the experiment, in one atomic step."""
    done = _experiments(ctx).promote(name, variant, pointer, by=actor, force=force, reason=reason)
    console.print(f"{pointer}: {done.from_id or '(unset)'} -> {done.to_id} ({done.winner}); {name} stopped")


@app.command("usage")
def usage(ctx: typer.Context, name: Annotated[str, typer.Argument(help="The experiment.")]) -> None:
    """What each variant of an experiment cost: attempts, LLM calls, tokens and cost."""
    from lightning_queue.ops.cli.usage import show_usage

    show_usage(f"experiment {name}", "variant", cli_context(ctx).client().usage_by_variant(name))
