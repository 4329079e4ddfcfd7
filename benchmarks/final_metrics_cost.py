"""Redis cost per finished rollout: memory (``used_memory`` growth) and server CPU (``INFO cpu`` and the
``usec`` of ``INFO commandstats``), for N no-op rollouts through a real worker.

Measures whatever ``lightning_queue`` is first on ``sys.path``, so the same script compares two versions::

    python benchmarks/final_metrics_cost.py --n 2000                      # this checkout
    PYTHONPATH=/tmp/lq-before python benchmarks/final_metrics_cost.py     # e.g. ``git archive <rev>`` unpacked

Runs on a ``redis-server`` of its own (nothing else's commands counted), one worker with 2 prefork
processes running :func:`scored`, which returns reward 1.0 at once (the final transition's reward path is
taken). ``--experiment`` enqueues through a two-variant experiment instead (experiment tally and per-variant
series too). ``--direct`` runs no worker: this process claims, starts and finishes each rollout through the
store's own scripts (what a worker calls), so the Redis numbers are less noisy on a busy machine. Finished
records are kept (the default 7-day TTL), so memory growth is what finished rollouts hold.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis

HERE = Path(__file__).resolve().parent


def scored(task: Any) -> Any:
    """The agent: reward 1.0, nothing else (wrapped by ``rollout`` at import below)."""
    from lightning_queue import RolloutResult

    return RolloutResult(reward=1.0)


def _agent() -> Any:
    from lightning_queue import rollout

    return rollout(scored)


agent = _agent()


Cost = tuple[int, float, float, int]
"""used_memory, Redis CPU seconds (user + sys), commandstats usec and calls, summed over commands."""


def _redis_cost(client: redis.Redis) -> Cost:
    info = client.info()
    stats = client.info("commandstats")
    usec = sum(float(s["usec"]) for s in stats.values())
    calls = sum(int(s["calls"]) for s in stats.values())
    return int(info["used_memory"]), float(info["used_cpu_user"]) + float(info["used_cpu_sys"]), usec, calls


def _batches(enqueue: Callable[[list[Any]], list[Any]], n: int) -> Iterator[list[Any]]:
    for start in range(0, n, 500):
        yield enqueue([{"i": i} for i in range(start, min(n, start + 500))])


def _measure_with_worker(client: Any, settings: Any, enqueue: Callable[[list[Any]], list[Any]], n: int,
                         logdir: Path) -> tuple[Cost, Cost, list[Any]]:
    """One worker (2 prefork processes) runs the rollouts; the Redis cost around the measured ``n``."""
    import lightning_queue
    from lightning_queue.ops.fleet import worker_env

    paths = [str(Path(lightning_queue.__file__).resolve().parents[1]), str(HERE)]
    env = worker_env(settings, "final_metrics_cost:agent", paths)
    argv = [sys.executable, "-m", "celery", "-A", "lightning_queue.app", "worker", "--pool", "prefork",
            "--concurrency", "2", "-Q", settings.queue, "--without-mingle", "--without-gossip",
            "--loglevel", "WARNING", "--hostname", "cost@%h"]
    with open(logdir / "worker.log", "wb") as log:
        worker = subprocess.Popen(argv, env=env, cwd=str(HERE), stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        # Warm up (worker start, script loading, caches), then measure.
        warm = enqueue([{"i": -i - 1} for i in range(20)])
        if len(client.wait_for_rollouts([r.rollout_id for r in warm], timeout=120)) != len(warm):
            raise SystemExit(f"the worker did not run the warm-up; see {logdir / 'worker.log'}")
        before = _redis_cost(client.redis)
        rollouts = [r for batch in _batches(enqueue, n) for r in batch]
        done = client.wait_for_rollouts([r.rollout_id for r in rollouts], timeout=600)
        return before, _redis_cost(client.redis), done
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(30)


def _measure_direct(client: Any, settings: Any, enqueue: Callable[[list[Any]], list[Any]], n: int,
                    logdir: Path) -> tuple[Cost, Cost, list[Any]]:
    """No worker: this process claims, starts and finishes each rollout through the store's scripts."""
    from lightning_queue import RolloutResult

    store = client.store
    published: list[Any] = []
    client.publish = lambda rollouts, *a, **k: published.extend(rollouts)

    def run_published() -> None:
        for rollout in published:
            claim = store.claim(rollout, "cost@host")
            snap = client.get_resources_by_id(rollout.resources_id or "latest", rollout.resources_version)
            store.start_attempt(rollout.rollout_id, claim.sequence_id, snap.resources_id, snap.version)
            store.finish_attempt(rollout.rollout_id, claim.sequence_id, "succeeded", "succeeded",
                                 result=RolloutResult(reward=1.0))
        published.clear()

    enqueue([{"i": -i - 1} for i in range(20)])
    run_published()
    before = _redis_cost(client.redis)
    rollouts = []
    for batch in _batches(enqueue, n):
        rollouts += batch
        run_published()
    after = _redis_cost(client.redis)
    return before, after, client.get_rollouts([r.rollout_id for r in rollouts])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="rollouts measured")
    parser.add_argument("--experiment", action="store_true", help="enqueue through a two-variant experiment")
    parser.add_argument("--direct", action="store_true", help="no worker: run the store's scripts from here")
    parser.add_argument("--json", type=Path, help="write the numbers here too")
    args = parser.parse_args()

    import lightning_queue
    from lightning_queue import LightningClient, PromptTemplate, Settings
    from lightning_queue.ops.embedded import EmbeddedRedis

    if not shutil.which("redis-server"):
        raise SystemExit("needs redis-server on PATH")
    server = EmbeddedRedis.start(prefer_binary=True)
    logdir = Path(tempfile.mkdtemp(prefix="lq-cost-"))
    try:
        settings = Settings(redis_url=server.url, key_prefix="cost", queue="cost-q")
        client = LightningClient(settings)
        client.add_resources({"prompt": PromptTemplate(template="{x}")}, "rs-a")
        client.add_resources({"prompt": PromptTemplate(template="{x}")}, "rs-b")
        enqueue = client.enqueue_rollouts
        if args.experiment:
            from lightning_queue.experiments.manager import Experiment, Experiments, Variant

            experiments = Experiments(client)
            experiments.create(Experiment(name="cost", unit_key="input.i",
                                          variants=[Variant(name="a", resources_id="rs-a"),
                                                    Variant(name="b", resources_id="rs-b")]))
            experiments.start("cost")

            def enqueue(inputs: list[Any]) -> list[Any]:
                return experiments.enqueue("cost", inputs)

        measure = _measure_direct if args.direct else _measure_with_worker
        before, after, done = measure(client, settings, enqueue, args.n, logdir)
        if len(done) != args.n or any(r.status != "succeeded" for r in done):
            raise SystemExit(f"{len(done)}/{args.n} finished; see {logdir / 'worker.log'}")
        n = args.n
        result = {
            "lightning_queue": str(Path(lightning_queue.__file__).parent),
            "n": n, "experiment": args.experiment, "direct": args.direct,
            "memory_bytes_per_rollout": (after[0] - before[0]) / n,
            "redis_cpu_us_per_rollout": 1e6 * (after[1] - before[1]) / n,
            "commandstats_us_per_rollout": (after[2] - before[2]) / n,
            "commands_per_rollout": (after[3] - before[3]) / n,
        }
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        client.close()
        return 0
    finally:
        server.stop()
        shutil.rmtree(logdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
