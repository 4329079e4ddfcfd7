"""The demo and the example algorithms, end to end on real workers."""

from __future__ import annotations

import contextlib
import io
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import redis
from rich.console import Console

from algorithms.baseline import run_baseline
from lightning_queue import LightningClient, PromptTemplate, Settings
from lightning_queue.ops.demo.datasets import arithmetic
from lightning_queue.ops.demo.run import run_demo
from lightning_queue.ops.embedded import free_port
from lightning_queue.storage.connections import ping

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_demo_promotes_the_best_prompt_and_validation_follows_it(settings: Settings) -> None:
    out = io.StringIO()
    result = run_demo(settings, workers=2, concurrency=1, console=Console(file=out, width=200))
    text = out.getvalue()
    assert result["promoted"] == "step-by-step-terse", text
    assert result["validation_mean"] == 1.0, text
    assert "2 workers ready" in text and "promoted -> latest" in text
    for worker in ("w1:", "w2:"):  # both worker processes ran rollouts
        assert worker in text, text


def test_baseline_runs_the_dataset_against_one_snapshot(client: LightningClient, start_workers) -> None:
    terse = client.add_resources({"prompt": PromptTemplate(template="Reply with only the final number. Q: {question}")},
                                 "terse")
    client.add_resources({"prompt": PromptTemplate(template="Q: {question}")}, "plain")  # latest
    start_workers("workers.demo_agent:agent", count=2)
    report = run_baseline(client, arithmetic(), terse.resources_id, timeout=60)
    assert report.summary.count == len(arithmetic()) and report.summary.failed == 0
    assert report.summary.mean_reward == 0.5  # terse but left to right: right on the half without a precedence trap
    assert {client.get_attempts(r.rollout_id)[0].resources_id for r in report.rollouts} == {"terse"}


def test_demo_command_exits_zero(settings: Settings) -> None:
    env = {"LQ_REDIS_URL": settings.redis_url, "PATH": str(Path(sys.executable).parent)}
    done = subprocess.run([sys.executable, "-m", "lightning_queue", "demo", "--workers", "2"],
                          capture_output=True, text=True, timeout=180, env=env, cwd="/")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Promoted 'step-by-step-terse'" in done.stdout.replace("\n", " ")


@pytest.mark.parametrize("redis_there", [True, False], ids=["redis", "no-redis"])
def test_demo_stopped_by_sigterm_leaves_nothing_behind(settings: Settings, tmp_path: Path, redis_there: bool) -> None:
    # What `timeout`, a CI cancel and `kill` send: as Ctrl-C, the demo stops its workers, deletes
    # its keys and stops the Redis it started. Sent while it waits for its workers to start.
    url = settings.redis_url if redis_there else f"redis://127.0.0.1:{free_port()}/0"
    env = {"LQ_REDIS_URL": url, "PATH": str(Path(sys.executable).parent)}
    out = tmp_path / "demo.out"
    with open(out, "wb") as log:
        demo = subprocess.Popen([sys.executable, "-m", "lightning_queue", "demo", "--workers", "2"],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd="/")
    try:
        deadline = time.monotonic() + 120
        workers: list[str] = []
        while not workers:
            assert demo.poll() is None and time.monotonic() < deadline, out.read_text(errors="replace")
            time.sleep(0.05)
            with contextlib.suppress(psutil.Error):
                workers = [" ".join(c.cmdline()) for c in psutil.Process(demo.pid).children() if "celery" in c.name()
                           or "celery" in " ".join(c.cmdline())]
        prefix = re.search(r"w\d+-(lq-demo-[0-9a-f]+)", workers[0]).group(1)  # type: ignore[union-attr]
        demo.send_signal(signal.SIGTERM)
        demo.wait(60)
    finally:
        if demo.poll() is None:
            demo.kill()
    text = out.read_text(errors="replace")
    assert "Done in" not in text, text  # it was stopped, not finished
    left = [p.info["pid"] for p in psutil.process_iter(["pid", "cmdline"]) if prefix in " ".join(p.info["cmdline"] or [])]
    assert left == [], f"worker processes left behind: {left}\n{text}"
    if redis_there:
        assert list(redis.Redis.from_url(url).scan_iter(match=f"{prefix}:*")) == [], text
    else:
        embedded = re.search(r"started an embedded \S+ at\s+(redis://\S+)", text)
        assert embedded is not None and not ping(embedded.group(1)), f"the embedded Redis still answers\n{text}"
