"""Snapshot lifecycle against real workers: pointer switches, rollbacks, updates and forced
deletions made while rollouts wait in the queue, then picked up (or not) when workers start.

Every test enqueues while no worker runs, changes the registry, and only then starts a
:class:`~lightning_queue.ops.fleet.LocalFleet`, so what the workers see is decided by the rule
(pinned: fixed at enqueue; following: resolved at run time), not by timing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import redis

from lightning_queue import LightningClient, PromptTemplate, Rollout, Settings
from lightning_queue.ops.fleet import LocalFleet
from tests.integration.conftest import STOP_GRACE

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
AGENT = "tests.integration.lifecycle_agents:agent"
WAIT = 30.0


def add_prompt(client: LightningClient, resources_id: str, text: str) -> None:
    client.add_resources({"prompt": PromptTemplate(template=text)}, resources_id)


@pytest.fixture
def start_fleet(settings: Settings) -> Iterator[Callable[[], LocalFleet]]:
    """Start two real ``celery worker`` processes for the lifecycle agent; stopped after the test."""
    fleets: list[LocalFleet] = []

    def start() -> LocalFleet:
        fleet = LocalFleet(settings, AGENT, count=2, pythonpath=[str(REPO_ROOT)])
        fleets.append(fleet)
        return fleet.start()

    yield start
    for fleet in fleets:
        fleet.close(STOP_GRACE)


def wait_all(client: LightningClient, fleet: LocalFleet, rollouts: Sequence[Rollout]) -> list[Rollout]:
    ids = [r.rollout_id for r in rollouts]
    done = client.wait_for_rollouts(ids, timeout=WAIT)
    if len(done) < len(ids):
        pending = client.store.statuses([i for i in ids if i not in {d.rollout_id for d in done}])
        raise AssertionError(f"rollouts not finished after {WAIT} s: {pending}\n{fleet.logs()[-6000:]}")
    return done


def ran_with(client: LightningClient, done: Rollout) -> tuple[str, str | None, int | None]:
    """(prompt the agent saw, resources_id, version) of a succeeded rollout's only attempt."""
    attempt, = client.get_attempts(done.rollout_id)
    assert done.status == "succeeded", (done.status, done.error)
    return done.result.output, attempt.resources_id, attempt.resources_version  # type: ignore[union-attr]


def test_pinned_keeps_the_old_target_and_following_takes_the_new_one_after_a_switch(
    client: LightningClient, start_fleet: Callable[[], LocalFleet]
) -> None:
    add_prompt(client, "snap-old", "old prompt")
    add_prompt(client, "snap-new", "new prompt")
    client.set_pointer("prod", "snap-old")
    pinned = client.enqueue_rollouts([{"i": i} for i in range(3)], resources_id="prod")
    following = client.enqueue_rollouts([{"i": i} for i in range(3)], resources_id="prod", resolve="following")
    assert {(r.resources_id, r.resources_version) for r in pinned} == {("snap-old", 1)}

    client.set_pointer("prod", "snap-new")  # while every rollout waits, no worker running
    fleet = start_fleet()
    done = wait_all(client, fleet, pinned + following)

    assert [ran_with(client, d) for d in done] == [("old prompt", "snap-old", 1)] * 3 + [("new prompt", "snap-new", 1)] * 3
    assert [d.resources_id for d in done] == ["snap-old"] * 3 + ["prod"] * 3  # records keep what was asked


def test_a_rollback_before_the_workers_start_is_followed(
    client: LightningClient, start_fleet: Callable[[], LocalFleet]
) -> None:
    add_prompt(client, "snap-good", "good prompt")
    add_prompt(client, "snap-bad", "bad prompt")
    client.set_pointer("prod", "snap-good")
    client.set_pointer("prod", "snap-bad")  # a bad release...
    pinned = client.enqueue_rollouts([{"i": i} for i in range(2)], resources_id="prod")
    following = client.enqueue_rollouts([{"i": i} for i in range(2)], resources_id="prod", resolve="following")

    move = client.rollback("prod")  # ...rolled back while its rollouts wait
    assert (move.from_id, move.to_id) == ("snap-bad", "snap-good")
    fleet = start_fleet()
    done = wait_all(client, fleet, pinned + following)

    assert [ran_with(client, d) for d in done] == [("bad prompt", "snap-bad", 1)] * 2 + [("good prompt", "snap-good", 1)] * 2


def test_update_between_enqueue_and_run(client: LightningClient, start_fleet: Callable[[], LocalFleet]) -> None:
    add_prompt(client, "snap-u", "prompt v1")
    pinned = client.enqueue_rollouts([{"i": i} for i in range(2)], resources_id="snap-u")
    following = client.enqueue_rollouts([{"i": i} for i in range(2)], resources_id="snap-u", resolve="following")
    latest = client.enqueue_rollout({"i": "latest"})

    client.update_resources("snap-u", {"prompt": PromptTemplate(template="prompt v2")}, expected_version=1)
    fleet = start_fleet()
    done = wait_all(client, fleet, [*pinned, *following, latest])

    assert [ran_with(client, d) for d in done] == (
        [("prompt v1", "snap-u", 1)] * 2 + [("prompt v2", "snap-u", 2)] * 3
    )


def test_forced_deletion_fails_queued_rollouts_and_workers_never_run_them(
    client: LightningClient, settings: Settings, start_fleet: Callable[[], LocalFleet], tmp_path: Path
) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    add_prompt(client, "snap-doomed", "doomed prompt")
    add_prompt(client, "snap-kept", "kept prompt")
    doomed = client.enqueue_rollouts([{"i": i, "marker_dir": str(markers)} for i in range(4)],
                                     resources_id="snap-doomed")
    kept = client.enqueue_rollouts([{"i": i, "marker_dir": str(markers)} for i in range(2)],
                                   resources_id="snap-kept")

    report = client.delete_resources("snap-doomed", force=True)
    assert sorted(report.failed_rollouts) == sorted(r.rollout_id for r in doomed)
    fleet = start_fleet()
    done = wait_all(client, fleet, kept + doomed)  # the doomed ones are already finished
    wait_for_empty_queue(settings, fleet)

    assert [ran_with(client, d) for d in done[:2]] == [("kept prompt", "snap-kept", 1)] * 2
    for failed in client.get_rollouts([r.rollout_id for r in doomed]):
        assert failed.status == "failed" and failed.error is not None
        assert failed.error.type == "SnapshotDeletedError" and "'snap-doomed' was deleted" in failed.error.message
        assert failed.attempt_count == 0 and client.get_attempts(failed.rollout_id) == []
    assert sorted(p.name for p in markers.iterdir()) == sorted(f"{r.rollout_id}.ran" for r in kept)


def wait_for_empty_queue(settings: Settings, fleet: LocalFleet) -> None:
    """Until every message was taken and acked: the workers have handled the skipped rollouts too."""
    r = redis.Redis.from_url(settings.redis_url)
    queue, unacked = f"{settings.keys.celery_prefix}{settings.queue}", f"{settings.keys.celery_prefix}unacked"
    deadline = time.monotonic() + WAIT
    try:
        while r.llen(queue) or r.hlen(unacked):
            if time.monotonic() > deadline:
                raise AssertionError(f"messages still queued or unacked after {WAIT} s\n{fleet.logs()[-6000:]}")
            time.sleep(0.1)
    finally:
        r.close()
