"""Restarts and shutdown, with real workers: a worker stopped with SIGTERM mid-rollout, Redis
restarted mid-run (append-only file on), Redis unreachable at start. Nothing is lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lightning_queue import (
    LightningClient,
    PromptTemplate,
    RolloutConfig,
    Settings,
)
from lightning_queue.core.errors import RedisUnavailableError
from lightning_queue.ops import cli
from lightning_queue.ops.embedded import free_port
from tests.conftest import delete_prefix
from tests.integration.test_resilience import restartable_redis  # noqa: F401 (a fixture: AOF, appendfsync always)

REPO_ROOT = Path(__file__).resolve().parents[2]
AGENTS = "tests.integration.agents"
WAIT = 90.0
SHORT_RETRY = 0.5  # seconds of connection retries where Redis is deliberately unreachable


def wait_until(condition, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_sigterm_lets_the_running_rollout_finish_and_hands_back_the_rest(
    client: LightningClient, start_workers, tmp_path: Path
) -> None:
    client.add_resources({"prompt": PromptTemplate(template="p")}, "rs-a")
    (first,) = start_workers(f"{AGENTS}:gated", count=1)  # one slot
    gate = tmp_path / "gate"  # every rollout runs until it is opened
    queued = client.enqueue_rollouts([{"gate": str(gate)} for _ in range(4)], resources_id="rs-a",
                                     config=RolloutConfig(max_attempts=1))  # a lost attempt would fail it
    ids = [r.rollout_id for r in queued]
    wait_until(lambda: any(r.status == "running" for r in client.get_rollouts(ids)), "a rollout to run")
    running = next(r.rollout_id for r in client.get_rollouts(ids) if r.status == "running")

    first.process.send_signal(signal.SIGTERM)  # warm shutdown
    # The worker is shutting down while the rollout still runs; only now may it finish.
    wait_until(lambda: "Warm shutdown" in first.log(), "the worker to begin its warm shutdown")
    assert client.get_rollout(running).status == "running"
    gate.touch()
    first.process.wait(WAIT)
    assert client.get_rollout(running).status == "succeeded"  # finished before the worker exited
    assert [a.status for a in client.get_attempts(running)] == ["succeeded"]
    assert client.get_attempts(running)[0].worker_id == first.hostname

    (second,) = start_workers(f"{AGENTS}:gated", count=1)
    done = client.wait_for_rollouts(ids, timeout=WAIT)
    assert [r.status for r in done] == ["succeeded"] * 4  # the others were handed back, none lost
    for rid in ids:
        attempts = client.get_attempts(rid)
        assert [a.status for a in attempts] == ["succeeded"], (rid, attempts)  # and none ran twice
    assert {client.get_attempts(rid)[0].worker_id for rid in ids} == {first.hostname, second.hostname}


def test_redis_restart_with_aof_loses_no_snapshot_rollout_or_result(
    restartable_redis, prefix: str, start_workers  # noqa: F811
) -> None:
    url, restart = restartable_redis
    settings = Settings(redis_url=url, key_prefix=prefix, queue=f"{prefix}-q")
    client = LightningClient(settings)
    try:
        client.add_resources({"prompt": PromptTemplate(template="before {x}")}, "rs-before")
        start_workers(f"{AGENTS}:echo", count=2, settings=settings)
        queued = client.enqueue_rollouts([{"x": i, "sleep": 0.3} for i in range(16)], resources_id="rs-before",
                                         config=RolloutConfig(max_attempts=3))
        ids = [r.rollout_id for r in queued]
        wait_until(lambda: sum(r.status == "succeeded" for r in client.get_rollouts(ids)) >= 3, "a few results")
        finished_before = {r.rollout_id: r.result for r in client.get_rollouts(ids) if r.status == "succeeded"}

        # Mid-run: some rollouts running, most queued. Client and workers ride it out with the
        # default retry budget (redis_retry_seconds, ~10 s), which only this and test_resilience rely on.
        restart(down_seconds=2)

        # The client reconnects by itself; everything written before is still there.
        assert client.get_resources_by_id("rs-before").resources["prompt"].template == "before {x}"  # type: ignore[attr-defined]
        for rid, result in finished_before.items():
            assert client.get_rollout(rid).result == result
        done = client.wait_for_rollouts(ids, timeout=WAIT)
        assert [r.status for r in done] == ["succeeded"] * len(ids)
        for rid in ids:  # one success each: no result recorded twice
            assert [a.status for a in client.get_attempts(rid)].count("succeeded") == 1

        # And both sides carry on: new snapshots and rollouts after the restart.
        client.add_resources({"prompt": PromptTemplate(template="after {x}")}, "rs-after")
        later = client.enqueue_rollouts([{"x": i} for i in range(4)], resources_id="rs-after")
        done = client.wait_for_rollouts([r.rollout_id for r in later], timeout=WAIT)
        assert {(r.status, r.result.output["prompt"]) for r in done} == {("succeeded", "after {x}")}  # type: ignore[union-attr]
    finally:
        client.close()
        delete_prefix(url, prefix)


def test_unreachable_redis_at_start_is_named_by_client_cli_and_worker() -> None:
    url = f"redis://:not-shown-pw@127.0.0.1:{free_port()}/0"
    # Nothing will ever answer: a short retry budget instead of the default ~10 s, for each of the
    # three. Riding out a Redis restart with the default budget is test_redis_restart_with_aof_... above.
    retry = {"LQ_REDIS_RETRY_SECONDS": str(SHORT_RETRY)}
    with pytest.raises(RedisUnavailableError) as info:
        LightningClient(Settings(redis_url=url, redis_retry_seconds=SHORT_RETRY))
    message = str(info.value)
    assert "redis://:**@127.0.0.1" in message and "not-shown-pw" not in message and "LQ_REDIS_URL" in message

    result = CliRunner().invoke(cli.app, ["--redis-url", url, "rollouts", "list"], env=retry)
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert "cannot reach Redis at redis://:**@127.0.0.1" in result.stderr and "not-shown-pw" not in result.stderr

    env = {k: v for k, v in os.environ.items() if not k.startswith("LQ_")} | retry
    worker = subprocess.run([sys.executable, "-m", "lightning_queue", "--redis-url", url, "worker", "--agent",
                             f"{AGENTS}:echo"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
                            check=False)
    assert worker.returncode == 1, worker.stderr
    assert "cannot reach Redis at redis://:**@127.0.0.1" in worker.stderr
    assert "Traceback" not in worker.stderr and "not-shown-pw" not in worker.stderr + worker.stdout
