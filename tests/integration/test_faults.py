"""Faults the rollout state machine survives, with real Redis and real worker processes:
a hung (SIGSTOPped) pool process, duplicate deliveries, a worker that stops consuming."""

from __future__ import annotations

import itertools
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from lightning_queue import LightningClient, PromptTemplate, RolloutConfig, Settings

AGENTS = "tests.integration.fault_agents"
WAIT = 90.0


def wait_until(condition: Callable[[], object], timeout: float = WAIT, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def runs(marker_dir: str, rollout_id: str) -> list[str]:
    path = Path(marker_dir) / f"{rollout_id}.runs"
    return path.read_text().splitlines() if path.exists() else []


def test_stopped_pool_process_is_declared_unresponsive_and_its_late_result_refused(
    settings: Settings, start_workers, worker_pool, marker_dir
):
    settings = settings.model_copy(update={"heartbeat_interval": 0.5, "heartbeat_timeout": 3.0})
    with LightningClient(settings) as client:
        client.add_resources({"prompt": PromptTemplate(template="p")})
        start_workers(f"{AGENTS}:held_first", count=2, settings=settings)
        rollout = client.enqueue_rollout({"marker_dir": marker_dir}, config=RolloutConfig(max_attempts=2))
        rid = rollout.rollout_id
        pid_file = Path(marker_dir) / f"{rid}.pid"
        pid = int(wait_until(lambda: pid_file.exists() and pid_file.read_text(), what="the first run")
                  )  # type: ignore[arg-type]

        os.kill(pid, signal.SIGSTOP)
        try:
            [done] = client.wait_for_rollouts([rid], timeout=WAIT)
            assert (done.status, done.reward, done.attempt_count) == ("succeeded", 2.0, 2)
            first, second = client.get_attempts(rid)
            assert first.status == "unresponsive" and first.error.type == "UnresponsiveAttemptError"
            assert second.status == "succeeded" and second.result.output["pid"] != pid
        finally:
            (Path(marker_dir) / "go").touch()
            os.kill(pid, signal.SIGCONT)

        # The old attempt finishes now: its result is refused and logged, the rollout keeps the new one.
        worker_pool.wait_for_log(f"rollout {rid} attempt 1: result (succeeded) refused", timeout=WAIT)
        assert len(runs(marker_dir, rid)) == 2
        after = client.get_rollout(rid)
        assert (after.status, after.reward) == ("succeeded", 2.0)
        assert [a.status for a in client.get_attempts(rid)] == ["unresponsive", "succeeded"]


def test_stopped_pool_process_fails_the_rollout_when_no_attempt_is_left(
    settings: Settings, start_workers, worker_pool, marker_dir
):
    settings = settings.model_copy(update={"heartbeat_interval": 0.5, "heartbeat_timeout": 3.0})
    with LightningClient(settings) as client:
        client.add_resources({"prompt": PromptTemplate(template="p")})
        start_workers(f"{AGENTS}:held_first", count=1, settings=settings)
        rid = client.enqueue_rollout({"marker_dir": marker_dir}).rollout_id  # max_attempts=1
        pid_file = Path(marker_dir) / f"{rid}.pid"
        pid = int(wait_until(lambda: pid_file.exists() and pid_file.read_text(), what="the first run"))  # type: ignore[arg-type]

        os.kill(pid, signal.SIGSTOP)
        try:
            [done] = client.wait_for_rollouts([rid], timeout=WAIT)
        finally:
            (Path(marker_dir) / "go").touch()
            os.kill(pid, signal.SIGCONT)
        assert (done.status, done.error.type) == ("failed", "UnresponsiveAttemptError")

        # Never flips from failed to succeeded.
        worker_pool.wait_for_log(f"rollout {rid} attempt 1: result (succeeded) refused", timeout=WAIT)
        after = client.get_rollout(rid)
        assert (after.status, after.result) == ("failed", None)
        assert [a.status for a in client.get_attempts(rid)] == ["unresponsive"]


def test_an_agent_holding_the_gil_past_the_heartbeat_timeout_is_not_declared_unresponsive(
    settings: Settings, start_workers, marker_dir
):
    # Its own heartbeat thread cannot run for 5 s, over twice the 2-s heartbeat timeout; the
    # worker's main process sees the pool process alive and running, and beats for it.
    settings = settings.model_copy(update={"heartbeat_interval": 0.5, "heartbeat_timeout": 2.0})
    with LightningClient(settings) as client:
        client.add_resources({"prompt": PromptTemplate(template="p")})
        start_workers(f"{AGENTS}:gil_holder", count=1, settings=settings)
        rid = client.enqueue_rollout({"marker_dir": marker_dir, "seconds": 5},
                                     config=RolloutConfig(max_attempts=2)).rollout_id
        [done] = client.wait_for_rollouts([rid], timeout=WAIT)
        assert (done.status, done.reward) == ("succeeded", 1.0)
        assert [a.status for a in client.get_attempts(rid)] == ["succeeded"]
        assert len(runs(marker_dir, rid)) == 1  # run once, its result kept


def test_duplicate_delivery_while_running_is_dropped_and_runs_once(
    settings: Settings, start_workers, worker_pool, marker_dir
):
    # The broker hands the message to a second worker 3 s after the first took it, while the
    # first still runs it (held until the test has seen the redelivery): the duplicate must be
    # dropped, never run, never recorded.
    settings = settings.model_copy(update={"visibility_timeout": 3, "heartbeat_interval": 0.4,
                                           "heartbeat_timeout": 2.5})
    with LightningClient(settings) as client:
        client.add_resources({"prompt": PromptTemplate(template="p")})
        start_workers(f"{AGENTS}:held_first", count=2, settings=settings)
        rid = client.enqueue_rollout({"marker_dir": marker_dir},
                                     config=RolloutConfig(max_attempts=3)).rollout_id

        worker_pool.wait_for_log(f"rollout {rid}: delivered again while attempt 1 runs", timeout=WAIT)
        (Path(marker_dir) / "go").touch()  # the first run may finish now
        [done] = client.wait_for_rollouts([rid], timeout=WAIT)

        assert (done.status, done.attempt_count) == ("succeeded", 1)
        assert [a.status for a in client.get_attempts(rid)] == ["succeeded"]
        assert len(runs(marker_dir, rid)) == 1


def test_worker_that_stops_consuming_is_reported_stalled(settings: Settings, start_workers, marker_dir):
    settings = settings.model_copy(update={"heartbeat_interval": 0.5, "stall_threshold_seconds": 3.0})
    with LightningClient(settings) as client:
        client.add_resources({"prompt": PromptTemplate(template="p")})
        stuck, healthy = start_workers(f"{AGENTS}:counted_sleeper", count=2, settings=settings)
        wait_until(lambda: len(client.worker_health()) == 2, what="both workers' health records")
        # Alive but no longer consuming, as after the kombu reconnect bug.
        replies = client.celery.control.cancel_consumer(settings.queue, destination=[stuck.hostname], reply=True,
                                                     timeout=10)
        assert replies, "the worker did not answer the remote control command"

        # The healthy worker takes one, the others wait in the queue.
        client.enqueue_rollouts([{"marker_dir": marker_dir, "sleep": 30} for _ in range(3)])

        def stalled() -> list:
            return [h for h in client.worker_health() if h.stalled]

        [report] = wait_until(stalled, what="a stalled worker")  # type: ignore[misc]
        assert report.hostname == stuck.hostname
        assert report.free_slots == 1 and report.last_received is None
        assert settings.queue in report.queues and settings.queue not in report.consuming
        assert "no longer consumes" in report.reason
        by_host = {h.hostname: h for h in client.worker_health()}
        assert not by_host[healthy.hostname].stalled
        assert by_host[healthy.hostname].active == 1


def test_idempotent_enqueue_runs_the_rollout_once(settings: Settings, start_workers, worker_pool, marker_dir):
    with LightningClient(settings) as client:
        client.add_resources({"prompt": PromptTemplate(template="p")})
        start_workers(f"{AGENTS}:counted_sleeper", count=2, settings=settings)
        task = {"marker_dir": marker_dir, "sleep": 0.2}
        first = client.enqueue_rollout(task, idempotency_key="experiment-1/item-1")
        # The caller retries the same enqueue (say after a network error), while and after it runs.
        again = client.enqueue_rollout(task, idempotency_key="experiment-1/item-1")
        [done] = client.wait_for_rollouts([first.rollout_id], timeout=WAIT)
        late = client.enqueue_rollout(task, idempotency_key="experiment-1/item-1")

        assert first.rollout_id == again.rollout_id == late.rollout_id
        assert late.status == "succeeded" and done.attempt_count == 1
        assert len(client.query_rollouts()) == 1
        assert len(runs(marker_dir, first.rollout_id)) == 1
        # One message was ever sent: none waits in the queue and the workers received one.
        assert client.redis.llen(f"{settings.keys.celery_prefix}{settings.queue}") == 0
        received = f"Task lightning_queue.rollout[{first.rollout_id}] received"
        assert sum(w.log().count(received) for w in worker_pool.workers) == 1


def test_retries_wait_their_backoff_and_end_failed_with_the_last_error(settings: Settings, start_workers):
    with LightningClient(settings) as client:
        client.add_resources({"prompt": PromptTemplate(template="p")})
        start_workers("tests.integration.agents:failing", count=1, settings=settings)
        config = RolloutConfig(max_attempts=3, retry_backoff_seconds=1.0)
        rid = client.enqueue_rollout({"name": "backoff"}, config=config).rollout_id

        [done] = client.wait_for_rollouts([rid], timeout=WAIT)

        assert (done.status, done.attempt_count) == ("failed", 3)
        assert (done.error.type, done.error.message) == ("ValueError", "boom on backoff")
        attempts = client.get_attempts(rid)
        # Each retry was sent with its countdown: it cannot have started before the backoff ran out.
        gaps = [later.start_time - earlier.end_time for earlier, later in itertools.pairwise(attempts)]
        assert gaps[0] >= 1.0 and gaps[1] >= 2.0, gaps
