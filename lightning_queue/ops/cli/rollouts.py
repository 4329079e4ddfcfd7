"""``lightning-queue rollouts``: submit (directly or through an experiment), follow, wait for and cancel rollouts."""

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer
from rich.markup import escape

from lightning_queue.ops.cli.context import cli_context
from lightning_queue.ops.cli.output import Listing, console, err, fail

if TYPE_CHECKING:
    from lightning_queue.client import LightningClient
    from lightning_queue.core.models import Rollout, RolloutMode

RESULTS_LIVE_IN_THE_STORE = (
    "Results live in the rollout store in Redis, not in a Celery result backend: the backend is off, "
    "so Celery's app.AsyncResult(id).get() raises NotImplementedError. Read a result with "
    "`lightning-queue rollouts status ID` or `rollouts wait ID...`, or in Python with "
    "LightningClient.get_rollout(id) and wait_for_rollouts(ids)."
)

app = typer.Typer(
    help=f"Submit rollouts and follow them to their results.\n\n{RESULTS_LIVE_IN_THE_STORE}",
    no_args_is_help=True,
)

WaitTimeout = Annotated[
    float | None, typer.Option("--wait-timeout", min=0, help="Give up waiting after this many seconds (exit 1).")
]


def _inputs(inputs: Sequence[str], file: Path | None) -> Iterator[Any]:
    from lightning_queue.core.errors import ConfigurationError

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


@app.command("submit")
def submit(
    ctx: typer.Context,
    inputs: Annotated[
        list[str] | None, typer.Argument(help="Task inputs, each JSON (a bare word is a string).", show_default=False)
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option("--file", "-f", exists=True, dir_okay=False, help="JSON lines, one input each."),
    ] = None,
    resources_id: Annotated[
        str | None,
        typer.Option("--resources-id", "-r",
                     help="A snapshot id or pointer name, pinned now (default: latest at run time)."),
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", help="Resolve the id or pointer when each rollout runs, not at submit time.")
    ] = False,
    experiment: Annotated[
        str | None,
        typer.Option("--experiment", "-e",
                     help="Enqueue through this running experiment: each input gets a variant by its unit and runs "
                          "with that variant's snapshot (instead of --resources-id)."),
    ] = None,
    mode: Annotated[str, typer.Option(help="train, val or test.")] = "train",
    max_attempts: Annotated[int, typer.Option(min=1, help="Attempts before a rollout fails.")] = 1,
    timeout: Annotated[float | None, typer.Option(help="Time limit of one attempt, seconds.")] = None,
    wait: Annotated[
        bool, typer.Option("--wait", "-w", help="Wait for them and show the results; exit 1 unless all succeed.")
    ] = False,
    wait_timeout: WaitTimeout = None,
) -> None:
    """Enqueue rollouts; prints their ids, one per line."""
    from lightning_queue.core.errors import ConfigurationError
    from lightning_queue.core.models import RolloutConfig

    items = list(_inputs(inputs or [], file))
    if not items:
        raise ConfigurationError("give at least one input, or --file")
    if experiment is not None and (resources_id is not None or follow):
        raise ConfigurationError(
            f"--experiment {experiment} chooses each input's snapshot (its variant's); drop --resources-id/--follow"
        )
    config = RolloutConfig(max_attempts=max_attempts, timeout_seconds=timeout)
    rollout_mode = cast("RolloutMode", mode)  # validated by the Rollout model
    client = cli_context(ctx).client()
    rollouts: Sequence[Rollout]
    if experiment is not None:
        from lightning_queue.experiments.manager import Experiments

        rollouts = Experiments(client).enqueue(experiment, items, mode=rollout_mode, config=config)
    else:
        rollouts = client.enqueue_rollouts(
            items, resources_id=resources_id, resolve="following" if follow else None, mode=rollout_mode,
            config=config,
        )
    for r in rollouts:
        console.print(r.rollout_id, highlight=False, soft_wrap=True)
    if wait:
        _wait(client, [r.rollout_id for r in rollouts], wait_timeout)


@app.command("wait")
def wait(
    ctx: typer.Context,
    rollout_ids: Annotated[list[str], typer.Argument(help="The rollouts to wait for.")],
    timeout: Annotated[float | None, typer.Option(min=0, help="Give up after this many seconds (exit 1).")] = None,
) -> None:
    """Wait for rollouts to finish and show them; exit 1 unless every one succeeded in time."""
    _wait(cli_context(ctx).client(), rollout_ids, timeout)


