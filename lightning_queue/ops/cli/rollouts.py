"""``lightning-queue rollouts``: submit (directly or through an experiment), list, follow, wait for and cancel
rollouts (one by one or by filter), and read the finished ones from a cursor."""

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
    from lightning_queue.core.queries import RolloutFilter

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

EXIT_UNSUCCESSFUL = 1
"""A command that waited: something it waited for failed, was cancelled or is gone (also: any user error)."""
EXIT_TIMEOUT = 3
"""A command that waited: its time limit passed before everything finished, and nothing that finished failed.
(2 is click's exit code for a usage error.)"""

WaitTimeout = Annotated[
    float | None,
    typer.Option("--wait-timeout", min=0, help=f"Give up waiting after this many seconds (exit {EXIT_TIMEOUT})."),
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
        bool, typer.Option("--wait", "-w", help="Wait for them and show the results; exit 1 when any failed or was "
                                                "cancelled, 3 when the wait timed out.")
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
    timeout: Annotated[
        float | None, typer.Option(min=0, help=f"Give up after this many seconds (exit {EXIT_TIMEOUT}).")
    ] = None,
) -> None:
    """Wait for rollouts to finish and show them; exit 0 when every one succeeded, 1 when any failed or
    was cancelled, 3 when the time ran out first (and none that finished failed)."""
    _wait(cli_context(ctx).client(), rollout_ids, timeout)


def _wait(client: "LightningClient", rollout_ids: Sequence[str], timeout: float | None) -> None:
    """Wait (a progress bar on a terminal's stderr), print the finished rollouts, and end the
    command naming the rollouts that failed, were cancelled or did not finish: exit code
    :data:`EXIT_UNSUCCESSFUL` when any finished unsuccessfully, else :data:`EXIT_TIMEOUT` when
    some did not finish in time (a rollout whose record is gone raises: a user error, exit 1)."""
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
        fail("; ".join(problems))
        raise typer.Exit(EXIT_UNSUCCESSFUL if unsuccessful else EXIT_TIMEOUT)


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


Status = Annotated[
    list[str] | None,
    typer.Option("--status", "-s", help="queuing, preparing, running, requeuing, succeeded, failed or cancelled; "
                                        "repeat for several."),
]
Mode = Annotated[str | None, typer.Option(help="train, val or test.")]
ResourcesId = Annotated[str | None, typer.Option("--resources-id", "-r", help="Pinned to, or ran with, this snapshot.")]
Worker = Annotated[str | None, typer.Option("--worker", help="Ran on this worker.")]
Experiment = Annotated[str | None, typer.Option("--experiment", "-e", help="Enqueued through this experiment.")]
Variant = Annotated[str | None, typer.Option("--variant", help="With --experiment: under this variant.")]
Queue = Annotated[str | None, typer.Option("--queue", help="Sent to this queue.")]
Meta = Annotated[
    list[str] | None,
    typer.Option("--meta", help="key=value: a top-level metadata key equal to value (JSON when it parses); "
                                "repeat for several."),
]
OlderThan = Annotated[
    str | None, typer.Option("--older-than", help="Enqueued longer ago than this: 90s, 15m, 1h, 2d.")
]
NewerThan = Annotated[str | None, typer.Option("--newer-than", help="Enqueued within the last: 90s, 15m, 1h, 2d.")]
EndedWithin = Annotated[
    str | None, typer.Option("--ended-within", help="Finished within the last: 90s, 15m, 1h, 2d (finished only).")
]


