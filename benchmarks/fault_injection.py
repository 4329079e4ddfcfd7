"""Fault injection: run N rollouts over W workers while killing workers and taking Redis away.

    python benchmarks/fault_injection.py --rollouts 200 --workers 3 --duration 60
    python benchmarks/fault_injection.py --faults wipe --runs 3       # Redis restarted empty
    python benchmarks/fault_injection.py --faults outage --runs 3     # Redis down 40 s

Starts its own ``redis-server`` with an append-only file in a temporary directory (or uses
``--redis-url``, where it cannot touch Redis and only kills workers), starts W workers with
:class:`lightning_queue.ops.fleet.LocalFleet`, enqueues N rollouts of an agent that takes a while
(``--agent-seconds``) and reports the prompt it actually ran with, and for ``--duration`` seconds
injects the faults named by ``--faults``, at random (exponential gaps with the given means):

* ``kill``: SIGKILL a worker (its main process and pool, as a vanished machine), start a replacement;
* ``restart``: stop Redis (SIGTERM, or SIGKILL with ``--redis-signal KILL``), leave it down
  0.5-``--max-down`` s, start it again from its append-only file;
* ``wipe``: stop Redis and start it again *empty* (its files deleted: a Redis without persistence).
  The script then acts as an algorithm must: its wait raises ``RegistryLostError``, which counts
  the rollouts it had not seen finish as **reported lost**; it stores the snapshot again under the
  same id (version 1 again, with a new prompt) and enqueues replacements;
* ``outage``: stop Redis for ``--outage-seconds`` (40 by default), then start it again from its file.

Then it waits for every rollout and prints, per run: rollouts submitted, finished (by status),
**reported lost** (gone with Redis's data, and reported so by ``RegistryLostError``), **lost** (gone
without a word), **stuck** (not finished when the wait ended), **duplicated** (a rollout with more
than one ``succeeded`` attempt, or ``succeeded`` with none), **wrong snapshot** (a rollout whose agent
ran with another prompt than the one stored under the id and version its attempt records) and
attempts per rollout. Exits 1 unless lost, stuck, duplicated and wrong snapshot are all 0.

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
from dataclasses import dataclass, field
from pathlib import Path

import redis

from lightning_queue import (
    LightningClient,
    PromptTemplate,
    Rollout,
    RolloutConfig,
    RolloutResult,
    Settings,
    rollout,
)
from lightning_queue.core.errors import RedisUnavailableError, RegistryLostError, RolloutNotFoundError
from lightning_queue.ops.embedded import free_port
from lightning_queue.ops.fleet import LocalFleet
from lightning_queue.storage.connections import ping

HERE = Path(__file__).resolve().parent
FAULTS = ("kill", "restart", "wipe", "outage")
SNAPSHOT = "rs-faults"
UNREACHABLE = (redis.ConnectionError, redis.TimeoutError, RedisUnavailableError)


@rollout
def agent(task: dict, prompt: PromptTemplate) -> RolloutResult:
    """Takes ``task["seconds"]``, as a rollout of LLM calls would, then reports a reward and the
    prompt it actually got (which the script compares with what the attempt records)."""
    time.sleep(task["seconds"])
    return RolloutResult(reward=1.0, output={"pid": os.getpid(), "prompt": prompt.template})


class OwnRedis:
    """A redis-server with an append-only file (``appendfsync`` as asked) in a temporary directory."""

    def __init__(self, appendfsync: str) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            sys.exit("no redis-server binary: install one, or pass --redis-url (workers are then killed, "
                     "Redis is not touched)")
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

    def forget(self) -> None:
        """Delete its files (while it is stopped): the next start is a Redis that lost its data."""
        for path in Path(self.dir.name).iterdir():
            shutil.rmtree(path) if path.is_dir() else path.unlink()

    def close(self) -> None:
        self.stop()
        self.dir.cleanup()


@dataclass
class Generation:
    """The rollouts of one registry: those enqueued between two wipes, and the prompt stored under
    ``rs-faults`` version 1 meanwhile (what each of them must have run with)."""

    number: int
    prompt: str
    ids: list[str] = field(default_factory=list)
    finished: dict[str, tuple[str, object]] = field(default_factory=dict)  # id -> (status, prompt it ran with)
    reported_lost: set[str] = field(default_factory=set)


class Algorithm:
    """What an algorithm does through the faults: wait, and after a wipe store the snapshot again
    and enqueue again what was lost."""

    def __init__(self, client: LightningClient, args: argparse.Namespace, rng: random.Random) -> None:
        self.client = client
        self.args = args
        self.rng = rng
        self.generations: list[Generation] = []

    @property
    def current(self) -> Generation:
        return self.generations[-1]

    def start(self, count: int) -> None:
        number = len(self.generations) + 1
        generation = Generation(number, f"fault injection, registry {number}: {{x}}")
        while True:
            try:
                self.client.add_resources({"prompt": PromptTemplate(template=generation.prompt)}, SNAPSHOT)
                break
            except RegistryLostError:
                continue  # the client learns of the wipe here too; it writes into the new registry next
            except UNREACHABLE:
                time.sleep(0.5)
        self.generations.append(generation)
        self.enqueue(count)

    def enqueue(self, count: int) -> None:
        lo, hi = self.args.agent_seconds
        while True:
            try:
                queued = self.client.enqueue_rollouts(
                    [{"x": i, "seconds": self.rng.uniform(lo, hi)} for i in range(count)], resources_id=SNAPSHOT,
                    config=RolloutConfig(max_attempts=self.args.max_attempts))
                break
            except UNREACHABLE:
                time.sleep(0.5)
        self.current.ids.extend(r.rollout_id for r in queued)

    def unfinished(self) -> list[str]:
        g = self.current
        return [rid for rid in g.ids if rid not in g.finished]

    def wait(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for the current registry's rollouts; after a wipe, start over."""
        g = self.current
        pending = self.unfinished()
        if not pending:
            return
        def seen(r: Rollout) -> None:
            g.finished[r.rollout_id] = (r.status, (r.result.output or {}).get("prompt") if r.result else None)

        try:
            self.client.wait_for_rollouts(pending, timeout=timeout, on_finished=seen)
        except RolloutNotFoundError as exc:
            # RegistryLostError: Redis lost its data and says so. A plain RolloutNotFoundError (an
            # older version) leaves the algorithm to guess: those rollouts count as lost, not reported.
            lost = [rid for rid in g.ids if rid not in g.finished]
            if isinstance(exc, RegistryLostError):
                g.reported_lost.update(lost)
            print(f"    registry {g.number} lost ({type(exc).__name__}): {len(lost)} rollouts gone; "
                  "storing the snapshot again and enqueuing them again", flush=True)
            self.start(len(lost))
        except UNREACHABLE:
            time.sleep(0.5)  # Redis is away: wait again

    def done(self) -> bool:
        return not self.unfinished()


