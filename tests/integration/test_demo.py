"""The demo and the example algorithms, end to end on real workers."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from algorithms.baseline import run_baseline
from lightning_queue import LightningClient, PromptTemplate, Settings
from lightning_queue.ops.demo.datasets import arithmetic
from lightning_queue.ops.demo.run import run_demo

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