def _wait(client: "LightningClient", rollout_ids: Sequence[str], timeout: float | None) -> None:
    """Wait (a progress bar on a terminal's stderr), print the finished rollouts, and end the
    command with exit code 1 naming the rollouts that failed, were cancelled or did not finish."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    ids = list(dict.fromkeys(rollout_ids))
    columns = (TextColumn("rollouts"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, disable=not err.is_terminal) as bar:
        task = bar.add_task("wait", total=len(ids))
        finished = client.wait_for_rollouts(ids, timeout, on_finished=lambda _: bar.advance(task))
    show_rollouts(finished)
    unsuccessful = [r for r in finished if r.status != "succeeded"]
    done = {r.rollout_id for r in finished}
    unfinished = [rid for rid in ids if rid not in done]
    problems = []
    if unsuccessful:
        problems.append(f"{len(unsuccessful)} of {len(ids)} rollouts did not succeed: "
                        + _some(f"{r.rollout_id} ({r.status})" for r in unsuccessful))
    if unfinished:  # last, so the ids end the line and copy cleanly
        within = "in time" if timeout is None else f"within {timeout:g} s"
        problems.append(f"{len(unfinished)} of {len(ids)} did not finish {within} (they go on: wait again with "
                        f"`lightning-queue rollouts wait`): " + _some(unfinished))
    if problems:
        raise typer.Exit(fail("; ".join(problems)))


def _some(items: Iterator[str] | Sequence[str], shown: int = 5) -> str:
    items = list(items)
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


@app.command("status", help=f"Show a rollout, its result or error, and its attempts.\n\n{RESULTS_LIVE_IN_THE_STORE}")
def status(ctx: typer.Context, rollout_id: Annotated[str, typer.Argument(help="The rollout.")]) -> None:
    client = cli_context(ctx).client()
    rollout = client.get_rollout(rollout_id)
    attempts = client.get_attempts(rollout_id)
    console.print_json(rollout.model_dump_json())
    shown = Listing("#", "status", "worker", "resources_id", "version", "seconds", "error", wrap=["error"])
    for a in attempts:
        seconds = f"{a.end_time - a.start_time:.2f}" if a.end_time else ""
        error = f"{a.error.type}: {a.error.message}" if a.error else ""
        shown.add_row(str(a.sequence_id), a.status, a.worker_id, a.resources_id or "", str(a.resources_version or ""),
                      seconds, error)
    console.print(shown)


@app.command("list")
def list_(
    ctx: typer.Context,
    status: Annotated[
        str | None, typer.Option(help="queuing, preparing, running, requeuing, succeeded, failed or cancelled.")
    ] = None,
    mode: Annotated[str | None, typer.Option(help="train, val or test.")] = None,
    resources_id: Annotated[
        str | None, typer.Option("--resources-id", "-r", help="Pinned to, or ran with, this snapshot.")
    ] = None,
    worker_id: Annotated[str | None, typer.Option("--worker", help="Ran on this worker.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Rollouts to show.")] = 20,
    offset: Annotated[int, typer.Option(min=0, help="Newest matches to skip.")] = 0,
) -> None:
    """List rollouts, newest first, filtered (every id printed whole)."""
    show_rollouts(cli_context(ctx).client().query_rollouts(
        status=status, mode=mode, resources_id=resources_id, worker_id=worker_id, limit=limit, offset=offset))


@app.command("cancel")
def cancel(ctx: typer.Context, rollout_id: Annotated[str, typer.Argument(help="The rollout.")]) -> None:
    """Cancel a rollout that has not finished (a running one is stopped)."""
    console.print(f"{rollout_id}: {cli_context(ctx).client().cancel_rollout(rollout_id)}")


@app.command("trace")
def trace(
    ctx: typer.Context,
    rollout_id: Annotated[str, typer.Argument(help="The rollout.")],
    attempt_id: Annotated[
        str | None, typer.Option("--attempt", help="One attempt's id (default: every attempt).")
    ] = None,
) -> None:
    """Show a rollout's trace: each attempt's spans as a tree, with durations, tokens and cost."""
    from lightning_queue.ops.cli.usage import show_trace

    client = cli_context(ctx).client()
    spans = client.query_spans(rollout_id, attempt_id)
    attempts = client.get_attempts(rollout_id)
    if attempt_id is not None:
        attempts = [a for a in attempts if a.attempt_id == attempt_id]
    show_trace(rollout_id, spans, attempts)


@app.command("triplets")
def triplets(
    ctx: typer.Context,
    rollout_id: Annotated[str, typer.Argument(help="The rollout.")],
    attempt_id: Annotated[str | None, typer.Option("--attempt", help="One attempt's id (default: the last).")] = None,
) -> None:
    """Print one JSON line per LLM call of an attempt: prompt messages, response, reward (for RL trainers)."""
    for triplet in cli_context(ctx).client().get_triplets(rollout_id, attempt_id):
        console.print(triplet.model_dump_json(), highlight=False, soft_wrap=True, markup=False)


def show_rollouts(rollouts: "Sequence[Rollout]") -> None:
    """A table of rollouts, then one line per error (long text, kept out of the table so the
    ids keep their room at 80 columns; the whole error is in ``rollouts status``)."""
    shown = Listing("rollout_id", "status", "mode", "resources_id", "attempts", "reward")
    for r in rollouts:
        reward = "" if r.reward is None else f"{r.reward:g}"
        shown.add_row(r.rollout_id, r.status, r.mode or "", r.resources_id or "(latest)", str(r.attempt_count), reward)
    console.print(shown)
    for r in rollouts:
        if r.error is not None:
            message = f"{r.error.type}: {r.error.message}"
            if len(message) > _ERROR_SHOWN:
                message = message[: _ERROR_SHOWN - 1] + "…"
            console.print(f"{r.rollout_id}  {escape(message)}", highlight=False)


_ERROR_SHOWN = 160
