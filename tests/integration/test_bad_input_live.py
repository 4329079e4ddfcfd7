"""The bad-input catalogue, live: the cases that need a real worker process (see
``tests/unit/test_bad_input.py`` for the rest). One worker, started once for the module
(``shared_workers``: restarted only if it died or a case failed), serves every case; after each,
the rollout has ended with a clear error (nothing lost or stuck) and the same worker process runs
the next good rollout (the worker is alive)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from pydantic import ValidationError

from lightning_queue import (
    LightningClient,
    PromptTemplate,
    ResourcesNotFoundError,
    RolloutConfig,
)
from lightning_queue.core.errors import InvalidRolloutIdError, InvalidRolloutMetadataError
from lightning_queue.core.keys import ROLLOUT_TASK
from lightning_queue.ops.fleet import WorkerProcess

AGENT = "tests.integration.bad_agents:catalogue"
WAIT = 60.0


@pytest.fixture
def live(shared_workers) -> tuple[LightningClient, WorkerProcess]:
    """The module's one worker (one pool process), and a client on its prefix and the test's queue."""
    share = shared_workers(AGENT, count=1, hard_timeout_grace_seconds=2)
    client = share.client
    try:
        client.get_resources_by_id("rs-ok")
    except ResourcesNotFoundError:  # the first test on this fleet
        client.add_resources({"prompt": PromptTemplate(template="Q: {question}")}, "rs-ok")
    (worker,) = share.workers
    return client, worker


def run(client: LightningClient, task: dict, **options) -> str:
    options.setdefault("resources_id", "rs-ok")
    queued = client.enqueue_rollout(task, **options)
    (done,) = client.wait_for_rollouts([queued.rollout_id], timeout=WAIT)
    assert done.is_finished, f"{queued.rollout_id} still {done.status}"
    return queued.rollout_id


def failed_with(client: LightningClient, rollout_id: str, error_type: str, *fragments: str) -> None:
    done = client.get_rollout(rollout_id)
    assert done.status == "failed" and done.error is not None, done
    assert done.error.type == error_type, done.error
    for fragment in fragments:
        assert fragment in done.error.message, done.error.message


def worker_goes_on(client: LightningClient, worker: WorkerProcess) -> None:
    rid = run(client, {"do": "ok"})
    assert client.get_rollout(rid).status == "succeeded"
    assert client.get_attempts(rid)[0].worker_id == worker.hostname and worker.alive


def test_live_unknown_resources_id_at_run_time(live) -> None:
    client, worker = live
    rid = run(client, {"do": "ok"}, resources_id="rs-never-added", check_resources=False,
              config=RolloutConfig(max_attempts=3))
    failed_with(client, rid, "ResourcesNotFoundError", "'rs-never-added'")
    assert len(client.get_attempts(rid)) == 1  # not retried: another attempt cannot fix it
    worker_goes_on(client, worker)


def test_live_unknown_pointer_at_run_time(live) -> None:
    client, worker = live
    rid = run(client, {"do": "ok"}, resources_id="canary", resolve="following", check_resources=False)
    failed_with(client, rid, "ResourcesNotFoundError", "'canary'")
    worker_goes_on(client, worker)


def test_live_snapshot_deleted_while_queued(live, tmp_path: Path) -> None:
    client, worker = live
    client.add_resources({"prompt": PromptTemplate(template="doomed")}, "rs-doomed")
    gate = tmp_path / "open"
    blocker = client.enqueue_rollout({"do": "gate", "gate": str(gate)}, resources_id="rs-ok")
    deadline = time.monotonic() + WAIT
    while client.get_rollout(blocker.rollout_id).status != "running":  # the only slot is taken
        assert time.monotonic() < deadline
        time.sleep(0.05)
    queued = client.enqueue_rollout({"do": "ok", "marker_dir": str(tmp_path)}, resources_id="rs-doomed")
    report = client.delete_resources("rs-doomed", force=True)
    gate.touch()

    assert queued.rollout_id in report.failed_rollouts
    done = client.wait_for_rollouts([blocker.rollout_id, queued.rollout_id], timeout=WAIT)
    assert [r.status for r in done] == ["succeeded", "failed"]
    failed_with(client, queued.rollout_id, "SnapshotDeletedError", "'rs-doomed'")
    worker_goes_on(client, worker)  # by now the worker has also taken (and acked) the doomed message
    assert not (tmp_path / f"{queued.rollout_id}.ran").exists()


def test_live_corrupted_snapshot_payload(live) -> None:
    client, worker = live
    client.add_resources({"prompt": PromptTemplate(template="to be damaged")}, "rs-damaged")
    client.redis.hset(client.keys.snapshot("rs-damaged"), "resources", b"\x00not what was written")
    rid = run(client, {"do": "ok"}, resources_id="rs-damaged", config=RolloutConfig(max_attempts=2))
    failed_with(client, rid, "SnapshotCorruptedError", "'rs-damaged'", "update_resources()")
    worker_goes_on(client, worker)


def test_live_agent_raises(live) -> None:
    client, worker = live
    rid = run(client, {"do": "raise"}, config=RolloutConfig(max_attempts=2))
    failed_with(client, rid, "ValueError", f"on purpose for {rid}")
    assert [a.status for a in client.get_attempts(rid)] == ["failed", "failed"]
    worker_goes_on(client, worker)


def test_live_agent_hangs(live) -> None:
    client, worker = live
    rid = run(client, {"do": "hang"}, config=RolloutConfig(timeout_seconds=1))
    failed_with(client, rid, "SoftTimeLimitExceeded", "time limit of 1")
    assert [a.status for a in client.get_attempts(rid)] == ["timeout"]
    worker_goes_on(client, worker)


def test_live_agent_returns_the_wrong_type(live) -> None:
    client, worker = live
    rid = run(client, {"do": "wrong_type"})
    failed_with(client, rid, "InvalidRolloutResultError", "str")
    worker_goes_on(client, worker)


def test_live_agent_asks_for_a_resource_the_snapshot_lacks(live) -> None:
    client, worker = live
    client.add_resources({"llm": {"resource_type": "llm", "endpoint": "http://llm.local/v1", "model": "m"}},
                         "rs-llm-only")
    rid = run(client, {"do": "ok"}, resources_id="rs-llm-only", config=RolloutConfig(max_attempts=3))
    failed_with(client, rid, "MissingResourceError", "'rs-llm-only'", "'prompt'", "PromptTemplate")
    assert len(client.get_attempts(rid)) == 1
    worker_goes_on(client, worker)


def test_live_template_does_not_render_with_the_task_variables(live) -> None:
    client, worker = live
    rid = run(client, {"do": "render", "vars": {"q": "2+2"}})
    failed_with(client, rid, "TemplateRenderError", "'question'", "variables given: q")
    worker_goes_on(client, worker)


def test_live_message_for_a_rollout_whose_record_is_gone(live, tmp_path: Path) -> None:
    client, worker = live
    gate = tmp_path / "open"
    blocker = client.enqueue_rollout({"do": "gate", "gate": str(gate)}, resources_id="rs-ok")
    deadline = time.monotonic() + WAIT
    while client.get_rollout(blocker.rollout_id).status != "running":  # the only slot is taken
        assert time.monotonic() < deadline
        time.sleep(0.05)
    queued = client.enqueue_rollout({"do": "ok"}, resources_id="rs-ok")
    client.redis.delete(client.keys.rollout(queued.rollout_id))  # expired, or deleted by hand
    gate.touch()
    deadline = time.monotonic() + WAIT
    while f"rollout {queued.rollout_id}: no such record" not in worker.log():  # dropped with a log line
        assert time.monotonic() < deadline, worker.log()[-3000:]
        time.sleep(0.1)
    worker_goes_on(client, worker)


def wait_for_file(path: Path) -> None:
    deadline = time.monotonic() + WAIT
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.05)


@pytest.mark.parametrize(("do", "fragment"), [("nan", "reward = nan"), ("inf_step", "step_rewards[1] = inf")])
def test_live_agent_reports_a_reward_that_is_not_finite(live, do: str, fragment: str) -> None:
    client, worker = live
    rid = run(client, {"do": do})
    failed_with(client, rid, "NonFiniteRewardError", fragment, "finite")
    assert client.get_rollout(rid).result is None  # not stored as null on a succeeded rollout
    worker_goes_on(client, worker)


@pytest.mark.parametrize(("do", "fragment"), [("exit", "sys.exit(3)"), ("interrupt", "KeyboardInterrupt")])
def test_live_agent_tries_to_exit_the_worker(live, do: str, fragment: str) -> None:
    client, worker = live
    rid = run(client, {"do": do})
    failed_with(client, rid, "AgentExitError", fragment)
    assert [a.status for a in client.get_attempts(rid)] == ["failed"]
    worker_goes_on(client, worker)


def test_live_metadata_that_is_not_json_is_refused_before_anything_is_written(live) -> None:
    client, _ = live
    before = sorted(client.redis.scan_iter(match=f"{client.settings.key_prefix}:rollout:*"))
    with pytest.raises(InvalidRolloutMetadataError, match="metadata is not JSON-serializable"):
        client.enqueue_rollout({"do": "ok"}, resources_id="rs-ok", metadata={"when": object()})
    assert sorted(client.redis.scan_iter(match=f"{client.settings.key_prefix}:rollout:*")) == before


def test_live_rollout_ids_cannot_address_another_rollouts_keys(live) -> None:
    client, worker = live
    job = run(client, {"do": "ok"}, rollout_id=f"job-{uuid.uuid4().hex[:8]}")
    forged = f"{job}:attempt:1"  # the key of that rollout's first attempt
    with pytest.raises(ValidationError, match="invalid rollout id"):
        client.enqueue_rollout({"do": "ok"}, resources_id="rs-ok", rollout_id=forged)
    for call in (client.get_rollout, client.get_attempts, client.cancel_rollout):
        with pytest.raises(InvalidRolloutIdError, match="no ':'"):
            call(forged)
    # A task message naming it (forged, or sent by an old client) is dropped, touching nothing.
    client.celery.send_task(ROLLOUT_TASK, kwargs={"rollout_id": forged}, queue=client.settings.queue)
    deadline = time.monotonic() + WAIT
    while f"rollout id {forged!r} is not a valid rollout id" not in worker.log():
        assert time.monotonic() < deadline, worker.log()[-3000:]
        time.sleep(0.1)
    assert [(a.status, a.result.reward if a.result else None) for a in client.get_attempts(job)] == [("succeeded", 1.0)]
    worker_goes_on(client, worker)


def test_live_cancel_frees_the_slot_of_an_agent_that_ignores_sigterm(live, tmp_path: Path) -> None:
    client, worker = live  # one pool process, and a grace of 2 s
    stubborn = client.enqueue_rollout({"do": "ignore_term", "marker_dir": str(tmp_path)}, resources_id="rs-ok")
    wait_for_file(tmp_path / f"{stubborn.rollout_id}.stubborn")
    assert client.cancel_rollout(stubborn.rollout_id) == "cancelled"
    worker_goes_on(client, worker)  # the only slot is free again: the next rollout runs
    assert f"rollout {stubborn.rollout_id}: its agent ignored SIGTERM" in worker.log()
    assert client.get_rollout(stubborn.rollout_id).status == "cancelled"


def test_live_hard_time_limit_comes_from_the_workers_grace_not_the_clients(live) -> None:
    client, worker = live  # the worker's grace is 2 s
    generous = LightningClient(client.settings.model_copy(update={"hard_timeout_grace_seconds": 30}))
    try:
        # Ignores its 1-s soft limit and would finish 10 s later, inside the client's grace.
        queued = generous.enqueue_rollout({"do": "ignore_soft", "after": 10}, resources_id="rs-ok",
                                          config=RolloutConfig(timeout_seconds=1))
    finally:
        generous.close()
    client.wait_for_rollouts([queued.rollout_id], timeout=WAIT)
    failed_with(client, queued.rollout_id, "TimeLimitExceeded", "ignored its soft time limit")
    assert [a.status for a in client.get_attempts(queued.rollout_id)] == ["timeout"]
    worker_goes_on(client, worker)
