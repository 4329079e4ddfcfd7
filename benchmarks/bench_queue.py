"""Queue performance against bare Celery, measured side by side in one run.

    python benchmarks/bench_queue.py [--quick] [--json out.json] [--only e2e,latency,...] [--redis-url URL]

Starts its own ``redis-server`` (no persistence, a temp dir, a free port) so ``INFO``
counters and memory see nothing but this benchmark; with ``--redis-url`` it uses that
server instead (its counters then include whatever else runs there). Real ``celery
worker`` processes run both sides with the same settings (2 prefork processes, acks late,
prefetch 1, log level WARNING, task events on unless a row says otherwise):
lightning-queue's app with the agents in ``bench_agents.py``, the bare Celery app in
``bare_celery.py``. Each row is printed as soon as it is measured; every wait has a
deadline, and a wait that runs out prints what did not finish instead of hanging. The
method and the latest numbers: ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # bare_celery and bench_agents, as the workers import them

from lightning_queue import LightningClient, PromptTemplate, Settings
from lightning_queue.ops.embedded import EmbeddedRedis
from lightning_queue.ops.fleet import WorkerProcess, worker_env
from lightning_queue.storage.connections import ping

SECTIONS = ("e2e", "latency", "steps", "enqueue", "inflight", "events_off", "memory")
"""What ``--only`` selects: end to end (with memory, CPU and round trips per rollout), one rollout
at a time, the worker's Redis steps in process, enqueue rates, rollouts in flight per process,
end to end with task events off (full runs only), and lightning-queue's memory per rollout alone
(``memory``: not in a default run, e2e measures it too; memory is deterministic, so one side and
no alternation suffice to compare two code trees)."""

# -- pure helpers (unit-tested in tests/unit/test_bench_helpers.py) ---------------------------------------------


def command_calls(commandstats: Mapping[str, Any] | str) -> dict[str, int]:
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
                ignore: Sequence[str] = ("info", "memory|usage", "config|resetstat", "scan")) -> dict[str, int]:
    """Calls per command made between two :func:`command_calls` snapshots (the benchmark's
    own look-ups left out), largest first, zeros dropped."""
    delta = {name: calls - before.get(name, 0) for name, calls in after.items() if name not in ignore}
    return dict(sorted(((n, c) for n, c in delta.items() if c > 0), key=lambda item: (-item[1], item[0])))


def split_per_item(delta: Mapping[str, float], items: int, top: int = 8) -> str:
    """``"evalsha 3.00, publish 2.00, ..."``: the largest entries per item, the rest summed as ``other``."""
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


def in_flight(runs: Sequence[tuple[int, float, float]], elapsed: float) -> tuple[int, float]:
    """``(pid, start, end)`` of each run -> the most running at once in one process, and the
    mean number running over ``elapsed`` (Little's law: busy time / elapsed)."""
    by_pid: dict[int, list[tuple[float, float]]] = {}
    for pid, start, end in runs:
        by_pid.setdefault(pid, []).append((start, end))
    peak = max((max_in_flight(v) for v in by_pid.values()), default=0)
    return peak, sum(end - start for _, start, end in runs) / elapsed


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) by the nearest-rank rule."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def key_pattern(key: str, prefixes: Sequence[str]) -> str:
    """A key's type: each of ``prefixes`` (longest first) as ``{p}``, ids (16+ hex digits or a
    uuid) as ``<id>``, other digit runs as ``N``: ``{p}:rollout:<id>:attempt:N``."""
    for i, prefix in sorted(enumerate(prefixes), key=lambda item: -len(item[1])):
        key = key.replace(prefix, "{p}" if i == 0 else f"{{p{i}}}")
    key = re.sub(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{16,}", "<id>", key)
    return re.sub(r"\d+", "N", key)


def memory_split(before: Mapping[str, int], after: Mapping[str, int], prefixes: Sequence[str]) -> dict[str, int]:
    """``MEMORY USAGE`` growth by key type (:func:`key_pattern`) between two ``{key: bytes}``
    snapshots: new keys whole, keys present in both by their growth; largest first."""
    growth: Counter[str] = Counter()
    for key, size in after.items():
        growth[key_pattern(key, prefixes)] += size - before.get(key, 0)
    for key, size in before.items():
        if key not in after:
            growth[key_pattern(key, prefixes)] -= size
    return dict(sorted(((k, v) for k, v in growth.items() if v), key=lambda item: -abs(item[1])))


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


Row = tuple[str, str, str]
"""(measure, result, target): a row of the other benchmarks that print this table (bench_traces.py)."""


def format_table(rows: Sequence[Mapping[str, Any] | Row]) -> str:
    """Rows (:class:`Report` rows or :data:`Row` tuples) as aligned columns."""
    rows = [r if isinstance(r, Mapping) else dict(zip(("measure", "result", "target"), r, strict=True)) for r in rows]
    width = max(len(r["measure"]) for r in rows)
    rwidth = max(len(r["result"]) for r in rows)
    lines = [f"{'measure':<{width}}  {'result':<{rwidth}}  target", f"{'-' * width}  {'-' * rwidth}  ------"]
    lines += [f"{r['measure']:<{width}}  {r['result']:<{rwidth}}  {r['target']}".rstrip() for r in rows]
    return "\n".join(lines)


class Report:
    """The rows and results of one run: each row printed as soon as it is measured, and the
    whole report written to ``json_path`` (when given) after every row, so a run that dies
    still leaves what it measured."""

    def __init__(self, json_path: str | None = None) -> None:
        self.json_path = json_path
        self.meta: dict[str, Any] = {}
        self.rows: list[dict[str, Any]] = []
        self.results: dict[str, Any] = {}
        self.errors: list[dict[str, str]] = []
        self.section = ""

    def row(self, measure: str, result: str, target: str = "", **values: Any) -> None:
        self.rows.append({"section": self.section, "measure": measure, "result": result, "target": target,
                          "values": values})
        print(f"{measure}: {result}" + (f"   [target {target}]" if target else ""), flush=True)
        self.save()

    def result(self, name: str, value: Any) -> None:
        self.results.setdefault(self.section, {})[name] = value
        self.save()

    def error(self, message: str) -> None:
        self.errors.append({"section": self.section, "error": message})
        print(f"!! {self.section}: {message}", flush=True)
        self.save()

    def as_dict(self) -> dict[str, Any]:
        return {"meta": self.meta, "rows": self.rows, "results": self.results, "errors": self.errors,
                "ok": not self.errors}

    def save(self) -> None:
        if self.json_path:
            tmp = f"{self.json_path}.tmp"
            with open(tmp, "w") as out:
                json.dump(self.as_dict(), out, indent=1, default=str)
            os.replace(tmp, self.json_path)


class Stuck(Exception):
    """A wait ran out: the message says what did not finish."""


# -- meters ------------------------------------------------------------------------------------------------------


class Sends:
    """Round trips this process makes to Redis, counted client-side: every ``send_packed_command``
    of redis-py (one per command, or one per pipeline: a pipeline's commands go out together)."""

    count = 0
    _installed = False

    @classmethod
    def install(cls) -> None:
        if cls._installed:
            return
        from redis.connection import AbstractConnection

        original = AbstractConnection.send_packed_command

        def counted(self: Any, command: Any, check_health: bool = True) -> Any:
            cls.count += 1
            return original(self, command, check_health)

        AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]
        cls._installed = True


