"""The installed ``lightning-queue`` command on an 80-column terminal, against the real Redis and
real workers: ids copied from one command's output are fed to the next, and every command that
waits says by its exit code whether what it waited for succeeded (0), failed (1) or timed out (3)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from lightning_queue import LightningClient, PromptTemplate, Settings

LIGHTNING_QUEUE = str(Path(sys.executable).parent / "lightning-queue")
ID = re.compile(r"\b(?:ro|rs)-[0-9a-f]{16}\b|\bprompt-[a-z-]+-[0-9a-f]{6}\b")


def run(settings: Settings, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LQ_")}
    env.update(COLUMNS="80", LQ_REDIS_URL=settings.redis_url, LQ_KEY_PREFIX=settings.key_prefix,
               LQ_QUEUE=settings.queue)
    done = subprocess.run([LIGHTNING_QUEUE, *args], capture_output=True, text=True, env=env, timeout=timeout,
                          check=False)
    assert "Traceback" not in done.stderr, done.stderr
    assert all(len(line) <= 80 for line in done.stdout.splitlines()), done.stdout
    return done


def test_ids_printed_at_80_columns_feed_the_next_command(settings: Settings, client: LightningClient,
                                                         start_workers) -> None:
    client.add_resources({"prompt": PromptTemplate(template="generated {x}")})
    client.add_resources({"prompt": PromptTemplate(template="named {x}")}, "prompt-step-by-step-terse-8dfcd8")
    listed = run(settings, "resources", "list")
    assert listed.returncode == 0 and "…" not in listed.stdout
    snapshot_ids = ID.findall(listed.stdout)
    assert len(snapshot_ids) == 2
    for resources_id in snapshot_ids:
        shown = run(settings, "resources", "get", resources_id)
        assert shown.returncode == 0 and shown.stdout.startswith(f"{resources_id} version 1")

    start_workers("tests.integration.agents:echo", count=1)
    submitted = run(settings, "rollouts", "submit", "--wait", "--wait-timeout", "60", "-r", snapshot_ids[0],
                    '{"x": 1}', '{"x": 2}')
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    rollout_ids = submitted.stdout.split()[:2]
    listed = run(settings, "rollouts", "list")
    assert listed.returncode == 0 and "…" not in listed.stdout
    assert set(rollout_ids) <= set(ID.findall(listed.stdout))
    for rollout_id in ID.findall(listed.stdout):
        if rollout_id.startswith("ro-"):
            status = run(settings, "rollouts", "status", rollout_id)
            assert status.returncode == 0 and '"status": "succeeded"' in status.stdout
    assert run(settings, "rollouts", "wait", *rollout_ids).returncode == 0


def test_waiting_exits_1_on_a_failure_and_3_on_a_timeout(settings: Settings, client: LightningClient,
                                                         start_workers) -> None:
    client.add_resources({"prompt": PromptTemplate(template="{x}")}, "rs-cli")
    queued = run(settings, "rollouts", "submit", "--wait", "--wait-timeout", "0.5", "q")  # no worker yet
    assert queued.returncode == 3
    rollout_id = queued.stdout.split()[0]
    assert queued.stderr.strip().endswith(f"did not finish within 0.5 s (they go on: wait again with "
                                          f"`lightning-queue rollouts wait`): {rollout_id}")

    start_workers("tests.integration.agents:failing", count=1)
    failed = run(settings, "rollouts", "submit", "--wait", '{"name": "x"}')
    assert failed.returncode == 1
    failed_id = failed.stdout.split()[0]
    assert failed.stderr.strip() == f"error: 1 of 1 rollouts did not succeed: {failed_id} (failed)"
    assert f"{failed_id}  ValueError: boom on x" in failed.stdout
    waited = run(settings, "rollouts", "wait", failed_id, rollout_id, "--timeout", "60")
    assert waited.returncode == 1 and f"{failed_id} (failed)" in waited.stderr
    # A failure decides even when something else timed out; a cancelled rollout is no success either.
    (stuck,) = client.enqueue_rollouts([{"name": "never"}], queue=f"{settings.queue}-nobody")
    mixed = run(settings, "rollouts", "wait", failed_id, stuck.rollout_id, "--timeout", "0.5")
    assert mixed.returncode == 1 and "did not finish within 0.5 s" in mixed.stderr
    assert run(settings, "rollouts", "cancel", stuck.rollout_id).returncode == 0
    assert run(settings, "rollouts", "wait", stuck.rollout_id).returncode == 1