def inject(args: argparse.Namespace, fleet: LocalFleet, own: OwnRedis | None, algorithm: Algorithm,
           rng: random.Random) -> collections.Counter:
    """Inject the faults of ``args.faults`` at random for ``args.duration`` seconds (or until all finish)."""
    faults: collections.Counter = collections.Counter()
    start = time.monotonic()
    kinds = set(args.faults)
    means = {"kill": args.kill_interval, "restart": args.restart_interval, "wipe": args.wipe_interval,
             "outage": args.outage_interval}
    due = {kind: start + rng.expovariate(1 / means[kind]) for kind in kinds
           if kind == "kill" or own is not None}
    while time.monotonic() - start < args.duration:
        now = time.monotonic()
        for kind, when in sorted(due.items(), key=lambda item: item[1]):
            if now < when:
                continue
            at = now - start
            if kind == "kill":
                victim = rng.choice([w for w in fleet.workers if w.alive])
                os.killpg(victim.process.pid, signal.SIGKILL)  # no chance to requeue anything
                victim.process.wait()
                fleet.add(1, timeout=120)
                print(f"  {at:6.1f} s  killed {victim.name}, started a replacement", flush=True)
                faults["workers killed"] += 1
            elif own is not None:
                own.stop(kill=args.redis_signal == "KILL")
                if kind == "restart":
                    what = "Redis restarts"
                    time.sleep(rng.uniform(0.5, args.max_down))
                elif kind == "wipe":
                    what = "Redis restarted empty"
                    own.forget()
                    time.sleep(rng.uniform(0.5, args.max_down))
                else:
                    what = f"Redis down {args.outage_seconds:g} s"
                    time.sleep(args.outage_seconds)  # how long Redis stays away
                own.start()
                faults[what] += 1
                print(f"  {at:6.1f} s  {what}", flush=True)
            due[kind] = time.monotonic() + rng.expovariate(1 / means[kind])
            break  # one fault at a time
        algorithm.wait(timeout=0.5)
        if algorithm.done() and not args.keep_injecting:
            break
    return faults


