"""Queue performance against bare Celery, measured side by side in one run.

    python benchmarks/bench_queue.py [--quick] [--redis-url URL]

Starts its own ``redis-server`` (no persistence, a temp dir, a free port) so
``INFO commandstats`` and memory counts see nothing but this benchmark; with
``--redis-url`` it uses that server instead (its commandstats then include
whatever else runs there). Real ``celery worker`` processes run both sides:
lightning-queue's app with the agents in ``bench_agents.py``, and the bare
Celery app in ``bare_celery.py``, with the same worker settings. See
``benchmarks/README.md`` for what each row means and the latest numbers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # bare_celery and bench_agents, as the workers import them

from lightning_queue import LightningClient, PromptTemplate, Settings
from lightning_queue.ops.embedded import EmbeddedRedis
from lightning_queue.ops.fleet import WorkerProcess, worker_env
from lightning_queue.storage.connections import ping

Row = tuple[str, str, str]  # (measure, result, target)

# -- pure helpers (unit-tested in tests/unit/test_bench_helpers.py) ---------------------------------------------


def command_calls(commandstats: Mapping[str, Any]) -> dict[str, int]:
    """``{command: calls}`` from ``INFO commandstats``: either redis-py's parsed dict
    (``{"cmdstat_get": {"calls": 3, ...}}``) or the raw text (``cmdstat_get:calls=3,usec=...``)."""
    if isinstance(commandstats, str):
        parsed: dict[str, Any] = {}
        for line in commandstats.splitlines():
            name, sep, fields = line.strip().partition(":")
            if sep and name.startswith("cmdstat_"):
                parsed[name] = dict(field.split("=", 1) for field in fields.split(","))
        commandstats = parsed
    return {name.removeprefix("cmdstat_"): int(stats["calls"]) for name, stats in commandstats.items()
            if name.startswith("cmdstat_")}


def calls_delta(before: Mapping[str, int], after: Mapping[str, int],
                ignore: Sequence[str] = ("info", "memory|usage", "config|resetstat")) -> dict[str, int]:
    """Calls per command made between two :func:`command_calls` snapshots (the benchmark's
    own look-ups left out), largest first, zeros dropped."""
    delta = {name: calls - before.get(name, 0) for name, calls in after.items() if name not in ignore}
    return dict(sorted(((n, c) for n, c in delta.items() if c > 0), key=lambda item: (-item[1], item[0])))


def split_per_item(delta: Mapping[str, int], items: int, top: int = 8) -> str:
    """``"evalsha 3.00, publish 2.00, ..."``: the largest commands per item, the rest summed as ``other``."""
    shown = list(delta.items())[:top]
    rest = sum(delta.values()) - sum(c for _, c in shown)
    parts = [f"{name} {calls / items:.2f}" for name, calls in shown]
    if rest:
        parts.append(f"other {rest / items:.2f}")
    return ", ".join(parts)


def max_in_flight(intervals: Sequence[tuple[float, float]]) -> int:
    """The most intervals ``(start, end)`` open at one instant (an end at the instant
    another starts does not overlap it)."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) by the nearest-rank rule."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def format_table(rows: Sequence[Row]) -> str:
    width = max(len(r[0]) for r in rows)
    rwidth = max(len(r[1]) for r in rows)
    lines = [f"{'measure':<{width}}  {'result':<{rwidth}}  target", f"{'-' * width}  {'-' * rwidth}  ------"]
    lines += [f"{m:<{width}}  {r:<{rwidth}}  {t}".rstrip() for m, r, t in rows]
    return "\n".join(lines)


# -- Redis and workers -------------------------------------------------------------------------------------------


def own_redis() -> EmbeddedRedis:
    """A fresh ``redis-server`` of our own, so its counters hold only this benchmark."""
    if not shutil.which("redis-server"):
        raise SystemExit("bench_queue needs redis-server on PATH, or --redis-url of a server to use")
    return EmbeddedRedis.start(prefer_binary=True)


