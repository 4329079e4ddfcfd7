"""Nothing is left stuck: failures, retries, time limits, dead workers and cancels.

The two tests of a pool process dying share a fleet (``shared_workers``: its worker replaces the
process); the others need workers of their own (other agents or settings, or started later)."""

from __future__ import annotations

import time
from pathlib import Path

from lightning_queue import (
    LightningClient,
    PromptTemplate,
    RolloutConfig,
    RolloutRequest,
)

AGENTS = "tests.integration.agents"
WAIT = 60.0
NEVER = 3600  # seconds an agent sleeps when only a limit or a cancel may end it: far beyond any WAIT


def add_prompt(client: LightningClient) -> str:
    return client.add_resources({"prompt": PromptTemplate(template="p")}).resources_id


def served_after(client: LightningClient, worker_id: str, rollout_ids: list[str]) -> list[str]:
    """Of ``rollout_ids``, those that succeeded on ``worker_id``."""
    return [
        rid for rid in rollout_ids
        if any(a.worker_id == worker_id and a.status == "succeeded" for a in client.get_attempts(rid))
    ]


def test_unknown_snapshot_fails_the_rollout_naming_the_id_and_the_worker_goes_on(client, start_workers):
    add_prompt(client)
    workers = start_workers(f"{AGENTS}:echo", count=2)
    [bad] = client.enqueue_rollouts([{"i": 0}], resources_id="no-such-snapshot", check_resources=False,
                                    config=RolloutConfig(max_attempts=3))

    [done] = client.wait_for_rollouts([bad.rollout_id], timeout=WAIT)

    assert done.status == "failed"
    assert done.error.type == "ResourcesNotFoundError"
    assert "'no-such-snapshot'" in done.error.message
    [attempt] = client.get_attempts(bad.rollout_id)  # not retried: another attempt cannot fix it
    assert attempt.status == "failed"
    assert attempt.resources_id is None

    later = client.enqueue_rollouts([{"i": i, "sleep": 0.2} for i in range(6)])
    finished = client.wait_for_rollouts([r.rollout_id for r in later], timeout=WAIT)
    assert [r.status for r in finished] == ["succeeded"] * 6
    assert served_after(client, attempt.worker_id, [r.rollout_id for r in later])
    assert attempt.worker_id in {w.hostname for w in workers}


def test_agent_exception_is_recorded_and_retried_until_max_attempts(client, start_workers, worker_pool):
    add_prompt(client)
    start_workers(f"{AGENTS}:failing", count=2)
    rollouts = client.enqueue_rollouts([
        RolloutRequest(input={"name": "once"}),
        RolloutRequest(input={"name": "thrice"}, config=RolloutConfig(max_attempts=3)),
    ])

    finished = client.wait_for_rollouts([r.rollout_id for r in rollouts], timeout=WAIT)

    assert [r.status for r in finished] == ["failed", "failed"]
    assert [len(client.get_attempts(r.rollout_id)) for r in finished] == [1, 3]
    assert finished[1].attempt_count == 3
    for done in finished:
        for attempt in client.get_attempts(done.rollout_id):
            assert attempt.status == "failed"
            assert attempt.error.type == "ValueError"
            assert attempt.error.message == f"boom on {done.input['name']}"
            assert "Traceback" in attempt.error.traceback and "agents.py" in attempt.error.traceback
        assert done.error.type == "ValueError"
        assert done.result is None
    # A failed rollout is an expected outcome for Celery: logged in one line, no traceback.
    worker_pool.wait_for_log(f"{rollouts[1].rollout_id}] raised expected: RolloutFailed", timeout=10)
    assert not any("raised unexpected" in w.log() for w in worker_pool.workers)


def test_agent_failing_once_succeeds_on_the_second_attempt(client, start_workers, marker_dir):
    add_prompt(client)
    start_workers(f"{AGENTS}:flaky", count=2)
    rollouts = client.enqueue_rollouts([{"marker_dir": marker_dir, "i": i} for i in range(3)],
                                       config=RolloutConfig(max_attempts=2))

    finished = client.wait_for_rollouts([r.rollout_id for r in rollouts], timeout=WAIT)

    for done in finished:
        assert (done.status, done.reward, done.attempt_count, done.error) == ("succeeded", 0.5, 2, None)
        first, second = client.get_attempts(done.rollout_id)
        assert (first.status, first.error.type) == ("failed", "ConnectionError")
        assert (second.status, second.sequence_id, second.error) == ("succeeded", 2, None)


def test_soft_time_limit_times_the_attempt_out(client, start_workers):
    add_prompt(client)
    start_workers(f"{AGENTS}:sleeper", count=2)
    # It would sleep for an hour: finishing within the wait at all means the limit stopped it.
    slow = client.enqueue_rollout({"sleep": NEVER}, config=RolloutConfig(timeout_seconds=1))

    [done] = client.wait_for_rollouts([slow.rollout_id], timeout=WAIT)

    assert done.status == "failed"
    assert done.error.type == "SoftTimeLimitExceeded"
    [attempt] = client.get_attempts(slow.rollout_id)
    assert attempt.status == "timeout"


