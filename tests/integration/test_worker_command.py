"""`lightning-queue worker` is a thin wrapper that starts a normal Celery worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lightning_queue import LightningClient, PromptTemplate, Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "lightning_queue"]


def test_worker_command_runs_rollouts(settings: Settings, client: LightningClient, tmp_path: Path) -> None:
    client.add_resources({"prompt": PromptTemplate(template="via the CLI {x}")}, "rs-cli")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LQ_")}
    env.update(LQ_REDIS_URL=settings.redis_url, LQ_KEY_PREFIX=settings.key_prefix)
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [*CLI, "--queue", settings.queue, "worker", "--agent", "tests.integration.agents:echo",
             "--concurrency", "1", "--name", "cli-w@%h", "--without-mingle", "--without-gossip"],
            cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while " ready." not in log.read_text(errors="replace"):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.1)
        (done,) = client.wait_for_rollouts([client.enqueue_rollout({"x": 1}).rollout_id], timeout=30)
        assert done.status == "succeeded" and done.result.output["prompt"] == "via the CLI {x}"  # type: ignore[union-attr]
        assert client.get_attempts(done.rollout_id)[0].worker_id.startswith("cli-w@")
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(20)


def test_worker_command_refuses_an_agent_it_cannot_import(settings: Settings) -> None:
    done = subprocess.run([*CLI, "worker", "--agent", "no_such_module:agent"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "LQ_REDIS_URL": settings.redis_url})
    assert done.returncode == 1
    assert "cannot import agent module 'no_such_module'" in done.stderr
    assert "Traceback" not in done.stderr