def calls_now(client: redis.Redis) -> dict[str, int]:
    return command_calls(client.info("commandstats"))


def cpu_now(client: redis.Redis) -> float:
    """CPU seconds the Redis server process has used (user + system)."""
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


@contextmanager
def workers(app: str, env: dict[str, str], queue: str, concurrency: int, pool: str = "prefork",
            name: str = "w", logdir: str = "", timeout: float = 90.0) -> Iterator[WorkerProcess]:
    """One ``celery worker`` with ``concurrency`` slots of ``pool``, started the standard
    way and stopped (warm, then SIGKILL of its process group) on exit."""
    log_path = Path(logdir) / f"{name}-{uuid.uuid4().hex[:6]}.log"
    argv = [sys.executable, "-m", "celery", "-A", app, "worker", "--hostname", f"{name}@%h", "--pool", pool,
            "--concurrency", str(concurrency), "-Q", queue, "--without-mingle", "--without-gossip",
            "--loglevel", "INFO"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, env=env, cwd=str(HERE), stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    worker = WorkerProcess(name, process, log_path)
    try:
        deadline = time.monotonic() + timeout
        while not worker.ready:
            if not worker.alive or time.monotonic() > deadline:
                raise RuntimeError(f"worker {name} ({pool} x{concurrency}) did not start:\n{worker.log()[-3000:]}")
            time.sleep(0.1)
        yield worker
    finally:
        if worker.alive:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


# -- the two sides -----------------------------------------------------------------------------------------------


class Bench:
    """Both sides on one Redis: lightning-queue under ``prefix``, bare Celery under ``prefix-bare``."""

    def __init__(self, url: str, quick: bool, logdir: str) -> None:
        self.url, self.quick, self.logdir = url, quick, logdir
        self.prefix = f"lqbench-{uuid.uuid4().hex[:8]}"
        self.settings = Settings(redis_url=url, key_prefix=self.prefix, queue=f"{self.prefix}-q",
                                 cache_stats_interval_seconds=1.0)
        self.client = LightningClient(self.settings)
        self.client.add_resources({"prompt": PromptTemplate(template="{question}")}, "bench")
        self.redis = redis.Redis.from_url(url)
        # The bare workers build their app from these at import; they inherit them from this process.
        os.environ["BENCH_REDIS_URL"], os.environ["BENCH_PREFIX"] = url, f"{self.prefix}-bare"
        import bare_celery

        self.bare = bare_celery.make_app(url, f"{self.prefix}-bare")
        self.bare_queue = f"{self.prefix}-bare-q"
        self.noop = self.bare.tasks["bench.noop"]

    def lq_env(self, agent: str) -> dict[str, str]:
        return worker_env(self.settings, f"bench_agents:{agent}", [str(HERE), str(REPO)])

    def bare_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), str(REPO), env.get("PYTHONPATH")]))
        return env

    def lq_workers(self, concurrency: int, agent: str = "noop", pool: str = "prefork"):
        return workers("lightning_queue.app", self.lq_env(agent), self.settings.queue, concurrency, pool,
                       f"lq-{pool}{concurrency}", self.logdir)

    def bare_workers(self, concurrency: int, pool: str = "prefork"):
        return workers("bare_celery", self.bare_env(), self.bare_queue, concurrency, pool,
                       f"bare-{pool}{concurrency}", self.logdir)

    def lq_run(self, n: int, timeout: float = 600.0, **task: Any) -> tuple[float, list[Any]]:
        """Enqueue ``n`` rollouts (inputs ``{"i": i, **task}``) in one batch and wait for all;
        seconds taken and the rollouts."""
        start = time.perf_counter()
        rollouts = self.client.enqueue_rollouts([{"i": i, **task} for i in range(n)])
        done = self.client.wait_for_rollouts([r.rollout_id for r in rollouts], timeout=timeout)
        elapsed = time.perf_counter() - start
        bad = [r for r in done if r.status != "succeeded"]
        if len(done) != n or bad:
            finished = {r.rollout_id for r in done}
            unfinished = [(r.rollout_id, r.status, r.attempt_count, [(a.status, a.worker_id) for a in
                           self.client.get_attempts(r.rollout_id)])
                          for r in self.client.get_rollouts([r.rollout_id for r in rollouts
                                                             if r.rollout_id not in finished][:3])]
            mentions = [line for log in Path(self.logdir).glob("*.log")
                        for line in log.read_text(errors="replace").splitlines()
                        if any(rid in line for rid, *_ in unfinished)]
            raise RuntimeError(f"lightning-queue: {len(done)}/{n} finished, {len(bad)} not succeeded: "
                               f"{[(r.rollout_id, r.status, r.error) for r in bad[:3]]}; unfinished: {unfinished}; "
                               "worker log lines about them:\n" + "\n".join(mentions[-20:]))
        return elapsed, done

    def bare_run(self, n: int, timeout: float = 600.0) -> tuple[float, list[Any]]:
        """``apply_async`` ``n`` times and ``ResultSet.get`` (the Redis backend's pub/sub join)."""
        from celery.result import ResultSet

        start = time.perf_counter()
        results = ResultSet([self.noop.apply_async(queue=self.bare_queue) for _ in range(n)], app=self.bare)
        values = results.get(timeout=timeout)
        elapsed = time.perf_counter() - start
        if len(values) != n:
            raise RuntimeError(f"bare Celery: {len(values)}/{n} results")
        return elapsed, [r.id for r in results.results]

    def close(self) -> None:
        self.bare.pool.force_close_all()
        self.client.celery.pool.force_close_all()
        self.client.close()
        self.redis.close()

    def delete_keys(self) -> int:
        deleted = 0
        for pattern in (f"{self.prefix}*", f"_kombu.binding.{self.prefix}*"):
            keys = list(self.redis.scan_iter(match=pattern, count=1000))
            for i in range(0, len(keys), 500):
                deleted += self.redis.delete(*keys[i:i + 500])
        return deleted


