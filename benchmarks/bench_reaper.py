"""What one sweep of the reaper costs (the lost-message sweep every worker runs each sweep interval).

    python benchmarks/bench_reaper.py              # 100,000 finished rollouts, 1,000 queued, ~1 minute
    python benchmarks/bench_reaper.py --quick      # 10,000 and 200

Starts its own ``redis-server`` (free port, temp dir, no persistence; ``--redis-url`` uses a given one,
deleting only its own keys). Writes ``--finished`` finished rollouts (records and indexes, as the
store leaves them) and enqueues ``--queued`` rollouts with their task messages, no worker running; then
times :func:`lightning_queue.worker.recovery.reap` (one sweep, ``REAP_LIMIT`` entries at most) and
counts the Redis commands it ran (``INFO commandstats``, Lua-internal ones included), in the cases a
sweep meets:

1. nothing due (every sweep of a healthy fleet, most of the time);
2. every queued rollout due, its message in the queue (found: looked for again later);
3. the same, the messages deleted: first look (noted missing), then second look (sent again);
4. a backlog: the due rollouts are the oldest of a queue of ``--backlog`` messages;
5. nothing due, with that backlog;
6. the worst case: due rollouts whose messages are missing, behind that backlog (each look reads it all).

Prints one row per case: sweeps, entries looked at, milliseconds per sweep, Redis commands per sweep.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable

import redis

from lightning_queue import LightningClient, Rollout, Settings
from lightning_queue.broker.app import make_celery
from lightning_queue.ops.embedded import free_port
from lightning_queue.storage.connections import ping
from lightning_queue.worker import recovery
from lightning_queue.worker.context import WorkerContext


def own_redis() -> tuple[str, subprocess.Popen[bytes], tempfile.TemporaryDirectory[str]]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("no redis-server binary: install one, or pass --redis-url")
    directory = tempfile.TemporaryDirectory(prefix="lq-reaper-")
    port = free_port()
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", directory.name,
                                "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 20
    while not ping(url, timeout=0.2):
        if time.monotonic() > deadline:
            sys.exit("redis-server did not start")
        time.sleep(0.05)
    return url, process, directory


def commands(r: redis.Redis) -> int:
    return sum(int(v["calls"]) for k, v in r.info("commandstats").items() if k != "cmdstat_info")


def sweep(ctx: WorkerContext, r: redis.Redis) -> tuple[int, float, int]:
    """One reaper sweep: (entries looked at, seconds, Redis commands)."""
    before = commands(r)
    start = time.perf_counter()
    done = recovery.reap(ctx)
    elapsed = time.perf_counter() - start
    return done.looked, elapsed, commands(r) - before - 1  # the INFO that read the counts


def measure(name: str, ctx: WorkerContext, r: redis.Redis, rows: list[tuple[str, str]],
            prepare: Callable[[], None] = lambda: None) -> None:
    """Sweep until nothing more is due (at least once); one row for the sweeps that looked at something."""
    prepare()
    looked, seconds, sent = [], [], []
    while True:
        n, t, c = sweep(ctx, r)
        if n == 0 and looked:
            break
        looked.append(n)
        seconds.append(t)
        sent.append(c)
        if n == 0:
            break
    per = len(looked)
    rows.append((name, f"{per} sweep(s), {sum(looked)} entries looked at; {1000 * sum(seconds) / per:.1f} ms and "
                       f"{sum(sent) / per:,.0f} Redis commands per sweep"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--finished", type=int, default=100_000)
    parser.add_argument("--queued", type=int, default=1_000)
    parser.add_argument("--backlog", type=int, default=100_000)
    parser.add_argument("--quick", action="store_true", help="10,000 finished, 200 queued, a backlog of 10,000")
    parser.add_argument("--redis-url")
    args = parser.parse_args()
    logging.getLogger("lightning_queue.worker.recovery").setLevel(logging.ERROR)  # one warning per message re-sent
    if args.quick:
        args.finished, args.queued, args.backlog = 10_000, 200, 10_000
    process = directory = None
    url = args.redis_url
    if url is None:
        url, process, directory = own_redis()
    prefix = f"lqreaper-{uuid.uuid4().hex[:8]}"
    settings = Settings(redis_url=url, key_prefix=prefix, queue=f"{prefix}-q")
    client = LightningClient(settings)
    ctx = WorkerContext.create(settings, make_celery(settings))
    r, k = client.redis, client.keys
    rows: list[tuple[str, str]] = []
    try:
        started = time.monotonic()
        for first in range(0, args.finished, 5000):
            batch = [Rollout(input={"i": i}, status="succeeded", attempt_count=1)
                     for i in range(first, min(args.finished, first + 5000))]
            client.store.create_rollouts(batch)
            r.zrem(k.pending, *[b.rollout_id for b in batch])  # as the claim left them: finished, not pending
        queued = client.enqueue_rollouts([{"q": i} for i in range(args.queued)])
        print(f"{args.finished:,} finished rollouts and {args.queued:,} queued written in "
              f"{time.monotonic() - started:.0f} s; Redis used {r.info('memory')['used_memory_human']}")

        def all_due() -> None:
            r.zadd(k.pending, {q.rollout_id: 0 for q in queued})

        def deleted() -> None:
            r.delete(*k.celery_queues(settings.queue).values())
            all_due()

        sweep(ctx, r)  # loads the scripts
        measure("1. nothing due", ctx, r, rows)
        measure(f"2. {args.queued:,} due, messages in the queue", ctx, r, rows, all_due)
        measure(f"3a. {args.queued:,} due, messages deleted: first look", ctx, r, rows, deleted)
        measure("3b. the same, second look: sent again", ctx, r, rows, all_due)
        # 4: the queued rollouts' messages are back (3b sent them); behind them, a backlog.
        for first in range(0, args.backlog, 5000):
            client.enqueue_rollouts([{"b": i} for i in range(first, min(args.backlog, first + 5000))])
        measure(f"4. {args.queued:,} due, the oldest of a {args.backlog + args.queued:,}-message queue", ctx, r,
                rows, all_due)
        measure("5. nothing due, with that backlog", ctx, r, rows)
        # 6: the worst case: messages missing, so every look reads the whole backlog.
        unsent = [Rollout(input={"u": i}, queue=settings.queue) for i in range(min(args.queued, recovery.REAP_LIMIT))]
        client.store.create_rollouts(unsent)

        def unsent_due() -> None:
            r.zadd(k.pending, {u.rollout_id: 0 for u in unsent})

        measure(f"6. {len(unsent):,} due, never sent, behind that backlog: first look", ctx, r, rows, unsent_due)
    finally:
        ctx.close()
        client.close()
        if process is not None:
            process.terminate()
            process.wait()
            assert directory is not None
            directory.cleanup()
        else:
            cleanup = redis.Redis.from_url(url)
            for key in cleanup.scan_iter(match=f"{prefix}:*", count=1000):
                cleanup.delete(key)
    width = max(len(name) for name, _ in rows)
    print(f"\n{'case'.ljust(width)}  reaper sweep (REAP_LIMIT {recovery.REAP_LIMIT})")
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