def process_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) of a process and of its live children (a worker's pool)."""
    try:
        proc = psutil.Process(pid)
        times = proc.cpu_times()
        children = proc.children(recursive=True)
    except psutil.Error:
        return 0.0, 0.0
    pool = 0.0
    for child in children:
        try:
            t = child.cpu_times()
            pool += t.user + t.system
        except psutil.Error:
            pass
    return times.user + times.system, pool


@dataclass
class Meters:
    """One reading of everything a measured window is charged with."""

    worker_main: float
    pool: float
    redis_cpu: float
    caller: float
    reads: int  # Redis's total_reads_processed: read events, i.e. requests arriving (a pipeline: one)
    commands: dict[str, int]
    sends: int  # this process's round trips (Sends)

    @classmethod
    def read(cls, r: redis.Redis, worker_pid: int | None) -> Meters:
        main, pool = process_cpu(worker_pid) if worker_pid else (0.0, 0.0)
        me = time.process_time()  # this process, every thread, at the clock's resolution (psutil's: 10 ms)
        sends = Sends.count
        info = r.info("everything")
        return cls(main, pool, float(info["used_cpu_user"]) + float(info["used_cpu_sys"]), me,
                   int(info.get("total_reads_processed", 0)), command_calls(info), sends)

    def per_item(self, before: Meters, n: int) -> dict[str, Any]:
        """What the window cost per item: CPU in µs by process, round trips, commands."""
        us = 1e6 / n
        # The readings themselves: the closing reading's INFO (a request Redis counted, a send).
        return {"cpu_us": {"worker_main": (self.worker_main - before.worker_main) * us,
                           "worker_pool": (self.pool - before.pool) * us,
                           "redis": (self.redis_cpu - before.redis_cpu) * us,
                           "caller": (self.caller - before.caller) * us},
                "reads": (self.reads - before.reads - 1) / n,
                "caller_round_trips": (self.sends - before.sends - 1) / n,
                "commands": {k: v / n for k, v in calls_delta(before.commands, self.commands).items()}}


def used_memory(r: redis.Redis, settle: float = 2.0) -> int:
    """Redis's ``used_memory`` once it holds still (two readings 50 ms apart within 1 KB; at most
    ``settle`` seconds): client buffers and pub/sub subscriptions wind down a moment after a burst."""
    last = int(r.info("memory")["used_memory"])
    deadline = time.monotonic() + settle
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = int(r.info("memory")["used_memory"])
        if abs(now - last) < 1024:
            return now
        last = now
    return last


def memory_by_key(r: redis.Redis, match: str) -> dict[str, int]:
    """``{key: MEMORY USAGE}`` of every key matching ``match``."""
    keys = [k.decode() if isinstance(k, bytes) else k for k in r.scan_iter(match=match, count=2000)]
    sizes: dict[str, int] = {}
    for start in range(0, len(keys), 1000):
        chunk = keys[start:start + 1000]
        with r.pipeline(transaction=False) as pipe:
            for key in chunk:
                pipe.memory_usage(key, samples=0)
            sizes.update((k, int(v or 0)) for k, v in zip(chunk, pipe.execute(), strict=True))
    return sizes


# -- Redis and workers -------------------------------------------------------------------------------------------


def own_redis() -> EmbeddedRedis:
    """A fresh ``redis-server`` of our own, so its counters hold only this benchmark."""
    if not shutil.which("redis-server"):
        raise SystemExit("bench_queue needs redis-server on PATH, or --redis-url of a server to use")
    return EmbeddedRedis.start(prefer_binary=True)


def redis_for(url: str | None) -> tuple[str, EmbeddedRedis | None]:
    """The Redis a benchmark runs on: ``url`` when given (it must answer), else :func:`own_redis`;
    and the server started here (None for a given one), for the caller to stop."""
    if url:
        if not ping(url):
            raise SystemExit(f"no Redis answers at {url}")
        return url, None
    server = own_redis()
    return server.url, server


@dataclass
class Worker:
    """One ``celery worker`` this benchmark started, named ``hostname``."""

    hostname: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.alive:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


def start_worker(app: str, env: dict[str, str], queue: str, concurrency: int, pool: str, name: str,
                 logdir: str, loglevel: str = "WARNING") -> Worker:
    """Start ``celery -A app worker`` (log level WARNING, as a production worker) without waiting."""
    hostname = f"{name}-{uuid.uuid4().hex[:6]}@bench"
    log_path = Path(logdir) / f"{name}-{uuid.uuid4().hex[:6]}.log"
    argv = [sys.executable, "-m", "celery", "-A", app, "worker", "--hostname", hostname, "--pool", pool,
            "--concurrency", str(concurrency), "-Q", queue, "--without-mingle", "--without-gossip",
            "--loglevel", loglevel]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, env=env, cwd=str(HERE), stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    return Worker(hostname, process, log_path)


def wait_ready(control_app: Any, worker: Worker, timeout: float = 90.0) -> None:
    """Until the worker answers a remote-control ping (its log says nothing at WARNING)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not worker.alive:
            raise RuntimeError(f"worker {worker.hostname} exited at start:\n{worker.log_tail(40)}")
        if control_app.control.ping(destination=[worker.hostname], timeout=0.5):
            return
    raise RuntimeError(f"worker {worker.hostname} did not answer a ping within {timeout:g} s:\n{worker.log_tail(40)}")


def cpu_now(client: redis.Redis) -> float:
    """CPU seconds the Redis server process has used (user + system)."""
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


@contextmanager
def workers(app: str, env: dict[str, str], queue: str, concurrency: int, pool: str = "prefork", name: str = "w",
            logdir: str = "", timeout: float = 90.0) -> Iterator[WorkerProcess]:
    """One worker logging at INFO, ready once its log says so, stopped on exit: for bench_traces.py,
    which reads the task times Celery logs at INFO (this benchmark's workers log at WARNING)."""
    worker = start_worker(app, env, queue, concurrency, pool, name, logdir, loglevel="INFO")
    logged = WorkerProcess(name, worker.process, worker.log_path)
    try:
        deadline = time.monotonic() + timeout
        while not logged.ready:
            if not worker.alive or time.monotonic() > deadline:
                raise RuntimeError(f"worker {name} ({pool} x{concurrency}) did not start:\n{worker.log_tail(40)}")
            time.sleep(0.1)
        yield logged
    finally:
        worker.stop()


def control(app: Any, worker: Worker, command: str, queue: str) -> None:
    """``add_consumer``/``cancel_consumer`` of ``queue`` on ``worker``, waiting for its reply."""
    replies = getattr(app.control, command)(queue, destination=[worker.hostname], reply=True, timeout=10)
    if not replies:
        raise Stuck(f"{worker.hostname} did not answer {command}({queue!r}) within 10 s (alive: {worker.alive})\n"
                    f"{worker.log_tail()}")


# -- the two sides -----------------------------------------------------------------------------------------------


@dataclass
class Side:
    """One side of a comparison: how it sends ``n`` no-ops to a queue and waits for them."""

    key: str  # "lq" | "bare"
    label: str
    control_app: Any
    broker_prefix: str  # its broker keys' prefix: queues and the unacked hash live under it
    enqueue: Callable[[int, str], Any]
    wait: Callable[[Any, float], None]  # raises Stuck, saying what did not finish
    worker: Worker | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Bench:
    """Both sides on one Redis: lightning-queue under ``prefix``, bare Celery under ``prefix-bare``."""

    def __init__(self, url: str, quick: bool, logdir: str, timeout: float) -> None:
        self.url, self.quick, self.logdir, self.timeout = url, quick, logdir, timeout
        self.prefix = f"lqbench-{uuid.uuid4().hex[:8]}"
        self.settings = Settings(redis_url=url, key_prefix=self.prefix, queue=f"{self.prefix}-q",
                                 cache_stats_interval_seconds=1.0)
        self.client = LightningClient(self.settings)
        self.client.add_resources({"prompt": PromptTemplate(template="{question}")}, "bench")
        self.redis = redis.Redis.from_url(url)
        self.bare_prefix = f"{self.prefix}-bare"
        # The bare workers build their app from these at import; they inherit them from this process.
        os.environ["BENCH_REDIS_URL"], os.environ["BENCH_PREFIX"] = url, self.bare_prefix
        import bare_celery

        self.bare = bare_celery.make_app(url, self.bare_prefix)
        self.bare_queue = f"{self.bare_prefix}-q"
        self.noop = self.bare.tasks["bench.noop"]
        self.rounds = 0
        self._default: dict[str, Worker] | None = None
        self._default_stack = ExitStack()

    # -- workers

    def lq_env(self, agent: str, events: bool = True) -> dict[str, str]:
        settings = self.settings
        if not events:
            settings = settings.model_copy(update={"celery": {"worker_send_task_events": False,
                                                              "task_send_sent_event": False}})
        return worker_env(settings, f"bench_agents:{agent}", [str(HERE), str(REPO)])

    def bare_env(self, events: bool = True) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), str(REPO), env.get("PYTHONPATH")]))
        env["BENCH_EVENTS"] = "1" if events else "0"
        return env

    @contextmanager
    def workers(self, concurrency: int, pool: str = "prefork", agent: str = "noop", events: bool = True,
                sides: Sequence[str] = ("lq", "bare")) -> Iterator[dict[str, Worker]]:
        """A lightning-queue worker and a bare Celery one (``concurrency`` slots of ``pool`` each),
        started together, stopped on exit."""
        tag = f"{pool}{concurrency}{'' if events else '-noev'}"
        started: dict[str, Worker] = {}
        try:
            if "lq" in sides:
                started["lq"] = start_worker("lightning_queue.app", self.lq_env(agent, events), self.settings.queue,
                                             concurrency, pool, f"lq-{tag}", self.logdir)
            if "bare" in sides:
                started["bare"] = start_worker("bare_celery", self.bare_env(events), self.bare_queue, concurrency,
                                               pool, f"bare-{tag}", self.logdir)
            for key, worker in started.items():
                wait_ready(self.client.celery if key == "lq" else self.bare, worker)
            yield started
        finally:
            for worker in started.values():
                worker.stop()

    def default_workers(self) -> dict[str, Worker]:
        """Both sides' workers with 2 prefork processes and task events on, started on first use
        and shared by the sections that use them (a start costs seconds)."""
        if self._default is None:
            self._default = self._default_stack.enter_context(self.workers(2))
        return self._default

    def stop_default_workers(self) -> None:
        self._default_stack.close()
        self._default = None

    def sides(self, started: Mapping[str, Worker], task: Mapping[str, Any] | None = None) -> list[Side]:
        task = dict(task or {})
        sleeper = self.bare.tasks["bench.sleeper"]
        bare_task = sleeper if task else self.noop
        lq = Side("lq", "lightning-queue", self.client.celery, self.settings.keys.celery_prefix,
                  lambda n, queue: [r.rollout_id for r in
                                    self.client.enqueue_rollouts([{"i": i, **task} for i in range(n)], queue=queue)],
                  self.lq_wait, started.get("lq"))
        bare = Side("bare", "bare Celery", self.bare, f"{self.bare_prefix}:celery:",
                    lambda n, queue: self.bare_send(bare_task, n, queue), self.bare_wait, started.get("bare"))
        return [s for s in (lq, bare) if s.worker is not None]

    # -- lightning-queue

    def lq_wait(self, ids: list[str], timeout: float) -> None:
        done = self.client.wait_for_rollouts(ids, timeout=timeout)
        bad = [r for r in done if r.status != "succeeded"]
        if len(done) != len(ids) or bad:
            raise Stuck(self.lq_diagnosis(ids, f"{len(done)}/{len(ids)} finished within {timeout:g} s, "
                                               f"{len(bad)} of them not succeeded"))

    def lq_diagnosis(self, ids: Sequence[str], headline: str) -> str:
        lines = [f"lightning-queue: {headline}"]
        try:
            rollouts = self.client.get_rollouts(list(ids))
            lines.append(f"  statuses: {dict(Counter(r.status for r in rollouts))}")
            for r in [r for r in rollouts if r.status != "succeeded"][:5]:
                attempts = [(a.status, a.worker_id) for a in self.client.get_attempts(r.rollout_id)]
                lines.append(f"  {r.rollout_id}: {r.status}, queue {r.queue}, attempts {attempts}, error {r.error}")
        except Exception as exc:  # noqa: BLE001 - a diagnosis must not fail on what it diagnoses
            lines.append(f"  (could not read the rollouts: {exc!r})")
        lines.append(self.broker_state(self.settings.keys.celery_prefix))
        return "\n".join(lines)

    # -- bare Celery

    def bare_send(self, task: Any, n: int, queue: str) -> Any:
        from celery.result import ResultSet

        return ResultSet([task.apply_async(queue=queue) for _ in range(n)], app=self.bare)

    def bare_wait(self, results: Any, timeout: float) -> None:
        from celery.exceptions import TimeoutError as CeleryTimeout

        try:
            values = results.get(timeout=timeout)
        except CeleryTimeout:
            ids = [r.id for r in results.results]
            with self.redis.pipeline(transaction=False) as pipe:
                for rid in ids:
                    pipe.exists(f"{self.bare_prefix}:celery-task-meta-{rid}")
                ready = sum(pipe.execute())
            raise Stuck(f"bare Celery: {ready}/{len(ids)} results stored within {timeout:g} s\n"
                        + self.broker_state(f"{self.bare_prefix}:celery:")) from None
        if len(values) != len(results.results):
            raise Stuck(f"bare Celery: {len(values)}/{len(results.results)} results")
        results.values = values  # the sleeper's stamps, for the in-flight rows

    def broker_state(self, broker_prefix: str) -> str:
        """Queue lengths and unacked messages under one side's broker prefix."""
        r = self.redis
        queues = {k.decode()[len(broker_prefix):]: r.llen(k) for k in r.scan_iter(match=f"{broker_prefix}*")
                  if r.type(k) == b"list"}
        return (f"  queues {queues}, unacked {r.hlen(broker_prefix + 'unacked')}, "
                f"unacked index {r.zcard(broker_prefix + 'unacked_index')}")

    def drain(self, side: Side, timeout: float = 10.0) -> bool:
        """Until the side holds no unacked message (acks follow results by a moment); False at the deadline."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.redis.hlen(side.broker_prefix + "unacked"):
                return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        self.stop_default_workers()
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


def consume_round(b: Bench, side: Side, n: int, breakdown: bool = False) -> dict[str, Any]:
    """``n`` no-ops queued to a fresh queue the side's worker does not read yet (memory per queued
    item), then the worker told to read it (``add_consumer``) and the caller waiting for every
    result: the measured window. Nothing is sent inside it, so neither side's sending is charged
    to it. Memory per finished item once the worker has acked everything."""
    assert side.worker is not None
    b.rounds += 1
    queue = f"{b.prefix}-{side.key}-r{b.rounds}"
    match = f"{b.prefix}:*" if side.key == "lq" else f"{b.bare_prefix}:*"
    keys_before = memory_by_key(b.redis, match) if breakdown else {}
    m0 = used_memory(b.redis)
    before_enqueue = b.redis.info("stats")["total_reads_processed"]
    sends0 = Sends.count
    handle = side.enqueue(n, queue)
    enqueue_sends = Sends.count - sends0
    enqueue_reads = b.redis.info("stats")["total_reads_processed"] - before_enqueue - 1  # that INFO itself
    side.extra["last"] = handle
    m1 = used_memory(b.redis)
    before = Meters.read(b.redis, side.worker.process.pid)
    start = time.perf_counter()
    control(side.control_app, side.worker, "add_consumer", queue)
    side.wait(handle, b.timeout)
    elapsed = time.perf_counter() - start
    after = Meters.read(b.redis, side.worker.process.pid)
    control(side.control_app, side.worker, "cancel_consumer", queue)
    drained = b.drain(side)
    m2 = used_memory(b.redis)
    out = {"n": n, "seconds": elapsed, "rate": n / elapsed, "queued_bytes": (m1 - m0) / n,
           "finished_bytes": (m2 - m0) / n, "drained": drained, "enqueue_reads": enqueue_reads / n,
           "enqueue_caller_round_trips": enqueue_sends / n, **after.per_item(before, n)}
    if breakdown:
        out["memory_usage_by_key_type"] = {k: v / n for k, v in
                                           memory_split(keys_before, memory_by_key(b.redis, match),
                                                        [b.prefix if side.key == "lq" else b.bare_prefix]).items()}
    return out


def alternate(b: Bench, sides: Sequence[Side], n: int, rounds: int) -> dict[str, list[dict[str, Any]]]:
    """``rounds`` rounds of each side, alternating which goes first; the last round of each
    also splits its memory by key type."""
    runs: dict[str, list[dict[str, Any]]] = {s.key: [] for s in sides}
    for i in range(rounds):
        for side in sides if i % 2 == 0 else list(sides)[::-1]:
            runs[side.key].append(consume_round(b, side, n, breakdown=i == rounds - 1))
    return runs


def med(runs: Sequence[Mapping[str, Any]], *path: str) -> float:
    values = []
    for run in runs:
        value: Any = run
        for part in path:
            value = value[part]
        values.append(float(value))
    return statistics.median(values)


def end_to_end(b: Bench, report: Report, events: bool = True) -> None:
    """No-op end to end, 2 prefork processes each side, with CPU, memory and round trips per rollout."""
    n, rounds = (150, 2) if b.quick else (2000, 3)
    label = "events on" if events else "events off"
    with ExitStack() as stack:
        started = b.default_workers() if events else stack.enter_context(b.workers(2, events=False))
        sides = b.sides(started)
        for side in sides:  # warm-up: connections, imports, scripts, snapshot caches, Redis's tables grown
            consume_round(b, side, max(30, n // 2))
        runs = alternate(b, sides, n, rounds)
        report.result("runs", runs)
        rates = {k: [r["rate"] for r in v] for k, v in runs.items()}
        lq, bare = statistics.median(rates["lq"]), statistics.median(rates["bare"])
        for side in sides:
            report.row(f"end to end, no-op, 2 prefork procs, {label}: {side.label} ({n} x {rounds}, median)",
                       f"{statistics.median(rates[side.key]):,.0f}/s  (rounds: "
                       f"{', '.join(f'{r:.0f}' for r in rates[side.key])})", rates=rates[side.key])
        report.row(f"  ratio lightning-queue / bare Celery, {label}", f"{ratio(lq, bare):.2f}x",
                   ">= 1.3x" if events else "", ratio=ratio(lq, bare))
        if not events:
            return
        for side in sides:
            r = runs[side.key]
            cpu = {k: med(r, "cpu_us", k) for k in ("worker_main", "worker_pool", "redis", "caller")}
            report.row(f"CPU per rollout, {side.label}: worker main / pool processes / Redis / caller",
                       " / ".join(f"{v:.0f}" for v in cpu.values()) + f" µs (sum {sum(cpu.values()):.0f})",
                       side=side.key, **cpu)
        for side in sides:
            r = runs[side.key]
            report.row(f"Redis memory growth per queued rollout (used_memory), {side.label}",
                       f"{med(r, 'queued_bytes'):,.0f} B", "<= 1.2 KB" if side.key == "lq" else "",
                       side=side.key, bytes=med(r, "queued_bytes"))
            report.row(f"Redis memory growth per finished rollout (used_memory), {side.label}",
                       f"{med(r, 'finished_bytes'):,.0f} B", "<= 700 B" if side.key == "lq" else "",
                       side=side.key, bytes=med(r, "finished_bytes"))
            split = r[-1].get("memory_usage_by_key_type", {})
            rest = r[-1]["finished_bytes"] - sum(split.values())
            report.row("  MEMORY USAGE by key type per rollout (last round)",
                       ", ".join(f"{k} {v:.0f}" for k, v in list(split.items())[:6])
                       + f"; keyspace, expiry and other overhead {rest:.0f}", side=side.key, split=split,
                       overhead=rest)
        for side in sides:
            r = runs[side.key]
            report.row(f"round trips per rollout (Redis read events), {side.label}: send / run and result",
                       f"{med(r, 'enqueue_reads'):.2f} / {med(r, 'reads'):.2f}  (the caller's own, counted "
                       f"client-side: {med(r, 'enqueue_caller_round_trips'):.2f} / {med(r, 'caller_round_trips'):.2f})",
                       side=side.key, send=med(r, "enqueue_reads"), run=med(r, "reads"))
            last = r[-1]["commands"]
            report.row(f"  Redis commands per rollout in the window (Lua-internal too): {sum(last.values()):.1f}",
                       split_per_item(last, 1), side=side.key, commands=last)


def memory_rows(b: Bench, report: Report) -> None:
    """lightning-queue's Redis memory per queued and per finished no-op rollout, split by key type:
    the e2e section's memory rows without bare Celery or the rates (a minute instead of ten)."""
    n = 300 if b.quick else 2000
    lq, = (s for s in b.sides(b.default_workers()) if s.key == "lq")
    consume_round(b, lq, max(30, n // 2))  # warm-up: scripts loaded, Redis's tables grown
    runs = [consume_round(b, lq, n, breakdown=i == 1) for i in range(2)]
    report.result("runs", runs)
    report.row(f"Redis memory growth per queued rollout (used_memory), lightning-queue ({n} x 2, median)",
               f"{med(runs, 'queued_bytes'):,.0f} B", "<= 1.2 KB", bytes=med(runs, "queued_bytes"))
    report.row(f"Redis memory growth per finished rollout (used_memory), lightning-queue ({n} x 2, median)",
               f"{med(runs, 'finished_bytes'):,.0f} B", "<= 700 B", bytes=med(runs, "finished_bytes"))
    split = runs[-1].get("memory_usage_by_key_type", {})
    rest = runs[-1]["finished_bytes"] - sum(split.values())
    report.row("  MEMORY USAGE by key type per finished rollout (last round)",
               ", ".join(f"{k} {v:.0f}" for k, v in split.items())
               + f"; keyspace, expiry and other overhead {rest:.0f}", split=split, overhead=rest)


def latency(b: Bench, report: Report) -> None:
    """One rollout at a time, from just before the enqueue call to the caller holding its result,
    alternating sides each iteration, on running workers (2 prefork processes each)."""
    n, warm = (25, 5) if b.quick else (300, 20)
    samples: dict[str, list[float]] = {"lq": [], "bare": []}
    reads: dict[str, list[int]] = {"lq": [], "bare": []}
    sends: dict[str, list[int]] = {"lq": [], "bare": []}

    def lq_one(i: int) -> None:
        rollout = b.client.enqueue_rollout({"i": i})
        done = b.client.wait_for_rollouts([rollout.rollout_id], timeout=b.timeout)
        if not done or done[0].status != "succeeded":
            raise Stuck(b.lq_diagnosis([rollout.rollout_id], f"one rollout did not finish within {b.timeout:g} s"))

    def bare_one(i: int) -> None:
        from celery.exceptions import TimeoutError as CeleryTimeout

        try:
            b.noop.apply_async(queue=b.bare_queue).get(timeout=b.timeout)
        except CeleryTimeout:
            raise Stuck(f"bare Celery: one task did not finish within {b.timeout:g} s\n"
                        + b.broker_state(f"{b.bare_prefix}:celery:")) from None

    ops = {"lq": lq_one, "bare": bare_one}
    b.default_workers()
    for i in range(n + warm):
        for key in ("lq", "bare") if i % 2 == 0 else ("bare", "lq"):
            start = time.perf_counter()
            ops[key](i)
            if i >= warm:
                samples[key].append(time.perf_counter() - start)
    # Round trips of one rollout, alone (the INFO around each would skew the timings above).
    for i in range(10 if b.quick else 50):
        for key in ("lq", "bare"):
            r0 = b.redis.info("stats")["total_reads_processed"]
            s0 = Sends.count
            ops[key](i)
            sends[key].append(Sends.count - s0)
            reads[key].append(b.redis.info("stats")["total_reads_processed"] - r0 - 1)  # that INFO itself
    report.result("latency_s", samples)
    for key, label in (("lq", "lightning-queue"), ("bare", "bare Celery, apply_async(...).get()")):
        s = samples[key]
        report.row(f"enqueue to result, one at a time ({len(s)}), {label}",
                   f"p50 {percentile(s, 0.5) * 1e3:.2f} ms, p99 {percentile(s, 0.99) * 1e3:.2f} ms",
                   "p50 <= bare" if key == "lq" else "", side=key, p50=percentile(s, 0.5), p99=percentile(s, 0.99))
    report.row("  ratio of p50s lightning-queue / bare Celery",
               f"{ratio(percentile(samples['lq'], 0.5), percentile(samples['bare'], 0.5)):.2f}x", "<= 1.0x",
               ratio=ratio(percentile(samples["lq"], 0.5), percentile(samples["bare"], 0.5)))
    for key, label in (("lq", "lightning-queue"), ("bare", "bare Celery")):
        report.row(f"round trips of one rollout, enqueue to result (Redis read events, median), {label}",
                   f"{statistics.median(reads[key]):.0f}  (the caller's, counted client-side: "
                   f"{statistics.median(sends[key]):.0f})", side=key, reads=statistics.median(reads[key]),
                   caller=statistics.median(sends[key]))


def enqueue(b: Bench, report: Report) -> None:
    """Enqueue rates, to queues no worker reads: one at a time in alternating blocks, and batches."""
    b.stop_default_workers()  # no worker runs meanwhile
    sink, bare_sink = f"{b.prefix}-sink", f"{b.bare_prefix}-sink"
    blocks, size = (4, 25) if b.quick else (10, 100)
    ops: dict[str, Callable[[int], Any]] = {
        "lq": lambda i: b.client.enqueue_rollout({"i": i}, queue=sink),
        "bare": lambda i: b.noop.apply_async(queue=bare_sink, ignore_result=True),
        "bare_result": lambda i: b.noop.apply_async(queue=bare_sink),
    }
    for op in ops.values():  # warm-up: connections, scripts, queue declarations
        op(0)
    rates: dict[str, list[float]] = {k: [] for k in ops}
    cpu: dict[str, list[dict[str, Any]]] = {k: [] for k in ops}
    for block in range(blocks):
        keys = list(ops)
        keys = keys[block % len(keys):] + keys[:block % len(keys)]
        for key in keys:
            before = Meters.read(b.redis, None)
            start = time.perf_counter()
            for i in range(size):
                ops[key](i)
            rates[key].append(size / (time.perf_counter() - start))
            cpu[key].append(Meters.read(b.redis, None).per_item(before, size))
    report.result("single", {"rates": rates, "per_call": cpu})
    labels = {"lq": "enqueue_rollout", "bare": "apply_async(ignore_result=True)",
              "bare_result": "apply_async (result backend: subscribes)"}
    for key, label in labels.items():
        c = cpu[key]
        report.row(f"single enqueue, one at a time ({blocks} x {size}, median): {label}",
                   f"{statistics.median(rates[key]):,.0f}/s; caller {med(c, 'cpu_us', 'caller'):.0f} µs, Redis "
                   f"{med(c, 'cpu_us', 'redis'):.0f} µs, {med(c, 'reads'):.1f} round trips per call",
                   rate=statistics.median(rates[key]))
    lq = statistics.median(rates["lq"])
    report.row("  ratio enqueue_rollout / apply_async(ignore_result=True)",
               f"{ratio(lq, statistics.median(rates['bare'])):.2f}x", ">= 1.0x",
               ratio=ratio(lq, statistics.median(rates["bare"])))
    report.row("  ratio enqueue_rollout / apply_async with a result backend",
               f"{ratio(lq, statistics.median(rates['bare_result'])):.2f}x",
               ratio=ratio(lq, statistics.median(rates["bare_result"])))
    n, rounds = (300, 2) if b.quick else (10_000, 2)
    batch: dict[str, list[float]] = {"lq": [], "bare": []}
    for i in range(rounds):
        for key in ("lq", "bare") if i % 2 == 0 else ("bare", "lq"):
            start = time.perf_counter()
            if key == "lq":
                b.client.enqueue_rollouts([{"i": j} for j in range(n)], queue=sink)
            else:
                for j in range(n):
                    ops["bare"](j)
            batch[key].append(n / (time.perf_counter() - start))
    report.result("batch", batch)
    lq, loop = statistics.median(batch["lq"]), statistics.median(batch["bare"])
    report.row(f"batch enqueue of {n:,} ({rounds} rounds, median): enqueue_rollouts", f"{lq:,.0f} rollouts/s", rate=lq)
    report.row(f"  apply_async(ignore_result=True) loop of {n:,}", f"{loop:,.0f} tasks/s", rate=loop)
    report.row("  ratio enqueue_rollouts / apply_async loop", f"{ratio(lq, loop):.1f}x", ">= 15x",
               ratio=ratio(lq, loop))
    for queue_key in (b.settings.keys.celery_queue(sink), f"{b.bare_prefix}:celery:{bare_sink}"):
        b.redis.delete(queue_key)


def worker_steps(b: Bench, report: Report) -> None:
    """What one rollout costs a worker in Redis, step by step: the runner's round trips on a
    snapshot-cache hit (claim + start, finish), timed in this process, one rollout at a time."""
    from lightning_queue.core.models import Rollout, RolloutResult
    from lightning_queue.storage.store import StartWith

    m = 100 if b.quick else 1000
    store = b.client.store
    rollouts = [Rollout(input={"i": i}) for i in range(m)]
    mark = store.create_rollouts(rollouts)
    result = RolloutResult(output={"end": time.time()})
    start = StartWith(requested_id=None, requested_version=None, resources_id="bench", version=1, epoch=mark.epoch)
    steps: dict[str, list[float]] = {"claim + start (EVALSHA)": [], "finish_attempt (EVALSHA)": []}
    timers = list(steps.values())
    before = command_calls(b.redis.info("commandstats"))
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
    delta = calls_delta(before, command_calls(b.redis.info("commandstats")))
    top = delta.get("evalsha", 0)
    report.row(f"worker round trips per rollout, in process ({m} rollouts, one at a time)",
               f"{top / m:.0f} round trips, {sum(delta.values()) / m:.1f} commands "
               f"({(sum(delta.values()) - top) / m:.1f} inside Lua scripts)", round_trips=top / m)
    for name, samples in steps.items():
        report.row(f"  {name}", f"median {statistics.median(samples) * 1e3:.3f} ms",
                   median=statistics.median(samples))


def in_flight_rows(b: Bench, report: Report) -> None:
    """One worker process with many slots (threads; gevent when installed) running agents that
    wait 50 ms (I/O-bound): the most rollouts in flight at once in that process, and the mean."""
    pools = ["threads"]
    try:
        import gevent  # noqa: F401

        if not b.quick:
            pools.append("gevent")
    except ImportError:
        report.row("in flight, gevent pool", "skipped: gevent not installed (pip install '.[bench]')")
    concurrency, n = (100, 300) if b.quick else (200, 3000)
    b.stop_default_workers()  # only this section's workers run meanwhile
    for pool in pools:
        with b.workers(concurrency, pool, "sleeper", sides=("lq", "bare") if pool == "threads" else ("lq",)) as ws:
            sides = b.sides(ws, {"sleep": 0.05})
            for side in sides:
                consume_round(b, side, concurrency)  # warm-up: every slot's connection
            runs = alternate(b, sides, n, 1)
            for side in sides:
                run = runs[side.key][0]
                stamps = _stamps(b, side)
                peak, mean = in_flight(stamps, run["seconds"])
                report.row(f"in flight per process, 50 ms agents, --pool {pool} --concurrency {concurrency}: "
                           f"{side.label}",
                           f"max {peak}, mean {mean:.0f} ({run['rate']:,.0f}/s; CPU per rollout: worker main "
                           f"{run['cpu_us']['worker_main']:.0f} µs)",
                           ">= 100" if side.key == "lq" else "", side=side.key, pool=pool, max=peak, mean=mean,
                           rate=run["rate"])


def _stamps(b: Bench, side: Side) -> list[tuple[int, float, float]]:
    """``(pid, start, end)`` of the sleeper runs of ``side``'s last round."""
    handle = side.extra["last"]
    if side.key == "lq":
        return [(r.result.output["pid"], r.result.output["start"], r.result.output["end"])
                for r in b.client.get_rollouts(handle)]
    return [(int(pid), s, e) for s, e, pid in handle.values]


def run_section(report: Report, name: str, fn: Callable[[], None]) -> None:
    """Run one section; a failure (a wait that ran out, a worker that died) is reported with its
    diagnosis and the run goes on with the next section."""
    report.section = name
    print(f"\n== {name}", flush=True)
    started = time.monotonic()
    try:
        fn()
    except Stuck as exc:
        report.error(f"timed out: {exc}")
    except Exception as exc:  # noqa: BLE001 - one section failing must not lose the others
        report.error(f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}")
    report.result("seconds", time.monotonic() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rollouts and rounds (a smoke run, under a minute)")
    parser.add_argument("--redis-url", help="use this Redis instead of starting a redis-server of our own")
    parser.add_argument("--json", help="write every result to this file (rewritten after each row)")
    parser.add_argument("--only", help=f"comma-separated sections among {', '.join(SECTIONS)}")
    parser.add_argument("--timeout", type=float, default=120.0, help="longest wait for one round, seconds")
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else \
        set(SECTIONS) - {"memory"} - ({"events_off"} if args.quick else set())
    unknown = only - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose among {', '.join(SECTIONS)}")
    # Stopped with SIGTERM: unwind, so the workers and the redis-server started here stop too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    Sends.install()
    url, server = redis_for(args.redis_url)
    info = redis.Redis.from_url(url).info("server")
    report = Report(args.json)
    import celery

    report.meta = {"redis": info.get("redis_version"), "url": url, "own_server": server is not None,
                   "python": sys.version.split()[0], "celery": celery.__version__, "cpus": os.cpu_count(),
                   "quick": args.quick, "sections": sorted(only), "started": time.time(),
                   "load": os.getloadavg()}
    print(f"Redis {info.get('redis_version')} at {url} ({'own redis-server' if server else 'given'}), "
          f"Python {report.meta['python']}, celery {celery.__version__}, {os.cpu_count()} CPUs, load "
          f"{report.meta['load'][0]:.1f}{', quick run' if args.quick else ''}", flush=True)
    with tempfile.TemporaryDirectory(prefix="lq-bench-") as logdir, ExitStack() as stack:
        b = Bench(url, args.quick, logdir, args.timeout)
        stack.callback(b.close)
        if server:
            stack.callback(server.stop)
        plan: list[tuple[str, Callable[[], None]]] = [
            ("e2e", lambda: end_to_end(b, report)),
            ("latency", lambda: latency(b, report)),
            ("steps", lambda: worker_steps(b, report)),
            ("enqueue", lambda: enqueue(b, report)),
            ("inflight", lambda: in_flight_rows(b, report)),
            ("events_off", lambda: end_to_end(b, report, events=False)),
            ("memory", lambda: memory_rows(b, report)),
        ]
        for name, fn in plan:
            if name in only:
                run_section(report, name, fn)
        if not server:
            print(f"\n(deleted the {b.delete_keys()} keys under {b.prefix})")
    report.meta["finished"] = time.time()
    report.save()
    if report.rows:
        print("\n" + format_table(report.rows))
    for error in report.errors:
        print(f"\nFAILED {error['section']}: {error['error']}")
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