# -- measurements ------------------------------------------------------------------------------------------------


def overhead(b: Bench, rows: list[Row]) -> dict[str, Any]:
    """(1) end-to-end rollouts/s, 2 prefork processes each side; (3) commandstats over the last round."""
    n, rounds = (200, 2) if b.quick else (2000, 3)
    rates: dict[str, list[float]] = {"lq": [], "bare": []}
    deltas: dict[str, dict[str, int]] = {}
    cpu: dict[str, list[float]] = {"lq": [], "bare": []}
    last: dict[str, list[Any]] = {}
    with b.lq_workers(2), b.bare_workers(2):
        b.lq_run(50)  # warm-up: connections, imports, snapshot caches, scripts loaded
        b.bare_run(50)
        for i in range(rounds):
            sides: list[tuple[str, Callable[[int], tuple[float, list[Any]]]]] = [("lq", b.lq_run), ("bare", b.bare_run)]
            for side, run in sides if i % 2 == 0 else sides[::-1]:  # alternate who goes first
                before, cpu_before = calls_now(b.redis), cpu_now(b.redis)
                elapsed, done = run(n)
                deltas[side] = calls_delta(before, calls_now(b.redis))
                cpu[side].append((cpu_now(b.redis) - cpu_before) / n)
                rates[side].append(n / elapsed)
                last[side] = done
        latencies = latency(b)
    lq, bare = statistics.median(rates["lq"]), statistics.median(rates["bare"])
    rows.append((f"end to end, no-op, 2 prefork procs: lightning-queue ({n} x {rounds}, median)",
                 f"{lq:,.0f} rollouts/s  (rounds: {', '.join(f'{r:.0f}' for r in rates['lq'])})", ""))
    rows.append(("end to end, no-op, 2 prefork procs: bare Celery, Redis result backend, ResultSet.get",
                 f"{bare:,.0f} tasks/s  (rounds: {', '.join(f'{r:.0f}' for r in rates['bare'])})", ""))
    rows.append(("  ratio lightning-queue / bare Celery", f"{lq / bare:.2f}x", ">= 0.8x"))
    lq_cpu, bare_cpu = statistics.median(cpu["lq"]), statistics.median(cpu["bare"])
    rows.append(("Redis server CPU per rollout (median of rounds): lightning-queue / bare Celery",
                 f"{lq_cpu * 1e6:.0f} µs / {bare_cpu * 1e6:.0f} µs: one Redis core ~{1 / lq_cpu:,.0f} rollouts/s", ""))
    for side, label in (("lq", "lightning-queue"), ("bare", "bare Celery")):
        total = sum(deltas[side].values())
        rows.append((f"Redis commands per rollout, every one (Lua-internal too), {label}", f"{total / n:.1f}", ""))
        rows.append(("  by command", split_per_item(deltas[side], n), ""))
    return {"lq_done": last["lq"], "bare_done": last["bare"], "latencies": latencies,
            "lq_commands": sum(deltas["lq"].values()) / n, "bare_commands": sum(deltas["bare"].values()) / n}


