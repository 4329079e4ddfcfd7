"""``lightning-queue status``: a live view of the fleet, read from Redis (and a Celery ping)."""

import time
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from lightning_queue.ops.cli.context import cli_context
from lightning_queue.ops.cli.output import Listing, console, when

if TYPE_CHECKING:
    from rich.console import Group

    from lightning_queue.client import LightningClient

app = typer.Typer()

QueuesOption = Annotated[
    str | None, typer.Option("--queues", help="Comma-separated queues to show (default: LQ_QUEUE).")
]


def watched_queues(spec: str | None, default: str) -> list[str]:
    """The queues named in a ``--queues`` value, or ``default``."""
    return [q.strip() for q in spec.split(",") if q.strip()] if spec else [default]


def _ping(client: "LightningClient", timeout: float) -> dict[str, bool] | None:
    """Each worker node that answered a Celery ping within ``timeout`` (None: the ping itself failed)."""
    try:
        replies = client.celery.control.ping(timeout=timeout)
    except Exception:  # noqa: BLE001 - the broker may be unreachable: the frame shows it, not a traceback
        return None
    return {node: True for reply in replies for node in reply}


def _frame(client: "LightningClient", queues: list[str], ping: float | None, max_snapshots: int) -> "Group":
    """One frame: workers, queues, rollouts per status and per snapshot."""
    from rich.console import Group

    from lightning_queue.core.errors import redacted_url
    from lightning_queue.ops.monitoring import FleetCache, node_of, read_overview, worker_liveness

    overview = read_overview(client, queues, max_snapshots)
    stats = client.cache_stats()
    pinged = _ping(client, ping) if ping is not None else None
    liveness = worker_liveness(client)
    nodes: dict[str, dict[str, dict[str, Any]]] = {}
    for process, s in stats.items():
        nodes.setdefault(node_of(process), {})[process] = s
    for node in pinged or {}:
        nodes.setdefault(node, {})
    wordy = ("cache hit ratio", "snapshot loads", "mean load ms", "cache MB")
    workers = Listing("worker", "processes", "ping", "consuming", *wordy, wrap=wordy, title="workers")
    for node, processes in sorted(nodes.items()):
        node_cache = FleetCache.of(processes)
        ping_text = "-" if ping is None else "ping failed" if pinged is None else (
            "pong" if node in pinged else "[red]no reply[/]")
        workers.add_row(node, str(node_cache.processes), ping_text, liveness.get(node, "-"),
                        f"{node_cache.hit_ratio:.1%}" if processes else "-", str(node_cache.loads),
                        f"{1000 * node_cache.mean_load_seconds:.2f}",
                        f"{sum(s.get('bytes', 0) for s in processes.values()) / 1e6:.2f}")
    if not nodes:
        workers.caption = "no worker answered the ping or reported cache stats"
    queue_table = Listing("queue", "waiting", "by priority", wrap=["by priority"], title="queues")
    for queue, steps in overview.queue_depth.items():
        by_priority = " ".join(f"p{step}:{n}" for step, n in steps.items() if n)
        queue_table.add_row(queue, str(sum(steps.values())), by_priority)
    status_table = Listing(*overview.rollouts_by_status, title="rollouts")
    status_table.add_row(*(str(n) for n in overview.rollouts_by_status.values()))
    snapshot_table = Listing("resources_id", "pointers", "rollouts", wrap=["pointers"],
                             title=f"snapshots ({len(overview.rollouts_by_resources)} of {overview.snapshots})")
    for rid, n in overview.rollouts_by_resources.items():
        snapshot_table.add_row(rid, ", ".join(overview.pointers_naming(rid)), str(n))
    header = (f"[bold]lightning-queue[/] {escape(redacted_url(client.settings.redis_url))} "
              f"prefix {escape(client.keys.prefix)}  {when(overview.time)}  "
              f"{len(nodes)} worker(s), fleet cache hit ratio {FleetCache.of(stats).hit_ratio:.1%}, "
              f"{overview.unacked} message(s) held by workers")
    return Group(header, workers, queue_table, status_table, snapshot_table)


@app.command()
def status(
    ctx: typer.Context,
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between refreshes.")] = 2.0,
    once: Annotated[bool, typer.Option("--once", help="Print one frame and exit.")] = False,
    queues: QueuesOption = None,
    ping: Annotated[bool, typer.Option("--ping/--no-ping", help="Ping the workers through Celery each frame.")] = True,
    ping_timeout: Annotated[float, typer.Option(min=0.1, help="Seconds to wait for ping replies.")] = 1.0,
    snapshots: Annotated[
        int, typer.Option(min=1, help="Newest snapshots to show (pointer targets always are).")
    ] = 10,
) -> None:
    """A live view of the fleet: workers, queue depth, rollouts per status and per snapshot."""
    import redis
    from rich.live import Live

    from lightning_queue.core.errors import redacted_url

    context = cli_context(ctx)
    client = context.client()
    watched = watched_queues(queues, context.settings.queue)

    def frame() -> "Group":
        return _frame(client, watched, ping_timeout if ping else None, snapshots)

    if once:
        console.print(frame())
        return
    with Live(frame(), console=console, auto_refresh=False) as live:
        try:
            while True:
                time.sleep(interval)
                try:
                    live.update(frame(), refresh=True)
                except redis.RedisError as exc:  # keep watching: Redis may come back
                    url = redacted_url(context.settings.redis_url)  # never show the password
                    live.update(f"[red]cannot read Redis at {escape(url)}: {escape(str(exc))}[/]", refresh=True)
        except KeyboardInterrupt:
            pass