def test_hard_time_limit_kills_an_agent_ignoring_the_soft_one(settings, start_workers):
    settings = settings.model_copy(update={"hard_timeout_grace_seconds": 1.0})
    with LightningClient(settings) as client:
        add_prompt(client)
        start_workers(f"{AGENTS}:stubborn", count=2, settings=settings)
        # Ignoring the soft limit, it would sleep for two hours: finishing within the wait at all
        # means the hard limit killed it.
        slow = client.enqueue_rollout({"sleep": NEVER}, config=RolloutConfig(timeout_seconds=1))

        [done] = client.wait_for_rollouts([slow.rollout_id], timeout=WAIT)

        assert done.status == "failed"
        assert done.error.type == "TimeLimitExceeded"
        [attempt] = client.get_attempts(slow.rollout_id)
        assert attempt.status == "timeout"

        later = client.enqueue_rollouts([{"sleep": 0.3} for _ in range(6)])
        finished = client.wait_for_rollouts([r.rollout_id for r in later], timeout=WAIT)
        assert [r.status for r in finished] == ["succeeded"] * 6
        assert served_after(client, attempt.worker_id, [r.rollout_id for r in later])


def test_rollout_survives_its_worker_process_dying(shared_workers, marker_dir):
    client = shared_workers(f"{AGENTS}:suicidal", count=2).client  # kills a pool process: its worker replaces it
    add_prompt(client)
    rollout = client.enqueue_rollout({"marker_dir": marker_dir}, config=RolloutConfig(max_attempts=2))

    [done] = client.wait_for_rollouts([rollout.rollout_id], timeout=WAIT)

    assert (done.status, done.attempt_count, done.reward) == ("succeeded", 2, 1.0)
    first, second = client.get_attempts(rollout.rollout_id)
    assert (first.status, first.error.type) == ("worker_lost", "WorkerLostError")
    assert second.status == "succeeded"


def test_lost_worker_fails_the_rollout_when_no_attempt_is_left(shared_workers, marker_dir):
    client = shared_workers(f"{AGENTS}:suicidal", count=2).client
    add_prompt(client)
    rollout = client.enqueue_rollout({"marker_dir": marker_dir})  # max_attempts=1

    [done] = client.wait_for_rollouts([rollout.rollout_id], timeout=WAIT)

    assert (done.status, done.attempt_count, done.error.type) == ("failed", 1, "WorkerLostError")
    [attempt] = client.get_attempts(rollout.rollout_id)
    assert attempt.status == "worker_lost"


def test_cancelled_queued_rollout_is_never_run(client, start_workers, worker_pool, marker_dir):
    # Workers of its own, started after the cancel: Celery's revoke broadcast never reached them,
    # so what skips the rollout is the runner's check of the record (running workers would drop
    # the message as revoked before the runner sees it).
    add_prompt(client)
    cancelled, kept = client.enqueue_rollouts([{"marker_dir": marker_dir, "i": i} for i in range(2)])
    assert client.cancel_rollout(cancelled.rollout_id) == "cancelled"

    start_workers(f"{AGENTS}:echo", count=2)
    finished = client.wait_for_rollouts([cancelled.rollout_id, kept.rollout_id], timeout=WAIT)
    # The worker that took the cancelled rollout's message skipped it.
    worker_pool.wait_for_log(f"{cancelled.rollout_id}] succeeded", timeout=WAIT)

    assert [r.status for r in finished] == ["cancelled", "succeeded"]
    assert client.get_rollout(cancelled.rollout_id).status == "cancelled"
    assert client.get_attempts(cancelled.rollout_id) == []
    assert not (Path(marker_dir) / f"{cancelled.rollout_id}.ran").exists()
    assert (Path(marker_dir) / f"{kept.rollout_id}.ran").exists()


def test_cancelling_a_running_rollout_stops_it_and_frees_the_worker(client, start_workers, worker_pool):
    add_prompt(client)
    start_workers(f"{AGENTS}:sleeper", count=1)  # one worker, one pool process: one slot
    hanging = client.enqueue_rollout({"sleep": NEVER})
    deadline = time.monotonic() + WAIT
    while client.get_rollout(hanging.rollout_id).status != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)

    assert client.cancel_rollout(hanging.rollout_id) == "cancelled"
    quick = client.enqueue_rollout({"sleep": 0})
    (done,) = client.wait_for_rollouts([quick.rollout_id], timeout=WAIT)
    assert done.status == "succeeded"  # within the wait: the slot was freed, not after the hour's sleep
    assert client.get_rollout(hanging.rollout_id).status == "cancelled"
    assert [a.status for a in client.get_attempts(hanging.rollout_id)] == ["cancelled"]
    worker_pool.wait_for_log(f"Terminating {hanging.rollout_id}", timeout=WAIT)
