"""``lightning-queue demo``: prompt search on real workers, end to end.

Uses the Redis named by the settings (default 127.0.0.1:6379); when none
answers, starts an embedded one. Starts worker processes running the demo's
agent (:mod:`lightning_queue.ops.demo.agent`), runs its prompt search
(:mod:`lightning_queue.ops.demo.search`), prints what ran where, and removes
its keys afterwards (they live under a fresh prefix).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from lightning_queue.client import LightningClient
from lightning_queue.core.errors import redacted_url
from lightning_queue.core.settings import Settings
from lightning_queue.ops.demo.datasets import arithmetic
from lightning_queue.ops.demo.search import CANDIDATES, prompt_search
from lightning_queue.ops.embedded import EmbeddedRedis, ensure_redis
from lightning_queue.ops.fleet import LocalFleet

DEMO_AGENT = "lightning_queue.ops.demo.agent:agent"



@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (what ``timeout``, CI cancels and ``kill`` send) ends the demo as Ctrl-C does: a
    KeyboardInterrupt, so every ``finally`` below runs (workers stopped, keys deleted, an embedded
    Redis stopped). A second SIGTERM is ignored while that cleanup runs. Only in the main thread
    (signal handlers can be set nowhere else); the previous handler is restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_demo(settings: Settings, workers: int = 2, concurrency: int = 2, keep: bool = False,
             console: Console | None = None) -> dict[str, Any]:
    """Run the demo; stopped by Ctrl-C or SIGTERM alike, it leaves nothing behind."""
    with _terminate_as_interrupt():
        return _run_demo(settings, workers, concurrency, keep, console or Console())


def _run_demo(settings: Settings, workers: int, concurrency: int, keep: bool, console: Console) -> dict[str, Any]:
    started = time.monotonic()
    url, embedded = ensure_redis(settings.redis_url)
    try:
        return _run_on(url, embedded, settings, workers, concurrency, keep, console, started)
    finally:
        if embedded:
            embedded.stop()


def _run_on(url: str, embedded: EmbeddedRedis | None, settings: Settings, workers: int, concurrency: int, keep: bool,
            console: Console, started: float) -> dict[str, Any]:
    if embedded:
        console.print(f"[yellow]No Redis at {redacted_url(settings.redis_url)}[/]: started an embedded "
                      f"{embedded.kind} at {url}")
    else:
        console.print(f"Using Redis at {redacted_url(url)}")
    prefix = f"lq-demo-{uuid.uuid4().hex[:8]}"
    demo_settings = settings.model_copy(update={"redis_url": url, "key_prefix": prefix, "queue": f"{prefix}-rollouts"})

    client = LightningClient(demo_settings)
    fleet = LocalFleet(demo_settings, DEMO_AGENT, count=workers, concurrency=concurrency)
    try:
        with console.status(f"starting {workers} worker processes ({concurrency} pool processes each)..."):
            fleet.start(timeout=120)
        console.print(f"{workers} workers ready: {', '.join(w.name for w in fleet.workers)}")
        train, val = arithmetic("train"), arithmetic("val")
        total = len(train) * len(CANDIDATES) + len(val)
        with Progress(TextColumn("rollouts"), BarColumn(), MofNCompleteColumn(), console=console) as bar:
            task = bar.add_task("rollouts", total=total)
            report = prompt_search(client, train, val, on_finished=lambda _: bar.advance(task))

        # The id names the candidate (prompt-<candidate>-<run>) and is never cut, so it can be copied
        # into `lightning-queue resources get`; the columns of several words wrap to leave it room
        # at 80 columns.
        table = Table(title="Prompt search: one snapshot per candidate prompt, run side by side",
                      box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        for column in ("resources_id", "rollouts"):
            table.add_column(column, no_wrap=True)
        for column in ("mean reward", "workers", ""):
            table.add_column(column, overflow="fold")
        short_names = {w.hostname: w.name.split("-")[0] for w in fleet.workers}  # w1-<prefix>@host -> w1
        for score in report.scores:
            workers_used: Counter[str] = Counter()
            for r in score.rollouts:
                attempt = client.get_attempts(r.rollout_id)[-1]
                workers_used[short_names.get(attempt.worker_id, attempt.worker_id)] += 1
            promoted = "[bold green]promoted -> latest[/]" if score is report.promoted else ""
            ran_on = " ".join(f"{w}:{n}" for w, n in sorted(workers_used.items()))
            failed = f", {score.summary.failed} failed" if score.summary.failed else ""
            table.add_row(score.resources_id, f"{len(score.rollouts)}{failed}", f"{score.summary.mean_reward:.3f}",
                          ran_on, promoted)
        console.print(table)
        ran_with = Counter(client.get_attempts(r.rollout_id)[-1].resources_id for r in report.validation)
        console.print(
            f"Validation: {len(report.validation)} unpinned rollouts followed latest and ran with "
            + ", ".join(f"{rid} ({n})" for rid, n in ran_with.items())
            + f"; mean reward {report.validation_summary.mean_reward:.3f}"
        )
        elapsed = time.monotonic() - started
        console.print(f"[bold]Done in {elapsed:.1f} s.[/] Promoted {report.promoted.name!r} "
                      f"({report.promoted.resources_id}, version {report.promoted_version}).")
        return {"promoted": report.promoted.name, "seconds": elapsed,
                "validation_mean": report.validation_summary.mean_reward}
    except BaseException:
        if fleet.workers:
            console.print("[red]worker logs:[/]\n" + fleet.logs()[-6000:])
        raise
    finally:
        fleet.close()
        if not keep:
            _delete_prefix(client, prefix)
        else:
            console.print(f"keys kept under prefix {prefix!r} (LQ_KEY_PREFIX={prefix} to inspect with the CLI)")
        client.close()


def _delete_prefix(client: LightningClient, prefix: str) -> None:
    keys = list(client.redis.scan_iter(match=f"{prefix}:*", count=1000))
    for i in range(0, len(keys), 500):
        client.redis.delete(*keys[i : i + 500])
