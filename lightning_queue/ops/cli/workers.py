"""``lightning-queue workers``: each worker's consumption health and each worker process's snapshot cache."""

import time

import typer
from rich.markup import escape

from lightning_queue.ops.cli.context import cli_context
from lightning_queue.ops.cli.output import Listing, console, err

app = typer.Typer()


@app.command()
def workers(ctx: typer.Context) -> None:
    """Show each live worker's consumption health (stalled or not) and each worker process's
    snapshot cache. Exits with status 1 when a worker is stalled (alive but not consuming)."""
    client = cli_context(ctx).client()
    health = client.worker_health()
    stats = client.cache_stats()
    now = time.time()
    if health:
        shown = Listing("worker", "state", "active", "queued", "last message", "consuming",
                        wrap=["queued", "last message", "consuming"])
        for h in health:
            last = "never" if h.last_received is None else f"{now - h.last_received:.0f} s ago"
            queued = ", ".join(f"{q}: {n}" for q, n in h.queued.items())
            shown.add_row(h.hostname, "[bold red]STALLED[/]" if h.stalled else "ok", f"{h.active}/{h.concurrency}",
                          escape(queued), last, escape(", ".join(h.consuming) or "(nothing)"))
        console.print(shown)
        for h in health:
            if h.stalled:
                err.print(f"[bold red]stalled:[/] {escape(h.hostname)}: {escape(h.reason or '')}", soft_wrap=True,
                          highlight=False)
    else:
        console.print("no worker has reported its health (workers do every LQ_WATCHDOG_INTERVAL seconds)")
    if not stats:
        console.print("no worker process has reported cache stats (they do every LQ_CACHE_STATS_INTERVAL_SECONDS)")
    else:
        shown = Listing("worker process", "hits", "misses", "hit ratio", "entries", "MB", "evictions", "mean load ms",
                        wrap=["hit ratio", "mean load ms"])
        for process, s in stats.items():
            shown.add_row(process, str(s["hits"]), str(s["misses"]), f"{s['hit_ratio']:.1%}", str(s["entries"]),
                          f"{s['bytes'] / 1e6:.2f}", str(s["evictions"]), f"{s['mean_load_ms']:.2f}")
        hits, misses = sum(s["hits"] for s in stats.values()), sum(s["misses"] for s in stats.values())
        console.print(shown)
        console.print(f"fleet: {len(stats)} process(es), hit ratio {hits / max(1, hits + misses):.1%}")
    if any(h.stalled for h in health):
        raise typer.Exit(1)
