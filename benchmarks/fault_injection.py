"""Fault injection: run rollouts on a local fleet while faults of every kind hit it, and count what went wrong.

    python benchmarks/fault_injection.py --rollouts 400 --runs 5

Starts its own ``redis-server`` with an append-only file in a temporary directory (or uses
``--redis-url``, where it cannot restart Redis), starts W prefork workers and (``--gevent-workers``)
workers with a gevent pool of 200 on a queue of their own (``--gevent-share`` of the rollouts go
there), through :class:`lightning_queue.ops.fleet.LocalFleet`, and runs N
rollouts of an agent that takes a while (``--agent-seconds``), pinned half to one snapshot and half to
another; ``--retry-share`` of them fail their first two attempts and are retried with a backoff
(``--backoff``). The rollouts are enqueued in ``--waves`` batches while, for ``--duration`` seconds,
it injects at random (``--faults``, all by default):

- ``kill``: a worker killed with SIGKILL (main process and pool, as a vanished machine), and replaced;
- ``restart``: Redis stopped (or crashed, ``--redis-signal KILL``) and started again, while retries wait
  their backoff;
- ``delete``: a task message deleted from a queue list (where a backlog waits: the prefork queue);
- ``unpublished``: rollouts whose records are written but whose messages are never published (a
  client killed between the two; emulated by writing the records with ``client.store``);
- ``poison``: malformed messages pushed onto the queue (not JSON, a JSON array, an envelope without
  properties, a body that is not base64, a pickle, 2 MB of junk);
- ``wipe``: Redis stopped and started again *empty* (its files deleted: a Redis without persistence).
  The script then does what an algorithm must: its wait raises ``RegistryLostError``, which counts the
  rollouts it had not seen finish as **reported lost**; it stores the snapshots again under the same ids
  (version 1 again, with new prompts: a new *registry generation*) and enqueues replacements;
- ``outage``: Redis stopped for ``--outage-seconds`` (40 by default: longer than any heartbeat or
  visibility timeout), then started again from its file.

``wipe`` and ``outage`` need the script's own Redis, and are left out of the default ``--faults``
(``--faults all`` takes every kind): an outage stops everything else for its whole length.

Then it waits (``--timeout``) and prints, per run: rollouts submitted (replacements included); finished,
by status; **reported lost** (gone with a wiped registry, and said so by ``RegistryLostError``); **lost**
(gone without a word); **stuck** (not finished after the wait, and not failed with a clear error);
**duplicated** (more than one succeeded attempt, or succeeded with none); **wrong snapshot** (a result
computed with another snapshot, or another registry generation's prompt, than the one the rollout was
pinned to); the faults injected; the
rollouts the reaper sent again; the messages moved to the dead-letter list. With ``--runs`` above 1, a
table of every run at the end. Exits 1 when anything was lost, stuck, duplicated or on a wrong snapshot.

Workers import this file as the module ``fault_injection`` for its agent.
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
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
    RolloutRequest,
    RolloutResult,
    Settings,
    rollout,
)
from lightning_queue.core.errors import (
    RedisUnavailableError,
    RegistryLostError,
    ResourcesNotFoundError,
    RolloutNotFoundError,
)
from lightning_queue.ops.embedded import free_port
from lightning_queue.ops.fleet import LocalFleet, WorkerProcess
from lightning_queue.storage.connections import ping

HERE = Path(__file__).resolve().parent
FAULTS = ("kill", "restart", "delete", "unpublished", "poison", "wipe", "outage")
DEFAULT_FAULTS = ("kill", "restart", "delete", "unpublished", "poison")
NEED_OWN_REDIS = ("restart", "wipe", "outage")
SNAPSHOTS = ("rs-faults-a", "rs-faults-b")
UNREACHABLE = (redis.ConnectionError, redis.TimeoutError, RedisUnavailableError)


def prompt(snapshot: str, generation: int) -> str:
    """The template stored under ``snapshot`` in registry generation ``generation`` (a new one after each wipe)."""
    return f"fault injection {snapshot[-1].upper()}, registry {generation}: {{x}}"


@rollout
def agent(task: dict, prompt: PromptTemplate, rollout: Rollout) -> RolloutResult:
    """Takes ``task["seconds"]``, as a rollout of LLM calls would, failing its first ``task["fail"]``
    attempts; then reports a reward and the prompt it ran with (so which snapshot)."""
    time.sleep(task["seconds"])
    if rollout.attempt_count <= task.get("fail", 0):
        raise ConnectionError(f"attempt {rollout.attempt_count} fails on purpose")
    return RolloutResult(reward=1.0, output={"pid": os.getpid(), "prompt": prompt.template})


class OwnRedis:
    """A redis-server with an append-only file (``appendfsync`` as asked) in a temporary directory."""

    def __init__(self, appendfsync: str) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            sys.exit("no redis-server binary: install one, or pass --redis-url (Redis is then not restarted)")
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


def poison_messages(client: LightningClient, queue: str) -> list[bytes]:
    """Malformed messages of every shape a worker must refuse, made from a good one."""
    good = json.loads(client.publisher.build([Rollout(input=0, queue=queue)], [(None, None)]).by_queue[queue][0])

    def changed(**fields: object) -> bytes:
        return json.dumps({**good, **fields}).encode()

    return [b"not json at all", b"[1, 2, 3]", changed(properties="x"), changed(body="!!!not base64!!!"),
            changed(body=base64.b64encode(b"garbage{").decode()),
            changed(**{"content-type": "application/x-python-serialize"}), b"x" * 2_000_000]


@dataclass
class Generation:
    """The rollouts of one registry: those enqueued between two wipes (all of them, without wipes)."""

    number: int
    ids: list[str] = field(default_factory=list)
    pinned: dict[str, str] = field(default_factory=dict)  # rollout id -> the snapshot it was pinned to
    seen: dict[str, Rollout] = field(default_factory=dict)  # finished, as the algorithm's wait saw them
    reported_lost: set[str] = field(default_factory=set)

    def unseen(self) -> list[str]:
        return [rid for rid in self.ids if rid not in self.seen]


@dataclass
class Run:
    """One run: the rollouts submitted, registry generation by generation, and what was done to them."""

    generations: list[Generation] = field(default_factory=lambda: [Generation(1)])
    faults: collections.Counter = field(default_factory=collections.Counter)

    @property
    def current(self) -> Generation:
        return self.generations[-1]

    @property
    def submitted(self) -> int:
        return sum(len(g.ids) for g in self.generations)


class Faults:
    """Injects the faults of one run."""

    def __init__(self, args: argparse.Namespace, fleets: list[LocalFleet], own: OwnRedis | None,
                 client: LightningClient, run: Run, rng: random.Random) -> None:
        self.args, self.fleets, self.own, self.client, self.run, self.rng = args, fleets, own, client, run, rng
        # The prefork workers' queue (a backlog builds there), and the gevent workers' own.
        self.queues = sorted({fleet.settings.queue for fleet in fleets})
        self.poison = poison_messages(client, client.settings.queue)

    def kill(self) -> str:
        fleet = self.rng.choice([f for f in self.fleets if any(w.alive for w in f.workers)])
        victim: WorkerProcess = self.rng.choice([w for w in fleet.workers if w.alive])
        os.killpg(victim.process.pid, signal.SIGKILL)  # no chance to requeue anything
        victim.process.wait()
        fleet.add(1, timeout=120)
        return f"killed {victim.name}, started a replacement"

    def restart(self) -> str:
        assert self.own is not None
        self.own.stop(kill=self.args.redis_signal == "KILL")
        time.sleep(self.rng.uniform(0.5, self.args.max_down))  # Redis is down this long: nothing to wait for
        self.own.start()
        return "restarted Redis"

    def wipe(self) -> str:
        assert self.own is not None
        self.own.stop(kill=self.args.redis_signal == "KILL")
        self.own.forget()
        time.sleep(self.rng.uniform(0.5, self.args.max_down))
        self.own.start()
        return "restarted Redis empty"

    def outage(self) -> str:
        assert self.own is not None
        self.own.stop(kill=self.args.redis_signal == "KILL")
        time.sleep(self.args.outage_seconds)  # how long Redis stays away
        self.own.start()
        return f"Redis down {self.args.outage_seconds:g} s"

    def store_snapshots(self) -> None:
        """Store the current generation's snapshots (again, after a wipe), within a minute."""
        number = self.run.current.number
        deadline = time.monotonic() + 60
        while True:
            try:
                self.client.add_resources_batch(
                    [(rid, {"prompt": PromptTemplate(template=prompt(rid, number))}) for rid in SNAPSHOTS])
                return
            except RegistryLostError:
                continue  # the client learns of the wipe here too; it writes into the new registry next
            except UNREACHABLE:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def wait(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for the current generation's rollouts, as an algorithm would;
        when the wait says Redis lost its data, count the unseen ones as reported lost, store the
        snapshots again and enqueue replacements."""
        g = self.run.current
        pending = g.unseen()
        if not pending:
            time.sleep(timeout)  # nothing to wait for yet (the next wave is not enqueued)
            return
        try:
            self.client.wait_for_rollouts(pending, timeout=timeout,
                                          on_finished=lambda r: g.seen.__setitem__(r.rollout_id, r))
        except RegistryLostError:
            lost = g.unseen()
            g.reported_lost.update(lost)
            print(f"    registry {g.number} lost (RegistryLostError): {len(lost)} rollouts gone; storing the "
                  "snapshots again and enqueuing them again", flush=True)
            self.run.generations.append(Generation(g.number + 1))
            self.store_snapshots()
            self.enqueue(len(lost))
        except RolloutNotFoundError:
            pass  # a record gone without the registry saying why: the report counts it lost
        except UNREACHABLE:
            time.sleep(0.5)  # Redis is away: wait again on the next pass

    def delete(self) -> str:
        r, queue = self.client.redis, self.rng.choice(self.queues)
        key = self.client.keys.celery_queue(queue)
        length = r.llen(key)
        if not length:
            return ""
        message = r.lindex(key, self.rng.randrange(length))
        return f"deleted a message from {queue}" if message is not None and r.lrem(key, 1, message) else ""

    def unpublished(self) -> str:
        requests, queue = self.run_requests(self.rng.randint(1, 5)), self.rng.choice(self.queues)
        rollouts = [Rollout(input=req.input, resources_id=req.resources_id, resolve="pinned",
                            resources_version=1, config=req.config or RolloutConfig(), queue=queue)
                    for req in requests]
        self.client.store.create_rollouts(rollouts)  # and never published: the client "died" here
        self.record(rollouts)
        return f"wrote {len(rollouts)} rollouts of {queue} without publishing them"

    def poisoned(self) -> str:
        queue = self.rng.choice(self.queues)
        self.client.redis.lpush(self.client.keys.celery_queue(queue), self.rng.choice(self.poison))
        return f"pushed a malformed message onto {queue}"

    def enqueue(self, n: int) -> None:
        """``n`` rollouts, ``--gevent-share`` of them to the gevent workers' queue."""
        to_gevent = round(n * self.args.gevent_share) if len(self.queues) > 1 else 0
        for queue, count in ((self.queues[-1], to_gevent), (self.client.settings.queue, n - to_gevent)):
            if count:
                try:
                    self.record(self.client.enqueue_rollouts(self.run_requests(count), queue=queue))
                except ResourcesNotFoundError:
                    # Redis came back empty since the last wait: the snapshots are gone (nothing was
                    # enqueued). Learn it as the algorithm does, then enqueue into the new registry.
                    self.registry_gone()
                    self.record(self.client.enqueue_rollouts(self.run_requests(count), queue=queue))

    def registry_gone(self) -> None:
        """After a wipe the wait raises ``RegistryLostError`` for what was pending (a new generation);
        with nothing pending, start the new generation here."""
        number = self.run.current.number
        self.wait(timeout=0.5)
        if self.run.current.number == number:
            self.run.generations.append(Generation(number + 1))
            self.store_snapshots()

    def run_requests(self, n: int) -> list[RolloutRequest]:
        lo, hi = self.args.agent_seconds
        requests = []
        for _ in range(n):
            snapshot = self.rng.choice(SNAPSHOTS)
            fail = 2 if self.rng.random() < self.args.retry_share else 0
            requests.append(RolloutRequest(
                input={"x": self.run.submitted + len(requests), "seconds": self.rng.uniform(lo, hi), "fail": fail},
                resources_id=snapshot,
                config=RolloutConfig(max_attempts=self.args.max_attempts, retry_backoff_seconds=self.args.backoff),
            ))
        return requests

    def record(self, rollouts: list[Rollout]) -> None:
        g = self.run.current
        for r in rollouts:
            g.ids.append(r.rollout_id)
            g.pinned[r.rollout_id] = str(r.resources_id)

    def inject(self) -> None:
        """Enqueue the rollouts in ``--waves`` batches over the first two thirds of ``--duration``
        and inject each fault kind at random (exponential gaps: ``--kill-interval``,
        ``--restart-interval``, ``--wipe-interval``, ``--outage-interval``, else ``--fault-interval``
        on average), for ``--duration`` seconds, or until every rollout has finished; then enqueue
        any wave an outage held back."""
        kinds = [k for k in self.args.faults if k not in NEED_OWN_REDIS or self.own is not None]
        actions = {"kill": self.kill, "restart": self.restart, "delete": self.delete,
                   "unpublished": self.unpublished, "poison": self.poisoned, "wipe": self.wipe,
                   "outage": self.outage}
        rare = {"kill": self.args.kill_interval, "restart": self.args.restart_interval,
                "wipe": self.args.wipe_interval, "outage": self.args.outage_interval}
        mean = {k: rare.get(k, self.args.fault_interval) for k in kinds}
        start = time.monotonic()
        due = {k: start + self.rng.expovariate(1 / mean[k]) for k in kinds}
        waves = [self.args.rollouts // self.args.waves + (i < self.args.rollouts % self.args.waves)
                 for i in range(self.args.waves)]
        wave_gap = self.args.duration * 2 / 3 / self.args.waves
        next_wave = start
        while time.monotonic() - start < self.args.duration:
            if waves and time.monotonic() >= next_wave:
                try:
                    self.enqueue(waves[0])
                    waves.pop(0)
                    next_wave += wave_gap
                except UNREACHABLE:
                    pass  # Redis is down: enqueue this wave on the next pass
            for kind in kinds:
                if time.monotonic() >= due[kind]:
                    try:
                        done = actions[kind]()
                    except UNREACHABLE as exc:
                        done = f"(Redis down: {kind} skipped: {exc})"
                    if done and not done.startswith("("):
                        self.run.faults[kind] += 1
                    if done:
                        print(f"  {time.monotonic() - start:6.1f} s  {done}", flush=True)
                    due[kind] = time.monotonic() + self.rng.expovariate(1 / mean[kind])
            self.wait(timeout=0.2)
            if not waves and not self.run.current.unseen():
                break
        # Waves an outage held back past --duration: every rollout asked for is submitted (within a minute).
        deadline = time.monotonic() + 60
        while waves:
            try:
                self.enqueue(waves[0])
                waves.pop(0)
            except UNREACHABLE:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def wait_for_the_rest(self) -> None:
        deadline = time.monotonic() + self.args.timeout
        while self.run.current.unseen() and time.monotonic() < deadline:
            self.wait(timeout=min(5.0, max(0.5, deadline - time.monotonic())))


def report(client: LightningClient, run: Run, elapsed: float) -> dict[str, object]:
    by_status: collections.Counter = collections.Counter()
    histogram: collections.Counter = collections.Counter()
    attempt_statuses: collections.Counter = collections.Counter()
    lost: list[str] = []
    stuck: list[str] = []
    duplicated: list[tuple[str, list[str]]] = []
    wrong: list[tuple[str, object, object]] = []
    errors: collections.Counter = collections.Counter()
    for g in run.generations[:-1]:
        # Gone with a wiped registry: each was seen finished, or reported lost, or lost without a word.
        for rid in g.ids:
            seen = g.seen.get(rid)
            if seen is None:
                if rid not in g.reported_lost:
                    lost.append(rid)
                continue
            by_status[seen.status] += 1
            ran_with = (seen.result.output or {}).get("prompt") if seen.result else None
            if seen.status == "succeeded" and ran_with != prompt(g.pinned[rid], g.number):
                wrong.append((rid, f"registry {g.number}", ran_with))
    g = run.current
    records = client.store.read_rollouts(g.ids)
    lost += [rid for rid, r in zip(g.ids, records, strict=True) if r is None]
    rollouts = [r for r in records if r is not None]
    by_status.update(r.status for r in rollouts)
    stuck = [r.rollout_id for r in rollouts if not r.is_finished]
    for r in rollouts:
        attempts = client.get_attempts(r.rollout_id)
        histogram[len(attempts)] += 1
        attempt_statuses.update(a.status for a in attempts)
        successes = sum(a.status == "succeeded" for a in attempts)
        if successes > 1 or (r.status == "succeeded" and successes == 0):
            duplicated.append((r.rollout_id, [a.status for a in attempts]))
        if r.status == "succeeded":
            ran_with = [a.resources_id for a in attempts if a.status == "succeeded"]
            got = (r.result.output or {}).get("prompt") if r.result else None
            pinned = g.pinned[r.rollout_id]
            if ran_with != [pinned] or got != prompt(pinned, g.number):
                wrong.append((r.rollout_id, ran_with, got))
        if r.status == "failed" and r.error:
            errors[r.error.type] += 1
    reported_lost = sum(len(g.reported_lost) for g in run.generations)
    resent = sum(int(client.redis.hget(client.keys.rollout(rid), "resends") or 0) for rid in g.ids)
    dead = client.redis.llen(client.keys.dead_letters)
    print(f"rollouts submitted:   {run.submitted} (replacements of reported-lost ones included)")
    print(f"finished:             {sum(by_status[s] for s in ('succeeded', 'failed', 'cancelled'))} "
          f"({', '.join(f'{s} {n}' for s, n in sorted(by_status.items()))})")
    if errors:
        print(f"failed with:          {dict(errors)}")
    print(f"reported lost:        {reported_lost} (with a wiped registry; RegistryLostError said so)")
    print(f"lost:                 {len(lost)}" + (f"  e.g. {lost[:5]}" if lost else ""))
    print(f"stuck:                {len(stuck)}" + (f"  e.g. {stuck[:5]}" if stuck else ""))
    print(f"duplicated results:   {len(duplicated)}" + (f"  e.g. {duplicated[:3]}" if duplicated else ""))
    print(f"wrong snapshot:       {len(wrong)}" + (f"  e.g. {wrong[:3]}" if wrong else ""))
    print(f"faults:               {dict(run.faults) or 'none'}")
    print(f"re-sent by the reaper (last registry): {resent}; dead letters: {dead}")
    print("attempts per rollout (last registry): " + ", ".join(f"{n}: {c}" for n, c in sorted(histogram.items())))
    print("attempt outcomes (last registry):     "
          + ", ".join(f"{s} {n}" for s, n in sorted(attempt_statuses.items())))
    return {"rollouts": run.submitted, "succeeded": by_status["succeeded"], "failed": by_status["failed"],
            "reported lost": reported_lost, "lost": len(lost), "stuck": len(stuck), "duplicated": len(duplicated),
            "wrong snapshot": len(wrong), "kills": run.faults["kill"], "restarts": run.faults["restart"],
            "wipes": run.faults["wipe"], "outages": run.faults["outage"], "deleted": run.faults["delete"],
            "unpublished": run.faults["unpublished"], "poison": run.faults["poison"], "re-sent": resent,
            "seconds": round(elapsed)}


def one_run(args: argparse.Namespace, number: int, seed: int, own: OwnRedis | None) -> dict[str, object]:
    rng = random.Random(seed)
    url = args.redis_url or own.url  # type: ignore[union-attr]
    prefix = f"lqfaults-{uuid.uuid4().hex[:8]}"
    settings = Settings(redis_url=url, key_prefix=prefix, queue=f"{prefix}-q",
                        visibility_timeout=args.visibility_timeout, heartbeat_interval=2.0, watchdog_interval=1.0,
                        message_grace_seconds=args.grace, retry_poll_interval=0.5)
    mode = (f"own, appendonly yes, appendfsync {args.appendfsync}, stopped by SIG{args.redis_signal}" if own
            else "given: not touched")
    print(f"\n=== run {number}: Redis {url} ({mode}), prefix {prefix}, {args.workers} prefork + {args.gevent_workers} "
          f"gevent-200 workers, {args.rollouts} rollouts of {args.agent_seconds[0]}-{args.agent_seconds[1]} s, "
          f"{args.duration:.0f} s of faults ({', '.join(args.faults)}), seed {seed}", flush=True)
    fleets = [LocalFleet(settings, "fault_injection:agent", count=args.workers, pythonpath=[str(HERE)])]
    if args.gevent_workers:
        gevent_settings = settings.model_copy(update={"queue": f"{prefix}-gevent"})
        fleets.append(LocalFleet(gevent_settings, "fault_injection:agent", count=args.gevent_workers,
                                 pythonpath=[str(HERE)], pool="gevent", concurrency=200))
    client = LightningClient(settings)
    run = Run()
    started = time.monotonic()
    try:
        for fleet in fleets:
            fleet.start(timeout=120)
        faults = Faults(args, fleets, own, client, run, rng)
        faults.store_snapshots()
        faults.inject()
        print(f"faults injected: {dict(run.faults) or 'none'}; waiting for the rest...", flush=True)
        faults.wait_for_the_rest()
        elapsed = time.monotonic() - started
        print(f"done in {elapsed:.0f} s\n")
        return report(client, run, elapsed)
    finally:
        for fleet in fleets:
            fleet.close()
        client.close()
        if own is None:
            cleanup = redis.Redis.from_url(url)
            for key in cleanup.scan_iter(match=f"{prefix}:*", count=1000):
                cleanup.delete(key)


def table(rows: list[dict[str, object]]) -> None:
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    print("\n| run | " + " | ".join(c.ljust(widths[c]) for c in columns) + " |")
    print("|---|" + "|".join("-" * (widths[c] + 2) for c in columns) + "|")
    for i, row in enumerate(rows, 1):
        print(f"| {i} | " + " | ".join(str(row[c]).rjust(widths[c]) for c in columns) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rollouts", type=int, default=400)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--waves", type=int, default=10, help="batches the rollouts are enqueued in, during the faults")
    parser.add_argument("--workers", type=int, default=3, help="prefork workers (one process each)")
    parser.add_argument("--gevent-workers", type=int, default=1,
                        help="workers with a gevent pool of 200, on a queue of their own")
    parser.add_argument("--gevent-share", type=float, default=0.5, help="rollouts sent to the gevent workers' queue")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of fault injection")
    parser.add_argument("--faults", nargs="+", choices=(*FAULTS, "all"), default=list(DEFAULT_FAULTS),
                        help="fault kinds (default: all but wipe and outage; 'all': every kind)")
    parser.add_argument("--kill-interval", type=float, default=10.0, help="mean seconds between worker kills")
    parser.add_argument("--restart-interval", type=float, default=10.0, help="mean seconds between Redis restarts")
    parser.add_argument("--fault-interval", type=float, default=4.0,
                        help="mean seconds between two deletes, two unpublished batches, two poison messages")
    parser.add_argument("--agent-seconds", type=float, nargs=2, default=(0.1, 0.6), metavar=("MIN", "MAX"),
                        help="how long each attempt takes, drawn uniformly")
    parser.add_argument("--retry-share", type=float, default=0.3, help="rollouts that fail their first 2 attempts")
    parser.add_argument("--backoff", type=float, default=0.5, help="retry backoff of every rollout, seconds")
    parser.add_argument("--wipe-interval", type=float, default=20.0, help="mean seconds between two wipes")
    parser.add_argument("--outage-interval", type=float, default=30.0, help="mean seconds before each outage")
    parser.add_argument("--outage-seconds", type=float, default=40.0, help="how long an outage keeps Redis down")
    parser.add_argument("--max-down", type=float, default=3.0, help="longest Redis restart or wipe, seconds")
    parser.add_argument("--visibility-timeout", type=int, default=10,
                        help="seconds before a killed worker's message is redelivered (above the longest rollout)")
    parser.add_argument("--grace", type=float, default=2.0, help="LQ_MESSAGE_GRACE_SECONDS of the run")
    parser.add_argument("--max-attempts", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=180.0,
                        help="seconds to wait for the rollouts once faults stop (then unfinished ones are stuck)")
    parser.add_argument("--appendfsync", choices=["always", "everysec"], default="always")
    parser.add_argument("--redis-signal", choices=["TERM", "KILL"], default="TERM",
                        help="stop Redis gracefully (TERM) or crash it (KILL)")
    parser.add_argument("--redis-url", help="use this Redis (no restarts, wipes or outages) instead of starting one")
    parser.add_argument("--seed", type=int, default=None, help="seed of the first run (the next ones add 1)")
    args = parser.parse_args()
    if "all" in args.faults:
        args.faults = list(FAULTS)
    if args.gevent_workers:
        try:
            import gevent  # noqa: F401
        except ImportError:
            sys.exit("--gevent-workers needs gevent: pip install -e '.[bench]' (or pass --gevent-workers 0)")
    first = args.seed if args.seed is not None else random.randrange(2**32)

    own = None if args.redis_url else OwnRedis(args.appendfsync)
    if own is not None:
        own.start()
    rows = []
    try:
        for number in range(1, args.runs + 1):
            rows.append(one_run(args, number, first + number - 1, own))
    finally:
        if own is not None:
            own.close()
    if len(rows) > 1:
        table(rows)
    bad = sum(int(str(r[k])) for r in rows for k in ("lost", "stuck", "duplicated", "wrong snapshot"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
