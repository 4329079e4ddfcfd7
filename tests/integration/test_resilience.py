"""A whole worker machine vanishing, and Redis restarting mid-rollout: nothing is lost."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lightning_queue import LightningClient, RolloutConfig, Settings
from lightning_queue.ops.embedded import free_port
from lightning_queue.storage.connections import ping
from tests.conftest import delete_prefix


def _wait_for(path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.05)


def test_rollout_of_a_vanished_worker_is_redelivered_to_another(
    settings: Settings, start_workers, marker_dir: str
) -> None:
    # A short visibility timeout stands in for a machine that never comes back; heartbeats
    # expire before it, so the redelivered message is not mistaken for a duplicate.
    settings = settings.model_copy(update={"visibility_timeout": 3, "heartbeat_interval": 0.5,
                                           "heartbeat_timeout": 2.0})
    client = LightningClient(settings)
    client.add_resources({"prompt": {"resource_type": "prompt_template", "template": "{x}"}}, "rs-a")
    (first,) = start_workers("tests.integration.agents:slow_first", count=1, settings=settings)
    queued = client.enqueue_rollout({"marker_dir": marker_dir}, resources_id="rs-a",
                                    config=RolloutConfig(max_attempts=2))
    _wait_for(Path(marker_dir) / f"{queued.rollout_id}.started")
    os.killpg(first.process.pid, signal.SIGKILL)  # the main process and its pool: no chance to requeue
    first.process.wait()

    (second,) = start_workers("tests.integration.agents:slow_first", count=1, settings=settings)
    (done,) = client.wait_for_rollouts([queued.rollout_id], timeout=60)
    attempts = client.get_attempts(queued.rollout_id)
    assert done.status == "succeeded"
    # Whichever sees it first closes the dead attempt: the redelivery's claim (worker_lost) or
    # the second worker's watchdog (unresponsive, then it publishes the rollout again).
    assert [(a.status, a.worker_id) for a in attempts] in (
        [("worker_lost", first.hostname), ("succeeded", second.hostname)],
        [("unresponsive", first.hostname), ("succeeded", second.hostname)],
    )
    assert attempts[0].error.type in ("WorkerLostError", "UnresponsiveAttemptError")
    client.close()


@pytest.fixture
def restartable_redis(tmp_path: Path) -> Iterator[tuple[str, callable]]:
    """A private redis-server with an append-only file, which the test can restart."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("needs a redis-server binary (the embedded fakeredis server cannot restart)")
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path), "--appendonly", "yes",
            "--appendfsync", "always", "--save", "", "--loglevel", "warning"]
    url = f"redis://127.0.0.1:{port}/0"
    process = {"p": None}

    def start() -> None:
        process["p"] = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not ping(url, timeout=0.2):
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def restart(down_seconds: float) -> None:
        process["p"].terminate()  # SIGTERM: redis-server flushes its append-only file and exits
        process["p"].wait(10)
        time.sleep(down_seconds)
        start()

    start()
    yield url, restart
    process["p"].kill()
    process["p"].wait()


def test_rollout_finishes_when_redis_restarts_while_it_runs(
    restartable_redis, prefix: str, start_workers, marker_dir: str
) -> None:
    url, restart = restartable_redis
    settings = Settings(redis_url=url, key_prefix=prefix, queue=f"{prefix}-q")
    client = LightningClient(settings)
    client.add_resources({"prompt": {"resource_type": "prompt_template", "template": "{x}"}}, "rs-a")
    start_workers("tests.integration.agents:slow_first", count=1, settings=settings)
    queued = client.enqueue_rollout({"marker_dir": marker_dir, "first_sleep": 4}, resources_id="rs-a")
    _wait_for(Path(marker_dir) / f"{queued.rollout_id}.started")
    restart(down_seconds=2)  # the agent is still running; its result is recorded after Redis is back

    (done,) = client.wait_for_rollouts([queued.rollout_id], timeout=60)
    assert done.status == "succeeded" and done.reward == 1.0
    assert [a.status for a in client.get_attempts(queued.rollout_id)] == ["succeeded"]
    client.close()
    delete_prefix(url, prefix)
