"""Hooks: fired once where each event happens; a hook that raises is logged and changes nothing."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery.exceptions import Retry

from lightning_queue import (
    Experiment,
    Experiments,
    LightningClient,
    PromptTemplate,
    Rollout,
    RolloutConfig,
    RolloutFailed,
    Variant,
    hooks,
    rollout,
)
from lightning_queue.core.hooks import Hook
from lightning_queue.core.models import default_actor
from tests.unit.test_runner import FakeTask, run

Events = dict[str, list[Any]]


@pytest.fixture
def events() -> Iterator[Events]:
    """Every event of every hook, by hook name, while the test runs."""
    seen: Events = {}
    connected = []
    for hook in (hooks.on_enqueue, hooks.on_start, hooks.on_success, hooks.on_failure, hooks.on_pointer_move):
        def record(event: Any, name: str = hook.name) -> None:
            seen.setdefault(name, []).append(event)
        hook.connect(record)
        connected.append((hook, record))
    yield seen
    for hook, record in connected:
        hook.disconnect(record)


@pytest.fixture
def broken() -> Iterator[Callable[[Hook[Any]], None]]:
    """Connect a receiver that raises to the hooks named."""
    connected: list[tuple[Hook[Any], Callable[[Any], None]]] = []

    def boom(event: Any) -> None:
        raise RuntimeError("hook bug")

    def connect(hook: Hook[Any]) -> None:
        hook.connect(boom)
        connected.append((hook, boom))

    yield connect
    for hook, receiver in connected:
        hook.disconnect(receiver)


def test_a_hook_calls_each_receiver_once_and_survives_one_that_raises(caplog: pytest.LogCaptureFixture) -> None:
    hook: Hook[int] = Hook("test")
    got: list[int] = []

    @hook.connect
    def first(event: int) -> None:
        raise ValueError("broken receiver")

    hook.connect(got.append)
    hook.connect(got.append)  # twice: still once
    with caplog.at_level(logging.ERROR, logger="lightning_queue.core.hooks"):
        hook.fire(7)
    assert got == [7]
    assert "hook test" in caplog.text and "first" in caplog.text and "broken receiver" in caplog.text
    hook.disconnect(first)
    assert len(hook.receivers) == 1


def test_enqueue_fires_once_per_call_with_the_rollouts(
    fake_client: LightningClient, published: list[Any], events: Events, broken: Callable[[Hook[Any]], None]
) -> None:
    fake_client.add_resources({"prompt": PromptTemplate(template="{x}")}, "rs-a")
    broken(hooks.on_enqueue)  # a hook that raises does not stop the enqueue
    rollouts = fake_client.enqueue_rollouts(["a", "b"])
    assert [[r.rollout_id for r in e.rollouts] for e in events["on_enqueue"]] == [[r.rollout_id for r in rollouts]]
    assert [r.status for r in fake_client.get_rollouts([r.rollout_id for r in rollouts])] == ["queuing"] * 2
    again = fake_client.enqueue_rollout("c", rollout_id="ro-chosen-1")
    fake_client.enqueue_rollout("c", rollout_id="ro-chosen-1")  # idempotent: nothing new, no event
    assert [[r.rollout_id for r in e.rollouts] for e in events["on_enqueue"]][1:] == [[again.rollout_id]]


def test_pointer_moves_fire_with_who_what_and_why(
    fake_client: LightningClient, events: Events, broken: Callable[[Hook[Any]], None]
) -> None:
    broken(hooks.on_pointer_move)
    fake_client.add_resources({"prompt": PromptTemplate(template="a")}, "rs-a", author="alice")
    fake_client.add_resources({"prompt": PromptTemplate(template="b")}, "rs-b", make_latest=False)
    fake_client.set_pointer("prod", "rs-a", actor="bob", reason="launch")
    fake_client.set_pointer("prod", "rs-b")
    fake_client.rollback("prod", reason="b is worse")
    fake_client.set_pointer("canary", "rs-b")
    fake_client.delete_resources("rs-b", force=True, actor="carol")
    assert [(e.pointer, e.from_id, e.to_id, e.by, e.op, e.reason) for e in events["on_pointer_move"]] == [
        ("latest", None, "rs-a", "alice", "add_resources", ""),
        ("prod", None, "rs-a", "bob", "set_pointer", "launch"),
        ("prod", "rs-a", "rs-b", default_actor(), "set_pointer", ""),
        ("prod", "rs-b", "rs-a", default_actor(), "rollback", "b is worse"),
        ("canary", None, "rs-b", default_actor(), "set_pointer", ""),
        ("canary", "rs-b", None, "carol", "delete", "snapshot rs-b deleted"),
    ]
    assert fake_client.get_pointer("prod") == "rs-a"  # the broken hook changed nothing


def test_promotion_fires_a_pointer_move(fake_client: LightningClient, events: Events) -> None:
    for rid in ("rs-a", "rs-b"):
        fake_client.add_resources({"prompt": PromptTemplate(template=rid)}, rid)
    experiments = Experiments(fake_client)
    experiments.create(Experiment(name="ab", variants=[Variant(name="control", resources_id="rs-a"),
                                                       Variant(name="treatment", resources_id="rs-b")]))
    experiments.start("ab")
    experiments.promote("ab", "treatment", pointer="prod")
    last = events["on_pointer_move"][-1]
    assert (last.pointer, last.to_id, last.op, last.reason) == ("prod", "rs-b", "promote ab",
                                                                 "promoted 'treatment' to 'prod'")


# --------------------------------------------------------------------------- worker side


@rollout
def good(task: Any) -> float:
    return 0.5


@rollout
def bad(task: Any) -> float:
    raise ValueError("agent bug")


def test_start_and_success_fire_on_the_worker_and_a_broken_hook_does_not_fail_the_rollout(
    fake_client: LightningClient, enqueue: Callable[..., Rollout], events: Events,
    broken: Callable[[Hook[Any]], None],
) -> None:
    fake_client.add_resources({"prompt": PromptTemplate(template="{x}")}, "rs-a")
    queued = enqueue({"q": 1})
    broken(hooks.on_start)
    broken(hooks.on_success)
    reply = run(FakeTask(fake_client, good), queued.rollout_id)

    assert reply["status"] == "succeeded" and fake_client.get_rollout(queued.rollout_id).reward == 0.5
    start, = events["on_start"]
    assert (start.rollout_id, start.attempt, start.resources_id, start.version, start.worker_id) == (
        queued.rollout_id, 1, "rs-a", 1, "worker-1@host")
    assert start.rollout.status == "running"
    done, = events["on_success"]
    assert (done.rollout_id, done.status, done.attempt, done.resources_id, done.reward, done.error) == (
        queued.rollout_id, "succeeded", 1, "rs-a", 0.5, None)
    assert "on_failure" not in events


def test_failure_fires_once_when_the_rollout_fails_not_on_a_retried_attempt(
    fake_client: LightningClient, enqueue: Callable[..., Rollout], events: Events,
    broken: Callable[[Hook[Any]], None],
) -> None:
    fake_client.add_resources({"prompt": PromptTemplate(template="{x}")}, "rs-a")
    queued = enqueue({"q": 1}, config=RolloutConfig(max_attempts=2))
    broken(hooks.on_failure)
    task = FakeTask(fake_client, bad)
    with pytest.raises(Retry):  # attempt 1 failed, the rollout is retried: not a failure yet
        run(task, queued.rollout_id)
    assert "on_failure" not in events
    # the retry's message, as the retry schedule would send it once due
    fake_client.redis.hset(fake_client.keys.rollout(queued.rollout_id), "status", "queuing")
    with pytest.raises(RolloutFailed):
        run(task, queued.rollout_id)
    failed, = events["on_failure"]
    assert (failed.status, failed.attempt, failed.error) == ("failed", 2, "ValueError: agent bug")
    assert fake_client.get_rollout(queued.rollout_id).status == "failed"


def test_a_missing_snapshot_fires_failure(
    fake_client: LightningClient, enqueue: Callable[..., Rollout], events: Events
) -> None:
    queued = enqueue({"q": 1}, resources_id="rs-gone", check_resources=False)
    with pytest.raises(RolloutFailed):
        run(FakeTask(fake_client, good), queued.rollout_id)
    failed, = events["on_failure"]
    assert failed.resources_id == "rs-gone" and failed.error is not None and "rs-gone" in failed.error
