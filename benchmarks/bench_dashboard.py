"""How fast the dashboard's experiment page loads for a large experiment.

    python benchmarks/bench_dashboard.py [--rollouts 100000] [--no-browser]

Writes an A/B experiment whose rollouts (100,000 by default) all finished, each through the
store's own scripts as a worker would (claim, start, finish: the tallies are kept by the finish
script), then measures:

* the experiment route of the API (``GET /api/v1/experiments/{name}``), served by uvicorn;
* the page itself in headless Chromium: from navigation to the charts drawn with every reward
  (skipped without ``/usr/bin/chromium`` or with ``--no-browser``);
* for contrast, the report read from every rollout record (``Experiments.report``).

Uses the Redis at ``LQ_REDIS_URL`` (default 127.0.0.1:6379, or an embedded one when nothing
answers), under a fresh prefix whose keys are deleted at the end. Prints one row per measure.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_queue import LightningClient, PromptTemplate, Settings
from lightning_queue.core.models import RolloutResult
from lightning_queue.experiments.manager import Experiment, Experiments, Variant
from lightning_queue.ops.embedded import ensure_redis
from lightning_queue.ops.server import ServerConfig, create_app
from tests.integration.dashboard import CHROMIUM, CHROMIUM_ARGS, serving

PASSWORD = "bench"


def row(name: str, value: str) -> None:
    print(f"{name:<62} {value}", flush=True)


def fill(client: LightningClient, experiments: Experiments, name: str, count: int) -> None:
    """Enqueue ``count`` rollouts through the experiment and finish each as a worker would."""
    client.publish = lambda rollouts, seq=0: None  # type: ignore[method-assign]  # no broker: finished below
    rng = random.Random(1)
    store = client.store
    batch = 5000
    for start in range(0, count, batch):
        rollouts = experiments.enqueue(name, [{"user": f"u{i}"} for i in range(start, min(count, start + batch))])
        for r in rollouts:
            claim = store.claim(r, "bench@host")
            store.start_attempt(r.rollout_id, claim.sequence_id, r.resources_id or "", r.resources_version or 1)
            mean = 0.62 if r.metadata["variant"] == "treatment" else 0.6
            store.finish_attempt(r.rollout_id, claim.sequence_id, "succeeded", "succeeded",
                                 result=RolloutResult(reward=min(1.0, max(0.0, rng.gauss(mean, 0.2)))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rollouts", type=int, default=100_000)
    parser.add_argument("--no-browser", action="store_true")
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()

    url, embedded = ensure_redis(os.environ.get("LQ_REDIS_URL", "redis://127.0.0.1:6379/0"))
    prefix = f"lqbench-{uuid.uuid4().hex[:8]}"
    client = LightningClient(Settings(redis_url=url, key_prefix=prefix, queue=f"{prefix}-q"))
    try:
        a = client.add_resources({"prompt": PromptTemplate(template="A {x}")}, "rs-a").resources_id
        b = client.add_resources({"prompt": PromptTemplate(template="B {x}")}, "rs-b").resources_id
        experiments = Experiments(client)
        name = "big"
        experiments.create(Experiment(name=name, unit_key="input.user", variants=[
            Variant(name="control", resources_id=a), Variant(name="treatment", resources_id=b)]))
        experiments.start(name)
        began = time.perf_counter()
        fill(client, experiments, name, args.rollouts)
        row(f"write {args.rollouts:,} finished rollouts (claim, start, finish each)",
            f"{time.perf_counter() - began:.1f} s")

        live = []
        for _ in range(args.repeat):
            began = time.perf_counter()
            experiments.live_report(name)
            live.append(time.perf_counter() - began)
        row("live report from the aggregates (Experiments.live_report)",
            f"median {statistics.median(live) * 1000:.0f} ms")

        app = create_app(ServerConfig(password=PASSWORD), client=client)
        with serving(app) as base:
            times = []
            with httpx.Client(base_url=base, timeout=60) as http:
                for _ in range(args.repeat):
                    began = time.perf_counter()
                    response = http.get(f"/api/v1/experiments/{name}")
                    times.append(time.perf_counter() - began)
                    response.raise_for_status()
            total = sum(v["finished"] for v in response.json()["report"]["variants"])
            assert total == args.rollouts, total
            row(f"GET /api/v1/experiments/{{name}}, {args.rollouts:,} rollouts",
                f"median {statistics.median(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms")
            if not args.no_browser and os.path.exists(CHROMIUM):
                page_load(base, name, args.rollouts, args.repeat)
            else:
                row("experiment page in Chromium", "skipped (no browser)")

        began = time.perf_counter()
        experiments.report(name)
        row("for contrast: the report read from every rollout record", f"{time.perf_counter() - began:.2f} s")
    finally:
        keys = list(client.redis.scan_iter(match=f"{prefix}:*", count=5000))
        for i in range(0, len(keys), 1000):
            client.redis.delete(*keys[i : i + 1000])
        client.close()
        if embedded:
            embedded.stop()


def page_load(base: str, name: str, rollouts: int, repeat: int) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(http_credentials={"username": "admin", "password": PASSWORD})
            page = context.new_page()
            rewarded = f"[data-testid='trajectory-chart'][data-rewards='{rollouts}']"
            times = []
            for i in range(repeat + 1):
                page.goto("about:blank")
                began = time.perf_counter()
                page.goto(f"{base}/#/experiments/{name}")
                page.wait_for_selector(rewarded, timeout=60_000)
                if i:  # the first load fills the browser's cache of the page's files
                    times.append(time.perf_counter() - began)
        finally:
            browser.close()
    row(f"experiment page in Chromium, navigation to charts drawn, {rollouts:,} rollouts",
        f"median {statistics.median(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