def memory_bytes(b: Bench, rollout_ids: Sequence[str]) -> dict[str, float]:
    """Mean bytes of Redis memory per finished rollout (``MEMORY USAGE``, exact): its record,
    its attempts, its entries in the five indexes every finished rollout is in, and the
    payload stored in them (input and result fields), which ``total`` leaves out."""
    k, r = b.settings.keys, b.redis
    record = payload = attempts = 0
    for rid in rollout_ids:
        key = k.rollout(rid)
        record += r.memory_usage(key, samples=0) or 0
        payload += sum(r.hstrlen(key, f) for f in ("input", "result"))
        for seq in range(1, int(r.hget(key, "attempt_count") or 0) + 1):
            attempts += r.memory_usage(k.attempt(rid, seq), samples=0) or 0
            payload += r.hstrlen(k.attempt(rid, seq), "result")
    attempt = b.client.get_attempts(rollout_ids[0])[0]
    indexes = [k.rollouts, k.rollouts_by_status("succeeded"), k.rollouts_by_mode("train"),
               k.rollouts_by_resources(attempt.resources_id or ""), k.rollouts_by_worker(attempt.worker_id)]
    index = sum((r.memory_usage(i, samples=0) or 0) / max(1, r.zcard(i)) for i in indexes)
    m = len(rollout_ids)
    out = {"record": record / m, "attempts": attempts / m, "index": index, "payload": payload / m}
    out["total"] = out["record"] + out["attempts"] + out["index"] - out["payload"]
    return out


def memory_row(label: str, mem: dict[str, float], target: str = "") -> Row:
    return (label, (f"{mem['total']:,.0f} B  (record {mem['record']:,.0f} + attempt {mem['attempts']:,.0f} + "
                    f"5 index entries {mem['index']:,.0f} - payload {mem['payload']:,.0f})"), target)


def memory(b: Bench, rows: list[Row], done: list[Any], bare_ids: Sequence[str]) -> None:
    """(3) bytes of Redis memory per finished rollout, besides its payload; bare Celery's result."""
    rows.append(memory_row("Redis memory per finished rollout, besides its payload",
                           memory_bytes(b, [r.rollout_id for r in done[:200]]), "< 2 KB"))
    meta = [b.redis.memory_usage(f"{b.prefix}-bare:celery-task-meta-{tid}", samples=0) or 0 for tid in bare_ids[:200]]
    rows.append(("  bare Celery's result (celery-task-meta key), for comparison",
                 f"{statistics.mean(meta):,.0f} B" if meta else "n/a", ""))


