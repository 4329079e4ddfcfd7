"""Fault injection: run N rollouts over W workers while killing workers and restarting Redis.

    python benchmarks/fault_injection.py --rollouts 200 --workers 3 --duration 60

Starts its own ``redis-server`` with an append-only file in a temporary directory (or uses
``--redis-url``, where it cannot restart Redis and only kills workers), starts W workers with
:class:`lightning_queue.ops.fleet.LocalFleet`, enqueues N rollouts of an agent that takes a while
(``--agent-seconds``), and for ``--duration`` seconds, at random, kills a worker with SIGKILL (its
main process and pool, as a vanished machine) and starts a replacement, and restarts Redis. Then it
waits for every rollout and prints: rollouts submitted, finished (by status), lost (never
finished), duplicated results (rollouts with more than one succeeded attempt, or succeeded with
none), attempts per rollout. Exits 1 when anything was lost or duplicated.

Uses only the public API and ``lightning_queue.ops.fleet``. Workers import this file as the module
``fault_injection`` for its agent.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis

from lightning_queue import (
    LightningClient,
    PromptTemplate,
    RolloutConfig,
    RolloutResult,
    Settings,
    rollout,
)
from lightning_queue.ops.embedded import free_port
from lightning_queue.ops.fleet import LocalFleet
from lightning_queue.storage.connections import ping

HERE = Path(__file__).resolve().parent


@rollout
def agent(task: dict, prompt: PromptTemplate) -> RolloutResult:
    """Takes ``task["seconds"]``, as a rollout of LLM calls would, then reports a reward."""
    time.sleep(task["seconds"])
    return RolloutResult(reward=1.0, output={"pid": os.getpid(), "prompt": prompt.template})


class OwnRedis:
    """A redis-server with an append-only file (``appendfsync`` as asked) in a temporary directory."""

    def __init__(self, appendfsync: str) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            sys.exit("no redis-server binary: install one, or pass --redis-url (workers are then killed, "
                     "Redis is not restarted)")
        self.dir = tempfile.TemporaryDirectory(prefix="lq-faults-")
        port = free_port()
        self.url = f"redis://127.0.0.1:{port}/0"
        self.argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", self.dir.name, "--save", "",
                     "--appendonly", "yes", "--appendfsync", appendfsync, "--loglevel", "warning"]
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not ping(self.url, timeout=0.2):
            if time.monotonic() > deadline:
                sys.exit("redis-server did not start")
            time.sleep(0.05)

    def stop(self, kill: bool = False) -> None:
        """SIGTERM: Redis flushes its append-only file and exits; ``kill``: SIGKILL, a crash, where
        only what ``appendfsync`` already wrote survives."""
        if self.process is not None and self.process.poll() is None:
            if kill:
                self.process.kill()
            else:
                self.process.terminate()
            self.process.wait(30)

    def close(self) -> None:
        self.stop()
        self.dir.cleanup()


def progress(client: LightningClient, ids: list[str]) -> collections.Counter:
    try:
        return collections.Counter(r.status for r in client.get_rollouts(ids))
    except (redis.ConnectionError, redis.TimeoutError):
        return collections.Counter({"(Redis down)": 1})


def inject(args: argparse.Namespace, fleet: LocalFleet, own: OwnRedis | None, client: LightningClient,
           ids: list[str], rng: random.Random) -> collections.Counter:
    """Kill workers and restart Redis at random for ``args.duration`` seconds (or until all finish)."""
    faults: collections.Counter = collections.Counter()
    start = time.monotonic()
    next_kill = start + rng.expovariate(1 / args.kill_interval)
    next_restart = start + rng.expovariate(1 / args.restart_interval) if own else float("inf")
    while time.monotonic() - start < args.duration:
        now = time.monotonic()
        if now >= next_kill:
            victim = rng.choice([w for w in fleet.workers if w.alive])
            os.killpg(victim.process.pid, signal.SIGKILL)  # no chance to requeue anything
            victim.process.wait()
            faults["workers killed"] += 1
            fleet.add(1, timeout=120)
            next_kill = time.monotonic() + rng.expovariate(1 / args.kill_interval)
            print(f"  {now - start:6.1f} s  killed {victim.name}, started a replacement", flush=True)
        if own is not None and now >= next_restart:
            own.stop(kill=args.redis_signal == "KILL")
            time.sleep(rng.uniform(0.5, args.max_down))
            own.start()
            faults["Redis restarts"] += 1
            next_restart = time.monotonic() + rng.expovariate(1 / args.restart_interval)
            print(f"  {now - start:6.1f} s  restarted Redis", flush=True)
        counts = progress(client, ids)
        if sum(counts[s] for s in ("succeeded", "failed", "cancelled")) == len(ids):
            break
        time.sleep(0.2)
    return faults


def report(client: LightningClient, ids: list[str]) -> tuple[int, int]:
    rollouts = client.get_rollouts(ids)
    by_status = collections.Counter(r.status for r in rollouts)
    lost = [r.rollout_id for r in rollouts if not r.is_finished]
    histogram: collections.Counter = collections.Counter()
    attempt_statuses: collections.Counter = collections.Counter()
    duplicated = []
    for r in rollouts:
        attempts = client.get_attempts(r.rollout_id)
        histogram[len(attempts)] += 1
        attempt_statuses.update(a.status for a in attempts)
        successes = sum(a.status == "succeeded" for a in attempts)
        if successes > 1 or (r.status == "succeeded" and successes == 0):
            duplicated.append((r.rollout_id, [a.status for a in attempts]))
    print(f"rollouts submitted:   {len(ids)}")
    print(f"finished:             {sum(by_status[s] for s in ('succeeded', 'failed', 'cancelled'))} "
          f"({', '.join(f'{s} {n}' for s, n in sorted(by_status.items()))})")
    print(f"lost:                 {len(lost)}" + (f"  e.g. {lost[:5]}" if lost else ""))
    print(f"duplicated results:   {len(duplicated)}" + (f"  e.g. {duplicated[:3]}" if duplicated else ""))
    print("attempts per rollout: " + ", ".join(f"{n}: {c}" for n, c in sorted(histogram.items())))
    print("attempt outcomes:     " + ", ".join(f"{s} {n}" for s, n in sorted(attempt_statuses.items())))
    failed = [r for r in rollouts if r.status == "failed"][:3]
    for r in failed:
        print(f"  failed {r.rollout_id}: {r.error.type if r.error else '?'}: {r.error.message if r.error else ''}")
    return len(lost), len(duplicated)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rollouts", type=int, default=200)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of fault injection")
    parser.add_argument("--agent-seconds", type=float, nargs=2, default=(0.2, 1.0), metavar=("MIN", "MAX"),
                        help="how long each rollout takes, drawn uniformly")
    parser.add_argument("--kill-interval", type=float, default=8.0, help="mean seconds between worker kills")
    parser.add_argument("--restart-interval", type=float, default=20.0, help="mean seconds between Redis restarts")
    parser.add_argument("--max-down", type=float, default=3.0, help="longest Redis outage, seconds")
    parser.add_argument("--visibility-timeout", type=int, default=10,
                        help="seconds before a killed worker's message is redelivered (above the longest rollout)")
    parser.add_argument("--max-attempts", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the rollouts afterwards")
    parser.add_argument("--appendfsync", choices=["always", "everysec"], default="always")
    parser.add_argument("--redis-signal", choices=["TERM", "KILL"], default="TERM",
                        help="stop Redis gracefully (TERM) or crash it (KILL)")
    parser.add_argument("--redis-url", help="use this Redis (no restarts) instead of starting one")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    rng = random.Random(seed)

    own = None if args.redis_url else OwnRedis(args.appendfsync)
    if own is not None:
        own.start()
    url = args.redis_url or own.url  # type: ignore[union-attr]
    prefix = f"lqfaults-{uuid.uuid4().hex[:8]}"
    settings = Settings(redis_url=url, key_prefix=prefix, queue=f"{prefix}-q",
                        visibility_timeout=args.visibility_timeout)
    mode = (f"own, appendonly yes, appendfsync {args.appendfsync}, restarts by SIG{args.redis_signal}" if own
            else "given: no restarts")
    print(f"Redis {url} ({mode}), "
          f"prefix {prefix}, {args.workers} workers, {args.rollouts} rollouts of {args.agent_seconds[0]}-"
          f"{args.agent_seconds[1]} s, {args.duration:.0f} s of faults, seed {seed}", flush=True)
    fleet = LocalFleet(settings, "fault_injection:agent", count=args.workers, pythonpath=[str(HERE)])
    client = LightningClient(settings)
    started = time.monotonic()
    try:
        fleet.start(timeout=120)
        client.add_resources({"prompt": PromptTemplate(template="fault injection {x}")}, "rs-faults")
        lo, hi = args.agent_seconds
        queued = client.enqueue_rollouts([{"x": i, "seconds": rng.uniform(lo, hi)} for i in range(args.rollouts)],
                                         resources_id="rs-faults", config=RolloutConfig(max_attempts=args.max_attempts))
        ids = [r.rollout_id for r in queued]
        faults = inject(args, fleet, own, client, ids, rng)
        print(f"faults injected: {dict(faults) or 'none'}; waiting for the rest...", flush=True)
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            try:
                client.wait_for_rollouts(ids, timeout=max(1.0, deadline - time.monotonic()))
                break
            except (redis.ConnectionError, redis.TimeoutError):
                time.sleep(1)
        print(f"done in {time.monotonic() - started:.0f} s\n")
        lost, duplicated = report(client, ids)
    finally:
        fleet.close()
        client.close()
        if own is not None:
            own.close()
        else:
            cleanup = redis.Redis.from_url(url)
            for key in cleanup.scan_iter(match=f"{prefix}:*", count=1000):
                cleanup.delete(key)
    return 1 if lost or duplicated else 0


if __name__ == "__main__":
    sys.exit(main())