@dataclass
class Outcome:
    submitted: int = 0
    by_status: collections.Counter = field(default_factory=collections.Counter)
    reported_lost: int = 0
    lost: list[str] = field(default_factory=list)
    stuck: list[str] = field(default_factory=list)
    duplicated: list[tuple[str, list[str]]] = field(default_factory=list)
    wrong: list[tuple[str, str, str]] = field(default_factory=list)
    histogram: collections.Counter = field(default_factory=collections.Counter)
    attempt_statuses: collections.Counter = field(default_factory=collections.Counter)
    failed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.stuck or self.duplicated or self.wrong)


def report(client: LightningClient, algorithm: Algorithm) -> Outcome:
    out = Outcome()
    current = algorithm.current
    for g in algorithm.generations:
        out.submitted += len(g.ids)
        out.reported_lost += len(g.reported_lost)
        if g is not current:
            # Gone with a wiped registry: each was seen finished or reported lost, or it was lost silently.
            for rid in g.ids:
                if rid in g.finished:
                    status, ran_with = g.finished[rid]
                    out.by_status[status] += 1
                    if status == "succeeded" and ran_with != g.prompt:
                        out.wrong.append((rid, f"registry {g.number}", f"{ran_with!r}"))
                elif rid not in g.reported_lost:
                    out.lost.append(rid)
            continue
        for rid in g.ids:
            try:
                r = client.get_rollout(rid)
                attempts = client.get_attempts(rid)
            except RolloutNotFoundError:
                out.lost.append(rid)
                continue
            out.by_status[r.status] += 1
            if not r.is_finished:
                out.stuck.append(rid)
            out.histogram[len(attempts)] += 1
            out.attempt_statuses.update(a.status for a in attempts)
            successes = [a for a in attempts if a.status == "succeeded"]
            if len(successes) > 1 or (r.status == "succeeded" and not successes):
                out.duplicated.append((rid, [a.status for a in attempts]))
            if r.status == "succeeded" and r.result is not None:
                ran_with = (r.result.output or {}).get("prompt")
                recorded = (successes[0].resources_id, successes[0].resources_version) if successes else None
                # In this registry, rs-faults version 1 holds the generation's prompt (it is never updated).
                if recorded != (SNAPSHOT, 1) or ran_with != g.prompt:
                    out.wrong.append((rid, f"{recorded}", f"{ran_with!r}"))
            if r.status == "failed" and r.error is not None:
                out.failed.append(f"{rid}: {r.error.type}: {r.error.message}")
    return out


def print_outcome(out: Outcome) -> None:
    finished = sum(out.by_status[s] for s in ("succeeded", "failed", "cancelled"))
    print(f"rollouts submitted:   {out.submitted} (replacements of reported-lost ones included)")
    print(f"finished:             {finished} ({', '.join(f'{s} {n}' for s, n in sorted(out.by_status.items()))})")
    print(f"reported lost:        {out.reported_lost} (with their registry; RegistryLostError said so)")
    print(f"lost:                 {len(out.lost)}" + (f"  e.g. {out.lost[:5]}" if out.lost else ""))
    print(f"stuck:                {len(out.stuck)}" + (f"  e.g. {out.stuck[:5]}" if out.stuck else ""))
    print(f"duplicated results:   {len(out.duplicated)}" + (f"  e.g. {out.duplicated[:3]}" if out.duplicated else ""))
    print(f"wrong snapshot:       {len(out.wrong)}" + (f"  e.g. {out.wrong[:3]}" if out.wrong else ""))
    print("attempts per rollout: " + ", ".join(f"{n}: {c}" for n, c in sorted(out.histogram.items())))
    print("attempt outcomes:     " + ", ".join(f"{s} {n}" for s, n in sorted(out.attempt_statuses.items())))
    for line in out.failed[:3]:
        print(f"  failed {line}")