def run_steps(b: Bench, m: int) -> tuple[list[str], dict[str, list[float]], dict[str, int]]:
    """Take ``m`` fresh rollouts through the runner's Redis steps on a snapshot-cache hit, one
    at a time, in this process: the claim that also starts the attempt (and returns the record),
    then the finish. Their ids, each step's durations and the commands Redis ran for them."""
    from lightning_queue.core.models import Rollout, RolloutResult
    from lightning_queue.storage.store import StartWith

    store = b.client.store
    rollouts = [Rollout(input={"i": i}) for i in range(m)]
    mark = store.create_rollouts(rollouts)
    result = RolloutResult(output={"end": time.time()})
    start = StartWith(requested_id=None, requested_version=None, resources_id="bench", version=1, epoch=mark.epoch)
    steps: dict[str, list[float]] = {"claim + start (EVALSHA)": [], "finish_attempt (EVALSHA)": []}
    timers = list(steps.values())
    before = calls_now(b.redis)
    for rollout in rollouts:
        t0 = time.perf_counter()
        claim = store.claim(rollout.rollout_id, "bench@host", start)
        t1 = time.perf_counter()
        if not claim.started:
            raise RuntimeError(f"rollout {rollout.rollout_id}: the claim did not start the attempt ({claim})")
        store.finish_attempt(rollout.rollout_id, claim.sequence_id, "succeeded", "succeeded", result=result)
        t2 = time.perf_counter()
        for timer, begin, end in zip(timers, (t0, t1), (t1, t2), strict=True):
            timer.append(end - begin)
    return [r.rollout_id for r in rollouts], steps, calls_delta(before, calls_now(b.redis))


def worker_steps(b: Bench, rows: list[Row], lq_commands: float, bare_commands: float) -> None:
    """What one rollout costs a worker in Redis, step by step: the runner's round trips on a
    snapshot-cache hit (claim + start, finish) timed in this process, and the commands Redis
    runs for them, top-level and inside the Lua scripts (``INFO commandstats`` counts both)."""
    m = 100 if b.quick else 1000
    _, steps, delta = run_steps(b, m)
    top = delta.get("evalsha", 0)
    inside = sum(delta.values()) - top
    rows.append((f"worker round trips per rollout, in process ({m} rollouts, one at a time)",
                 f"{top / m:.0f} round trips, {sum(delta.values()) / m:.1f} commands "
                 f"({inside / m:.1f} inside Lua scripts)",
                 ""))
    for name, samples in steps.items():
        rows.append((f"  {name}", f"median {statistics.median(samples) * 1e3:.3f} ms", ""))
    outside = lq_commands - inside / m
    rows.append(("Redis commands per rollout outside Lua scripts: lightning-queue / bare Celery",
                 f"{outside:.1f} / {bare_commands:.1f} ({outside - bare_commands:+.1f})", "Celery's + a handful"))


def memory_tuned(b: Bench, rows: list[Row], own_server: bool) -> None:
    """Memory per finished rollout when Redis keeps hashes with values up to 256 bytes as
    listpacks (default 64). A no-op rollout's fields all fit under 64 bytes, so this changes
    little here; a record with a longer input, metadata value or result becomes a hash table,
    about twice the size, unless the limit is raised."""
    label = "  the same with hash-max-listpack-value 256"
    if not own_server:
        rows.append((label, "n/a: not changing the config of a server given with --redis-url", ""))
        return
    previous = b.redis.config_get("hash-max-listpack-value")["hash-max-listpack-value"]
    b.redis.config_set("hash-max-listpack-value", 256)
    try:
        ids, _, _ = run_steps(b, 200)
    finally:
        b.redis.config_set("hash-max-listpack-value", previous)
    rows.append(memory_row(label, memory_bytes(b, ids), "< 2 KB"))


