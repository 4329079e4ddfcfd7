"""``lightning-queue exporter``: serve Prometheus metrics until stopped."""

import signal
import threading
from typing import Annotated

import typer

from lightning_queue.ops.cli.context import cli_context
from lightning_queue.ops.cli.output import err
from lightning_queue.ops.cli.status import QueuesOption, watched_queues

app = typer.Typer()


@app.command()
def exporter(
    ctx: typer.Context,
    port: Annotated[int, typer.Option(help="Port of the /metrics endpoint.")] = 9808,
    address: Annotated[
        str,
        typer.Option(help="Address to listen on. The endpoint has no authentication: loopback by default; listen "
                     "wider (0.0.0.0) only inside a container or behind a firewall, proxy or NetworkPolicy."),
    ] = "127.0.0.1",
    queues: QueuesOption = None,
    snapshots: Annotated[
        int, typer.Option(min=1, help="Newest snapshots to count rollouts of (pointer targets always).")
    ] = 50,
) -> None:
    """Serve Prometheus metrics (rollouts per status and snapshot, queue depth, worker caches) until stopped."""
    from lightning_queue.ops.monitoring import Exporter

    context = cli_context(ctx)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with Exporter(context.client(), port, address, watched_queues(queues, context.settings.queue), snapshots) as served:
        err.print(f"serving metrics on http://{address}:{served.port}/metrics (prefix {context.settings.key_prefix})")
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