def one_run(args: argparse.Namespace, seed: int) -> tuple[collections.Counter, Outcome, float]:
    rng = random.Random(seed)
    own = None if args.redis_url else OwnRedis(args.appendfsync)
    if own is not None:
        own.start()
    url = args.redis_url or own.url  # type: ignore[union-attr]
    prefix = f"lqfaults-{uuid.uuid4().hex[:8]}"
    settings = Settings(redis_url=url, key_prefix=prefix, queue=f"{prefix}-q",
                        visibility_timeout=args.visibility_timeout)
    mode = (f"own, appendonly yes, appendfsync {args.appendfsync}, stopped by SIG{args.redis_signal}" if own
            else "given: not touched")
    print(f"Redis {url} ({mode}), prefix {prefix}, {args.workers} workers, {args.rollouts} rollouts of "
          f"{args.agent_seconds[0]}-{args.agent_seconds[1]} s, faults {','.join(args.faults)} for "
          f"{args.duration:.0f} s, seed {seed}", flush=True)
    fleet = LocalFleet(settings, "fault_injection:agent", count=args.workers, pythonpath=[str(HERE)])
    client = LightningClient(settings)
    started = time.monotonic()
    try:
        fleet.start(timeout=120)
        algorithm = Algorithm(client, args, rng)
        algorithm.start(args.rollouts)
        faults = inject(args, fleet, own, algorithm, rng)
        print(f"faults injected: {dict(faults) or 'none'}; waiting for the rest...", flush=True)
        deadline = time.monotonic() + args.timeout
        while not algorithm.done() and time.monotonic() < deadline:
            algorithm.wait(timeout=min(5.0, max(0.5, deadline - time.monotonic())))
        elapsed = time.monotonic() - started
        print(f"done in {elapsed:.0f} s\n")
        outcome = report(client, algorithm)
        print_outcome(outcome)
        return faults, outcome, elapsed
    finally:
        fleet.close()
        client.close()
        if own is not None:
            own.close()
        else:
            cleanup = redis.Redis.from_url(url)
            for key in cleanup.scan_iter(match=f"{prefix}:*", count=1000):
                cleanup.delete(key)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rollouts", type=int, default=200)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of fault injection")
    parser.add_argument("--faults", default="kill,restart",
                        help=f"comma-separated fault kinds among {', '.join(FAULTS)} (default: kill,restart)")
    parser.add_argument("--runs", type=int, default=1, help="runs in a row (seeds seed, seed+1...); a table at the end")
    parser.add_argument("--agent-seconds", type=float, nargs=2, default=(0.2, 1.0), metavar=("MIN", "MAX"),
                        help="how long each rollout takes, drawn uniformly")
    parser.add_argument("--kill-interval", type=float, default=8.0, help="mean seconds between worker kills")
    parser.add_argument("--restart-interval", type=float, default=20.0, help="mean seconds between Redis restarts")
    parser.add_argument("--wipe-interval", type=float, default=20.0,
                        help="mean seconds between restarts of Redis empty")
    parser.add_argument("--outage-interval", type=float, default=10.0, help="mean seconds before each outage")
    parser.add_argument("--outage-seconds", type=float, default=40.0, help="how long an outage keeps Redis down")
    parser.add_argument("--max-down", type=float, default=3.0, help="longest Redis restart, seconds")
    parser.add_argument("--keep-injecting", action="store_true",
                        help="inject faults for the whole --duration even when every rollout has finished")
    parser.add_argument("--visibility-timeout", type=int, default=10,
                        help="seconds before a killed worker's message is redelivered (above the longest rollout)")
    parser.add_argument("--max-attempts", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the rollouts afterwards")
    parser.add_argument("--appendfsync", choices=["always", "everysec"], default="always")
    parser.add_argument("--redis-signal", choices=["TERM", "KILL"], default="TERM",
                        help="stop Redis gracefully (TERM) or crash it (KILL)")
    parser.add_argument("--redis-url", help="use this Redis (workers are killed, Redis is not touched)")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    args.faults = [kind.strip() for kind in args.faults.split(",") if kind.strip()]
    unknown = set(args.faults) - set(FAULTS)
    if unknown:
        parser.error(f"unknown fault kinds {sorted(unknown)}; choose among {', '.join(FAULTS)}")
    seed = args.seed if args.seed is not None else random.randrange(2**32)

    rows = []
    for run in range(args.runs):
        if run:
            print()
        faults, outcome, elapsed = one_run(args, seed + run)
        rows.append((seed + run, faults, outcome, elapsed))
    if args.runs > 1:
        print("\n| seed | faults injected | finished | reported lost | lost | stuck | duplicated | wrong snapshot "
              "| attempts per rollout | seconds |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for run_seed, faults, out, elapsed in rows:
            finished = ", ".join(f"{n} {s}" for s, n in sorted(out.by_status.items()))
            attempts = ", ".join(f"{n}: {c}" for n, c in sorted(out.histogram.items()))
            injected = ", ".join(f"{n} {what}" for what, n in faults.items()) or "none"
            print(f"| {run_seed} | {injected} | {finished} | {out.reported_lost} | {len(out.lost)} | "
                  f"{len(out.stuck)} | {len(out.duplicated)} | {len(out.wrong)} | {attempts} | {elapsed:.0f} |")
    return 0 if all(out.ok for _, _, out, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
