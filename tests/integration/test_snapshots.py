"""Each rollout runs with exactly the snapshot it should: pinned, or the latest when it runs."""

from __future__ import annotations

from lightning_queue import (
    LightningClient,
    PromptTemplate,
    ResourcesUpdate,
    RolloutRequest,
)

ECHO = "tests.integration.agents:echo"
WAIT = 60.0


def prompt_snapshot(client: LightningClient, text: str, resources_id: str | None = None) -> ResourcesUpdate:
    return client.add_resources({"prompt": PromptTemplate(template=text)}, resources_id)


def test_pinned_and_unpinned_rollouts_run_with_their_snapshot_on_every_worker(client, start_workers):
    workers = start_workers(ECHO, count=2)
    a = prompt_snapshot(client, "prompt A", "snap-a")
    b = prompt_snapshot(client, "prompt B", "snap-b")  # now the latest
    requests = [RolloutRequest(input={"i": i, "sleep": 0.1}, resources_id=rid)
                for i in range(6) for rid in ("snap-a", "snap-b", None)]
    rollouts = client.enqueue_rollouts(requests)

    finished = client.wait_for_rollouts([r.rollout_id for r in rollouts], timeout=WAIT)

    assert [r.status for r in finished] == ["succeeded"] * len(requests)
    expected = {"snap-a": (a, "prompt A"), "snap-b": (b, "prompt B"), None: (b, "prompt B")}
    worker_ids = set()
    for request, done in zip(requests, finished):
        snapshot, prompt = expected[request.resources_id]
        assert done.resources_id == request.resources_id  # the record keeps what was asked for
        assert done.result.output["prompt"] == prompt
        assert done.result.output["input"] == request.input
        [attempt] = client.get_attempts(done.rollout_id)
        assert (attempt.resources_id, attempt.resources_version) == (snapshot.resources_id, 1)
        assert attempt.status == "succeeded"
        worker_ids.add(attempt.worker_id)
    assert worker_ids == {w.hostname for w in workers}
    assert {r.rollout_id for r in client.query_rollouts(resources_id="snap-a")} == {
        r.rollout_id for r, q in zip(rollouts, requests) if q.resources_id == "snap-a"
    }


def test_unpinned_rollouts_take_the_latest_when_they_run_not_when_enqueued(client, start_workers):
    old = prompt_snapshot(client, "old prompt")
    unpinned = client.enqueue_rollouts([{"i": i} for i in range(4)])
    pinned = client.enqueue_rollouts([{"i": i} for i in range(2)], resources_id=old.resources_id)
    # While the rollouts wait, the pinned snapshot gets a new version and the latest moves.
    client.update_resources(old.resources_id, {"prompt": PromptTemplate(template="old prompt v2")})
    new = prompt_snapshot(client, "new prompt")
    assert [r.status for r in client.get_rollouts([r.rollout_id for r in unpinned])] == ["queuing"] * 4

    start_workers(ECHO, count=2)
    finished = client.wait_for_rollouts([r.rollout_id for r in unpinned + pinned], timeout=WAIT)

    assert [r.status for r in finished] == ["succeeded"] * 6
    ran_with = []
    for done in finished:
        [attempt] = client.get_attempts(done.rollout_id)
        ran_with.append((done.result.output["prompt"], attempt.resources_id, attempt.resources_version))
    assert ran_with == [("new prompt", new.resources_id, 1)] * 4 + [("old prompt", old.resources_id, 1)] * 2