def batch_enqueue(b: Bench, rows: list[Row]) -> None:
    """(2) one client enqueues a batch; no worker listens on the sink queues."""
    n = 1000 if b.quick else 10_000
    sink = f"{b.prefix}-sink"
    b.client.enqueue_rollouts([{"warm": 1}], queue=sink)
    b.noop.apply_async(queue=f"{sink}-bare", ignore_result=True)
    start = time.perf_counter()
    b.client.enqueue_rollouts([{"i": i} for i in range(n)], queue=sink)
    lq = n / (time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(n):
        b.noop.apply_async(queue=f"{sink}-bare", ignore_result=True)
    loop = n / (time.perf_counter() - start)
    rows.append((f"batch enqueue of {n:,}: enqueue_rollouts", f"{lq:,.0f} rollouts/s", ""))
    rows.append((f"  plain apply_async loop of {n:,} (ignore_result=True)", f"{loop:,.0f} tasks/s", ""))
    rows.append(("  ratio enqueue_rollouts / apply_async loop", f"{lq / loop:.1f}x", ">= 10x"))


def latency(b: Bench) -> tuple[list[float], list[float]]:
    """(4) agent return -> the caller has the result, one rollout at a time (seconds), on
    running workers: lightning-queue's and bare Celery's."""
    n = 30 if b.quick else 300
    lq: list[float] = []
    bare: list[float] = []
    for i in range(n + 5):
        rollout = b.client.enqueue_rollout({"i": i})
        done = b.client.wait_for_rollouts([rollout.rollout_id], timeout=60)
        returned = time.time()
        value = b.noop.apply_async(queue=b.bare_queue).get(timeout=60)
        bare_returned = time.time()
        if i >= 5:  # the first few warm connections and caches up
            lq.append(returned - done[0].result.output["end"])
            bare.append(bare_returned - value)
    return lq, bare


def latency_rows(rows: list[Row], lq: list[float], bare: list[float]) -> None:
    rows.append((f"result latency, agent return -> wait_for_rollouts ({len(lq)} sequential)",
                 f"p50 {percentile(lq, 0.5) * 1e3:.2f} ms, p99 {percentile(lq, 0.99) * 1e3:.2f} ms", "p50 < 5 ms"))
    rows.append(("  bare Celery, task return -> AsyncResult.get",
                 f"p50 {percentile(bare, 0.5) * 1e3:.2f} ms, p99 {percentile(bare, 0.99) * 1e3:.2f} ms", ""))


def wait_cache_hits(b: Bench, hostname: str, timeout: float = 10.0) -> dict[str, Any]:
    """The snapshot-cache stats the worker's processes reported (summed), once some hit."""
    deadline = time.monotonic() + timeout
    total: dict[str, Any] = {"hits": 0, "misses": 0, "processes": 0}
    while time.monotonic() < deadline:
        stats = {name: s for name, s in b.client.cache_stats().items() if name.startswith(hostname)}
        total = {"hits": sum(s.get("hits", 0) for s in stats.values()),
                 "misses": sum(s.get("misses", 0) for s in stats.values()), "processes": len(stats)}
        if total["hits"]:
            break
        time.sleep(0.25)
    return total


def scaling(b: Bench, rows: list[Row]) -> None:
    """(5) no-op rollouts/s by prefork processes; 50 ms agents on a thread and a gevent pool."""
    n = 150 if b.quick else 1500
    for procs in (1, 2, 4):
        with b.lq_workers(procs):
            b.lq_run(20)
            elapsed, _ = b.lq_run(n)
        rows.append((f"scaling, no-op, {procs} prefork process{'es' if procs > 1 else ''}",
                     f"{n / elapsed:,.0f} rollouts/s", ""))
    pools = ["threads"]
    try:
        import gevent  # noqa: F401

        if b.quick:
            rows.append(("scaling, gevent pool", "skipped in --quick", ""))
        else:
            pools.append("gevent")
    except ImportError:
        rows.append(("scaling, gevent pool", "skipped: gevent not installed (pip install '.[bench]')", ""))
    concurrency = 100 if b.quick else 200
    n = 400 if b.quick else 4000
    for pool in pools:
        with b.lq_workers(concurrency, "sleeper", pool) as worker:
            b.lq_run(concurrency)
            elapsed, done = b.lq_run(n)
            slow_elapsed, slow_done = b.lq_run(2 * concurrency, sleep=1.0)
            cache = wait_cache_hits(b, worker.hostname)
        for label, took, finished in (("50 ms", elapsed, done), ("1 s", slow_elapsed, slow_done)):
            peak, mean = in_flight([(r.result.output["pid"], r.result.output["start"], r.result.output["end"])
                                    for r in finished], took)
            rows.append((f"scaling, {label} agents, 1 process, --pool {pool} --concurrency {concurrency}",
                         f"{len(finished) / took:,.0f} rollouts/s, in flight max {peak}, mean {mean:.0f}",
                         ">= 100 in flight"))
        rows.append((f"  {pool} pool: rollouts all succeeded; its snapshot cache",
                     f"hits {cache['hits']:,}, misses {cache['misses']:,} ({cache['processes']} cache)", "hits > 0"))
    with b.bare_workers(concurrency, "threads"):
        from celery.result import ResultSet

        sleeper = b.bare.tasks["bench.sleeper"]
        ResultSet([sleeper.apply_async(queue=b.bare_queue) for _ in range(concurrency)], app=b.bare).get(timeout=600)
        start = time.perf_counter()
        values = ResultSet([sleeper.apply_async(queue=b.bare_queue) for _ in range(n)], app=b.bare).get(timeout=600)
        took = time.perf_counter() - start
    peak, mean = in_flight([(pid, s, e) for s, e, pid in values], took)
    rows.append((f"  bare Celery, 50 ms task, --pool threads --concurrency {concurrency}",
                 f"{n / took:,.0f} tasks/s, in flight max {peak}, mean {mean:.0f}", ""))


def in_flight(runs: Sequence[tuple[int, float, float]], elapsed: float) -> tuple[int, float]:
    """``(pid, start, end)`` of each run -> the most running at once in one process, and the
    mean number running over ``elapsed`` (Little's law: busy time / elapsed)."""
    by_pid: dict[int, list[tuple[float, float]]] = {}
    for pid, start, end in runs:
        by_pid.setdefault(pid, []).append((start, end))
    peak = max(max_in_flight(v) for v in by_pid.values())
    return peak, sum(end - start for _, start, end in runs) / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rollouts and rounds (a smoke run, ~1 min)")
    parser.add_argument("--redis-url", help="use this Redis instead of starting a redis-server of our own")
    args = parser.parse_args()
    # Stopped with SIGTERM: unwind, so the workers and the redis-server started here stop too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    server = None
    if args.redis_url:
        if not ping(args.redis_url):
            raise SystemExit(f"no Redis answers at {args.redis_url}")
        url = args.redis_url
    else:
        server = own_redis()
        url = server.url
    info = redis.Redis.from_url(url).info("server")
    print(f"Redis {info.get('redis_version')} at {url} ({'own redis-server' if server else 'given'}), "
          f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs{', quick run' if args.quick else ''}\n",
          flush=True)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="lq-bench-") as logdir:
        b = Bench(url, args.quick, logdir)
        try:
            last = overhead(b, rows)
            memory(b, rows, last["lq_done"], last["bare_done"])
            memory_tuned(b, rows, server is not None)
            worker_steps(b, rows, last["lq_commands"], last["bare_commands"])
            batch_enqueue(b, rows)
            latency_rows(rows, *last["latencies"])
            scaling(b, rows)
        finally:
            deleted = b.delete_keys() if not server else 0
            b.close()
            if server:
                server.stop()
    print(format_table(rows))
    if not server:
        print(f"\n(deleted the {deleted} keys under {b.prefix})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