def _filter(
    status: list[str] | None, mode: str | None, resources_id: str | None, worker_id: str | None,
    experiment: str | None, variant: str | None, queue: str | None, meta: list[str] | None,
    older_than: str | None, newer_than: str | None, ended_within: str | None, **order: Any,
) -> "RolloutFilter":
    """The options every filtering command shares, as one :class:`RolloutFilter`."""
    import time

    from lightning_queue.core.queries import RolloutFilter, parse_metadata

    now = time.time()
    return RolloutFilter(
        status=tuple(status) if status else None, mode=mode, resources_id=resources_id, worker_id=worker_id,
        experiment=experiment, variant=variant, queue=queue, metadata=parse_metadata(meta or []),
        enqueued_before=None if older_than is None else now - parse_duration(older_than),
        enqueued_after=None if newer_than is None else now - parse_duration(newer_than),
        ended_after=None if ended_within is None else now - parse_duration(ended_within), **order,
    )


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``90s``, ``15m``, ``1.5h``, ``2d`` (or bare seconds) as seconds."""
    from lightning_queue.core.errors import InvalidFilterError

    raw = text.strip().lower()
    unit = _UNITS.get(raw[-1:], None)
    number = raw[:-1] if unit is not None else raw
    try:
        seconds = float(number) * (unit or 1)
    except ValueError:
        raise InvalidFilterError(f"{text!r} is not a duration; write e.g. 90s, 15m, 1h or 2d") from None
    if not seconds >= 0 or seconds == float("inf"):
        raise InvalidFilterError(f"{text!r} is not a duration; write e.g. 90s, 15m, 1h or 2d")
    return seconds


@app.command("list")
def list_(
    ctx: typer.Context,
    status: Status = None,
    mode: Mode = None,
    resources_id: ResourcesId = None,
    worker_id: Worker = None,
    experiment: Experiment = None,
    variant: Variant = None,
    queue: Queue = None,
    meta: Meta = None,
    older_than: OlderThan = None,
    newer_than: NewerThan = None,
    ended_within: EndedWithin = None,
    by_end: Annotated[
        bool, typer.Option("--by-end", help="Sort by end time (finished rollouts only), not enqueue time.")
    ] = False,
    oldest_first: Annotated[bool, typer.Option("--oldest-first", help="Oldest first (default: newest).")] = False,
    limit: Annotated[int, typer.Option(min=1, help="Rollouts to show.")] = 20,
    offset: Annotated[int, typer.Option(min=0, help="Matches to skip.")] = 0,
) -> None:
    """List rollouts, newest enqueued first, filtered (every id printed whole)."""
    wanted = _filter(status, mode, resources_id, worker_id, experiment, variant, queue, meta, older_than, newer_than,
                     ended_within, order_by="end_time" if by_end else "enqueue_time", newest_first=not oldest_first)
    show_rollouts(cli_context(ctx).client().query_rollouts(wanted, limit=limit, offset=offset))


@app.command("cancel")
def cancel(
    ctx: typer.Context,
    rollout_ids: Annotated[
        list[str] | None, typer.Argument(help="Rollouts to cancel now (or give a filter instead).", show_default=False)
    ] = None,
    status: Status = None,
    mode: Mode = None,
    resources_id: ResourcesId = None,
    worker_id: Worker = None,
    experiment: Experiment = None,
    variant: Variant = None,
    queue: Queue = None,
    meta: Meta = None,
    older_than: OlderThan = None,
    newer_than: NewerThan = None,
    yes: Annotated[
        bool, typer.Option("--yes", "--no-dry-run", "-y", help="With a filter: cancel (default: only list).")
    ] = False,
) -> None:
    """Cancel rollouts that have not finished (running ones are stopped): the ids given, at once; or every
    unfinished rollout a filter matches, listed first (a dry run) and cancelled only with --yes.

    e.g. `rollouts cancel -s queuing --older-than 1h -e ab` lists experiment ab's stale queued rollouts."""
    from lightning_queue.core.errors import InvalidFilterError

    client = cli_context(ctx).client()
    given = (status, mode, resources_id, worker_id, experiment, variant, queue, meta, older_than, newer_than)
    if rollout_ids:
        if any(value for value in given):
            raise InvalidFilterError("give rollout ids or a filter, not both")
        for rid in rollout_ids:
            console.print(f"{rid}: {client.cancel_rollout(rid)}", highlight=False, soft_wrap=True)
        return
    if not any(value for value in given):
        raise InvalidFilterError("give rollout ids, or a filter (e.g. --status queuing --older-than 1h); "
                                 "cancelling everything needs at least --status")
    wanted = _filter(status, mode, resources_id, worker_id, experiment, variant, queue, meta, older_than, newer_than,
                     None)
    report = client.cancel_rollouts(wanted, dry_run=not yes)
    if report.dry_run:
        for rid in report.matched:
            console.print(rid, highlight=False, soft_wrap=True)
        err.print(f"dry run: {len(report.matched)} unfinished rollouts match; add --yes to cancel them",
                  highlight=False)
        return
    for rid in report.cancelled:
        console.print(rid, highlight=False, soft_wrap=True)
    err.print(f"cancelled {len(report.cancelled)}, already finished {len(report.already_finished)}, "
              f"not found {len(report.not_found)}", highlight=False)


@app.command("finished")
def finished(
    ctx: typer.Context,
    after: Annotated[
        str | None, typer.Option("--after", help="Start after this cursor (a stream entry id printed before).")
    ] = None,
    cursor_file: Annotated[
        Path | None,
        typer.Option("--cursor-file", dir_okay=False,
                     help="Resume after the cursor saved in this file, and save the cursor of each rollout printed."),
    ] = None,
    follow_seconds: Annotated[
        float, typer.Option("--follow", min=0, help="Go on waiting for more until none arrived this many seconds.")
    ] = 0.0,
    limit: Annotated[int, typer.Option(min=1, help="At most this many rollouts (without --follow).")] = 100,
    experiment: Experiment = None,
    variant: Variant = None,
    queue: Queue = None,
) -> None:
    """Print the rollouts that finished after a cursor, in the order they finished: one line each, the cursor,
    the rollout id and its status. A script that saves the last cursor resumes exactly after it."""
    from lightning_queue.core.queries import RolloutFilter

    client = cli_context(ctx).client()
    start = after
    if start is None and cursor_file is not None and cursor_file.exists():
        start = cursor_file.read_text().strip() or None
    wanted = RolloutFilter(experiment=experiment, variant=variant, queue=queue) \
        if experiment or queue else None
    if follow_seconds > 0:
        items = client.iter_finished_rollouts(start, idle_seconds=follow_seconds, filter=wanted)
    else:
        items = iter(client.finished_rollouts(start, limit=limit, filter=wanted).items)
    for item in items:
        console.print(f"{item.cursor}  {item.rollout_id}  {item.status}", highlight=False, soft_wrap=True)
        if cursor_file is not None:
            save_cursor(cursor_file, item.cursor)


def save_cursor(path: Path, cursor: str) -> None:
    """Write ``cursor`` to ``path`` atomically (a rename), so a crash leaves the old cursor or the new, never half."""
    import os

    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(cursor + "\n")
    os.replace(temporary, path)


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
