"""Retention: finished rollouts expire, readers skip them, old snapshots are deleted on a policy."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import fakeredis
import pytest

from lightning_queue import (
    LightningClient,
    PromptTemplate,
    Rollout,
    RolloutConfig,
    RolloutResult,
    Settings,
)
from lightning_queue.app import create_app
from lightning_queue.core.errors import RolloutNotFoundError
from lightning_queue.core.keys import RETENTION_TASK as TASK_NAME
from lightning_queue.core.models import ErrorInfo
from lightning_queue.storage.retention import RetentionPolicy, apply_retention
from lightning_queue.storage.store import RolloutStore
from lightning_queue.worker.context import WorkerContext
from lightning_queue.worker.tasks import SCHEDULE_ENTRY
from tests.unit.test_store import expire_heartbeat, run_to_running

MakeRollouts = Callable[..., list[Rollout]]
TTL = 7 * 24 * 3600  # the default of Settings.rollout_ttl_seconds, which fake_client uses


def ttls(store: RolloutStore, rollout_id: str) -> list[int]:
    """TTL of the rollout hash, then of each attempt hash (-1: no expiry, -2: gone)."""
    r, k = store.redis, store.keys
    count = int(r.hget(k.rollout(rollout_id), "attempt_count") or 0)
    return [r.ttl(k.rollout(rollout_id))] + [r.ttl(k.attempt(rollout_id, n)) for n in range(1, count + 1)]


def expires_with_ttl(values: list[int], ttl: int = TTL) -> bool:
    return all(ttl - 5 <= v <= ttl for v in values)


def expire(store: RolloutStore, rollout: Rollout) -> None:
    """What Redis does when the TTL runs out: the record and its attempts disappear."""
    k = store.keys
    store.redis.delete(k.rollout(rollout.rollout_id), *store.redis.keys(f"{k.attempt_prefix(rollout.rollout_id)}*"))


def prompt(text: str) -> dict[str, PromptTemplate]:
    return {"prompt": PromptTemplate(template=text)}


def state(fake_redis: fakeredis.FakeRedis) -> dict[bytes, Any]:
    return {key: fake_redis.dump(key) for key in fake_redis.keys("*")}


# --------------------------------------------------------------------------- expiry on every final path


def test_success_sets_ttl_on_rollout_and_every_attempt(store: RolloutStore, make_rollouts: MakeRollouts) -> None:
    rollout, = make_rollouts(1, config=RolloutConfig(max_attempts=2))
    rid = rollout.rollout_id
    run_to_running(store, rollout)
    assert store.finish_attempt(rid, 1, "failed", "requeuing", error=ErrorInfo(type="E", message="m")) == "requeuing"
    assert ttls(store, rid) == [-1, -1]  # not finished: kept

    run_to_running(store, rollout, worker="w2")
    assert store.finish_attempt(rid, 2, "succeeded", "succeeded", result=RolloutResult(reward=1)) == "succeeded"
    values = ttls(store, rid)
    assert len(values) == 3 and expires_with_ttl(values)


def test_final_failure_sets_ttl(store: RolloutStore, make_rollouts: MakeRollouts) -> None:
    rollout, = make_rollouts(1)
    run_to_running(store, rollout)
    error = ErrorInfo(type="E", message="m")
    assert store.finish_attempt(rollout.rollout_id, 1, "failed", "failed", error=error) == "failed"
    assert expires_with_ttl(ttls(store, rollout.rollout_id))


def test_cancel_sets_ttl_and_a_late_attempt_outcome_expires_with_it(
    store: RolloutStore, make_rollouts: MakeRollouts
) -> None:
    queued, running = make_rollouts(2)
    assert store.terminate(queued.rollout_id, "cancelled") == "cancelled"
    assert expires_with_ttl(ttls(store, queued.rollout_id))

    run_to_running(store, running)
    assert store.terminate(running.rollout_id, "cancelled") == "cancelled"
    assert expires_with_ttl(ttls(store, running.rollout_id))
    # Its attempt finishes after the cancel: the outcome is kept on the attempt, which still expires.
    late = store.finish_attempt(running.rollout_id, 1, "succeeded", "succeeded", result=RolloutResult(reward=1))
    assert late == "cancelled"
    assert expires_with_ttl(ttls(store, running.rollout_id))


def test_lost_attempt_that_fails_the_rollout_sets_ttl(store: RolloutStore, make_rollouts: MakeRollouts) -> None:
    rollout, = make_rollouts(1)
    run_to_running(store, rollout, worker="w-dead")
    expire_heartbeat(store, rollout.rollout_id)
    assert store.claim(rollout, "w-alive").outcome == "lost"
    assert expires_with_ttl(ttls(store, rollout.rollout_id))


def test_forced_delete_sets_ttl_on_the_rollouts_it_fails(
    fake_client: LightningClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fake_client, "publish", lambda rollouts, registry_seq=0: None)
    fake_client.add_resources(prompt("a"), "rs-a")
    queued = fake_client.enqueue_rollout("q", resources_id="rs-a")
    running = fake_client.enqueue_rollout("r", resources_id="rs-a")
    run_to_running(fake_client.store, running)

    report = fake_client.delete_resources("rs-a", force=True)
    assert sorted(report.failed_rollouts) == sorted([queued.rollout_id, running.rollout_id])
    for r in (queued, running):
        assert fake_client.get_rollout(r.rollout_id).status == "failed"
        assert expires_with_ttl(ttls(fake_client.store, r.rollout_id))
    assert len(ttls(fake_client.store, running.rollout_id)) == 2  # its attempt too


def test_ttl_follows_settings_and_none_keeps_records(fake_redis: fakeredis.FakeRedis, prefix: str) -> None:
    short = LightningClient(Settings(key_prefix=prefix, rollout_ttl_seconds=60), redis_client=fake_redis)
    assert short.store.rollout_ttl_seconds == 60 and short.registry.rollout_ttl_seconds == 60
    rollout = Rollout(input=1)
    short.store.create_rollouts([rollout])
    short.store.terminate(rollout.rollout_id, "cancelled")
    assert expires_with_ttl(ttls(short.store, rollout.rollout_id), 60)

    forever = LightningClient(Settings(key_prefix=prefix, rollout_ttl_seconds=None), redis_client=fake_redis)
    kept = Rollout(input=2)
    forever.store.create_rollouts([kept])
    run_to_running(forever.store, kept)
    forever.store.finish_attempt(kept.rollout_id, 1, "succeeded", "succeeded", result=RolloutResult(reward=1))
    assert ttls(forever.store, kept.rollout_id) == [-1, -1]
    assert RolloutStore(fake_redis, forever.keys).rollout_ttl_seconds is None  # the constructor's default


def test_records_really_expire(fake_redis: fakeredis.FakeRedis, prefix: str, make_rollouts: MakeRollouts,
                               store: RolloutStore) -> None:
    rollout, = make_rollouts(1)
    run_to_running(store, rollout)
    store.finish_attempt(rollout.rollout_id, 1, "succeeded", "succeeded", result=RolloutResult(reward=1))
    k = store.keys
    for key in (k.rollout(rollout.rollout_id), k.attempt(rollout.rollout_id, 1)):
        fake_redis.pexpire(key, 1)  # the TTL running out, sped up
    time.sleep(0.01)
    assert fake_redis.exists(k.rollout(rollout.rollout_id), k.attempt(rollout.rollout_id, 1)) == 0
    assert store.query_rollouts() == []


# --------------------------------------------------------------------------- readers skip expired ids


def test_get_rollout_of_an_expired_id_says_it_may_have_expired(
    store: RolloutStore, make_rollouts: MakeRollouts
) -> None:
    rollout, = make_rollouts(1)
    store.terminate(rollout.rollout_id, "cancelled")
    expire(store, rollout)
    with pytest.raises(RolloutNotFoundError, match="expired") as info:
        store.get_rollout(rollout.rollout_id)
    assert rollout.rollout_id in str(info.value)
    with pytest.raises(RolloutNotFoundError, match="expired"):
        store.get_attempts(rollout.rollout_id)


def test_queries_skip_expired_ids_and_drop_them_from_the_indexes_read(
    store: RolloutStore, make_rollouts: MakeRollouts
) -> None:
    rollouts = make_rollouts(6, mode="train", resources_id="rs-a")  # enqueued oldest first
    for r in rollouts[:4]:
        store.terminate(r.rollout_id, "cancelled")
    gone = [rollouts[1], rollouts[3]]
    for r in gone:
        expire(store, r)
    live = [r.rollout_id for r in reversed(rollouts) if r not in gone]
    k = store.keys

    assert [r.rollout_id for r in store.query_rollouts(status="cancelled", mode="train")] == \
        [rollouts[2].rollout_id, rollouts[0].rollout_id]
    for r in gone:  # dropped from the indexes that query read, and from the main and status indexes
        for key in (k.rollouts, k.rollouts_by_status("cancelled"), k.rollouts_by_mode("train")):
            assert store.redis.zscore(key, r.rollout_id) is None
        # ... the others are left to retention's prune
        assert store.redis.zscore(k.rollouts_by_resources("rs-a"), r.rollout_id) is not None

    assert [r.rollout_id for r in store.query_rollouts()] == live
    assert [r.rollout_id for r in store.query_rollouts(resources_id="rs-a")] == live


@pytest.mark.parametrize("filtered", [False, True], ids=["no-filter", "filter"])
def test_pages_are_filled_past_expired_entries(
    store: RolloutStore, make_rollouts: MakeRollouts, filtered: bool
) -> None:
    rollouts = list(reversed(make_rollouts(8, mode="val")))  # newest first
    for r in rollouts[1:5]:
        store.terminate(r.rollout_id, "cancelled")
        expire(store, r)
    query = (lambda **kw: store.query_rollouts(mode="val", **kw)) if filtered else store.query_rollouts
    first = query(limit=2)
    second = query(limit=2, offset=2)
    assert [r.rollout_id for r in first + second] == [r.rollout_id for r in rollouts[:1] + rollouts[5:]]
    assert query(offset=4) == []


def test_wait_for_rollouts_returns_finished_rollouts_that_have_a_ttl(
    store: RolloutStore, make_rollouts: MakeRollouts
) -> None:
    a, b = make_rollouts(2)
    run_to_running(store, a)
    store.finish_attempt(a.rollout_id, 1, "succeeded", "succeeded", result=RolloutResult(reward=0.5))
    store.terminate(b.rollout_id, "cancelled")
    done = store.wait_for_rollouts([a.rollout_id, b.rollout_id], timeout=1)
    assert [(r.rollout_id, r.status) for r in done] == [(a.rollout_id, "succeeded"), (b.rollout_id, "cancelled")]


# --------------------------------------------------------------------------- the retention policy


@pytest.fixture
def history(fake_client: LightningClient, monkeypatch: pytest.MonkeyPatch) -> LightningClient:
    """rs-0 ... rs-7, written in that order (rs-7 is latest); no broker."""
    monkeypatch.setattr(fake_client, "publish", lambda rollouts, registry_seq=0: None)
    for i in range(8):
        fake_client.add_resources(prompt(f"p{i}"), f"rs-{i}")
    return fake_client


def stored(client: LightningClient) -> list[str]:
    return client.registry.list_ids()


def test_keeps_newest_n_plus_pointed_plus_in_use(history: LightningClient) -> None:
    c = history
    c.set_pointer("prod", "rs-1")
    queued = c.enqueue_rollout("q", resources_id="rs-2")  # pinned, waiting in the queue
    following = c.enqueue_rollout("f", resources_id="rs-6", resolve="following")
    running = c.enqueue_rollout("r")  # follows latest, but is running with rs-3
    run_to_running(c.store, running, resources_id="rs-3")
    finished = c.enqueue_rollout("done", resources_id="rs-4")
    c.store.terminate(finished.rollout_id, "cancelled")  # a finished rollout keeps nothing

    report = apply_retention(c.registry, c.store, keep=2)

    assert report.kept == {
        "rs-7": ["newest", "pointer latest"],
        "rs-6": ["newest", "used by 1 queued/running rollout"],
        "rs-3": ["used by 1 queued/running rollout"],
        "rs-2": ["used by 1 queued/running rollout"],
        "rs-1": ["pointer prod"],
    }
    assert report.deleted == ["rs-0", "rs-4", "rs-5"]  # oldest first
    assert report.skipped == {} and not report.dry_run and report.elapsed >= 0
    assert stored(c) == ["rs-7", "rs-6", "rs-3", "rs-2", "rs-1"]
    assert {queued.rollout_id, following.rollout_id, running.rollout_id} <= {
        r.rollout_id for r in c.query_rollouts(status=["queuing", "running"])
    }
    # Applying it again changes nothing.
    again = c.apply_retention(keep=2)
    assert again.deleted == [] and stored(c) == ["rs-7", "rs-6", "rs-3", "rs-2", "rs-1"]


def test_dry_run_deletes_nothing(history: LightningClient, fake_redis: fakeredis.FakeRedis,
                                 make_rollouts: MakeRollouts) -> None:
    expired, = make_rollouts(1, mode="val")
    history.store.terminate(expired.rollout_id, "cancelled")
    expire(history.store, expired)
    before = state(fake_redis)

    report = RetentionPolicy(keep=3).apply(history.registry, history.store, dry_run=True)

    assert report.dry_run and report.deleted == ["rs-0", "rs-1", "rs-2", "rs-3", "rs-4"]
    assert report.pruned == 4  # main, status, mode and end-time index entries
    assert state(fake_redis) == before
    assert "would delete 5" in report.summary()


def test_client_default_keep_comes_from_settings(fake_redis: fakeredis.FakeRedis, prefix: str) -> None:
    client = LightningClient(Settings(key_prefix=prefix, gc_keep=2), redis_client=fake_redis)
    for i in range(4):
        client.add_resources(prompt(f"p{i}"), f"rs-{i}")
    report = client.apply_retention()
    assert report.keep == 2 and report.deleted == ["rs-0", "rs-1"]


def test_snapshot_that_comes_into_use_meanwhile_is_skipped(
    history: LightningClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    queued = history.enqueue_rollout("q", resources_id="rs-0")
    history.set_pointer("prod", "rs-1")
    # The policy looked before the rollout was enqueued and the pointer moved:
    monkeypatch.setattr("lightning_queue.storage.retention.in_use", lambda store: {})
    monkeypatch.setattr(history.registry, "pointers", lambda: {"latest": "rs-7"})

    report = history.apply_retention(keep=5)

    assert report.deleted == ["rs-2"]
    assert report.skipped == {
        "rs-0": "in use since the policy looked: used by 1 queued/running rollouts",
        "rs-1": "in use since the policy looked: pointer prod",
    }
    assert history.get_rollout(queued.rollout_id).status == "queuing"  # never forced
    assert "rs-0" in stored(history) and "rs-1" in stored(history)


def test_keep_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="keep"):
        RetentionPolicy(keep=-1)


# --------------------------------------------------------------------------- pruning dangling index entries


def test_prune_removes_index_entries_of_expired_rollouts_only(
    fake_client: LightningClient, fake_redis: fakeredis.FakeRedis, make_rollouts: MakeRollouts
) -> None:
    store, k = fake_client.store, fake_client.keys
    live, dead = make_rollouts(2, mode="train", resources_id="rs-a")
    for r in (live, dead):
        run_to_running(store, r, worker="w1", resources_id="rs-b")
        store.finish_attempt(r.rollout_id, 1, "succeeded", "succeeded", result=RolloutResult(reward=1))
    expire(store, dead)
    indexes = [k.rollouts, k.rollouts_by_status("succeeded"), k.rollouts_by_mode("train"),
               k.rollouts_by_resources("rs-a"), k.rollouts_by_resources("rs-b"), k.rollouts_by_worker("w1"), k.rollouts_ended]
    # Keys that only look like ours are left alone.
    fake_redis.zadd(f"{k.rollouts}-other", {dead.rollout_id: 1})
    fake_redis.zadd(f"{k.prefix}x:rollouts", {dead.rollout_id: 1})

    assert store.prune_expired(dry_run=True) == len(indexes)
    assert all(fake_redis.zscore(key, dead.rollout_id) is not None for key in indexes)

    assert store.prune_expired() == len(indexes)
    for key in indexes:
        assert fake_redis.zscore(key, dead.rollout_id) is None
        assert fake_redis.zscore(key, live.rollout_id) is not None
    assert fake_redis.zscore(f"{k.rollouts}-other", dead.rollout_id) is not None
    assert fake_redis.zscore(f"{k.prefix}x:rollouts", dead.rollout_id) is not None
    assert store.prune_expired() == 0


def test_prune_reads_in_chunks_and_drops_emptied_indexes(
    fake_client: LightningClient, make_rollouts: MakeRollouts
) -> None:
    store, k = fake_client.store, fake_client.keys
    rollouts = make_rollouts(25, mode="test")
    for r in rollouts:
        store.terminate(r.rollout_id, "cancelled")
    for r in rollouts[::2]:
        expire(store, r)
    assert store.prune_expired(chunk=4) == 13 * 4  # main, status, mode and end-time indexes
    assert store.redis.zcard(k.rollouts_by_mode("test")) == 12
    for r in rollouts[1::2]:
        expire(store, r)
    report = fake_client.apply_retention()
    assert report.pruned == 12 * 4
    assert not store.redis.exists(k.rollouts, k.rollouts_by_mode("test"), k.rollouts_by_status("cancelled"),
                                  k.rollouts_ended)


# --------------------------------------------------------------------------- the scheduled task


def test_schedule_entry_exists_only_when_an_interval_is_set(prefix: str) -> None:
    scheduled = create_app(Settings(key_prefix=prefix, gc_interval_seconds=600))
    entry = scheduled.conf.beat_schedule[SCHEDULE_ENTRY]
    assert entry["task"] == TASK_NAME and entry["schedule"] == 600
    assert entry["options"]["expires"] == 600
    assert TASK_NAME in scheduled.tasks

    unscheduled = create_app(Settings(key_prefix=prefix))
    assert SCHEDULE_ENTRY not in unscheduled.conf.beat_schedule
    assert TASK_NAME in unscheduled.tasks  # still callable by hand


def test_task_applies_the_policy_with_gc_keep(fake_redis: fakeredis.FakeRedis, prefix: str) -> None:
    settings = Settings(key_prefix=prefix, gc_keep=2, gc_interval_seconds=60)
    app = create_app(settings)
    client = LightningClient(settings, redis_client=fake_redis)
    app._context = WorkerContext.create(settings, app, redis_client=fake_redis)  # what app.context builds, on fakeredis
    for i in range(5):
        client.add_resources(prompt(f"p{i}"), f"rs-{i}")

    result = app.tasks[TASK_NAME].apply().get()

    assert result["deleted"] == ["rs-0", "rs-1", "rs-2"] and result["keep"] == 2
    assert client.registry.list_ids() == ["rs-4", "rs-3"]
    assert app.tasks[TASK_NAME].apply(kwargs={"keep": 1, "dry_run": True}).get()["deleted"] == ["rs-3"]
