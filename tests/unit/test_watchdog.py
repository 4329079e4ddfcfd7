"""Heartbeats, the unresponsive-attempt sweep, worker health and connection budgets, on fakeredis."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

import pytest

from lightning_queue import LightningClient, Rollout, RolloutConfig, RolloutResult, Settings
from lightning_queue.app import create_app
from lightning_queue.core.errors import ConnectionBudgetError
from lightning_queue.storage.liveness import HealthRecorder, judge
from lightning_queue.storage.store import RolloutStore
from lightning_queue.worker.app import apply_connection_budget
from lightning_queue.worker.heartbeat import Heartbeat
from lightning_queue.worker.recovery import sweep_unresponsive
from tests.unit.test_runner import FakeTask, recording_agent
from tests.unit.test_store import run_to_running

MakeRollouts = Callable[..., list[Rollout]]


def deadline(store: RolloutStore, rollout_id: str) -> float | None:
    return store.redis.zscore(store.keys.heartbeats, rollout_id)


# --------------------------------------------------------------------------- heartbeats in the store


def test_claim_writes_the_first_heartbeat_and_finish_clears_it(store: RolloutStore, make_rollouts: MakeRollouts) -> None:
    rollout, = make_rollouts(1)
    before = time.time()
    seq = run_to_running(store, rollout)
    assert before + store.heartbeat_timeout <= deadline(store, rollout.rollout_id) <= time.time() + store.heartbeat_timeout
    store.finish_attempt(rollout.rollout_id, seq, "succeeded", "succeeded")
    assert deadline(store, rollout.rollout_id) is None


def test_heartbeat_moves_the_deadline_only_for_the_open_attempt(
    store: RolloutStore, make_rollouts: MakeRollouts
) -> None:
    rollout, = make_rollouts(1, config=RolloutConfig(max_attempts=2))
    rid = rollout.rollout_id
    seq = run_to_running(store, rollout)
    store.redis.zadd(store.keys.heartbeats, {rid: 5.0})
    assert store.heartbeat(rid, seq)
    assert deadline(store, rid) > time.time()
    assert not store.heartbeat(rid, seq + 1)  # not the open attempt
    store.finish_attempt(rid, seq, "failed", "requeuing")
    assert not store.heartbeat(rid, seq)  # closed: nothing to keep alive, the index is left alone
    assert deadline(store, rid) is None


def test_terminate_clears_the_heartbeat(store: RolloutStore, make_rollouts: MakeRollouts) -> None:
    rollout, = make_rollouts(1)
    run_to_running(store, rollout)
    store.terminate(rollout.rollout_id, "cancelled")
    assert deadline(store, rollout.rollout_id) is None


def test_duplicate_delivery_while_the_attempt_beats_is_refused_without_writing(
    store: RolloutStore, make_rollouts: MakeRollouts
) -> None:
    rollout, = make_rollouts(1, config=RolloutConfig(max_attempts=3))
    rid = rollout.rollout_id
    run_to_running(store, rollout, "w1")
    claim = store.claim(rollout, "w2")  # the broker redelivered while w1 still runs it
    assert (claim.outcome, claim.sequence_id) == ("duplicate", 1)
    [attempt] = store.get_attempts(rid)
    assert (attempt.status, attempt.worker_id) == ("running", "w1")
    assert store.get_rollout(rid).attempt_count == 1
    assert store.finish_attempt(rid, 1, "succeeded", "succeeded", result=RolloutResult(reward=1)) == "succeeded"


def test_release_lost_lets_the_redelivery_claim_at_once(store: RolloutStore, make_rollouts: MakeRollouts) -> None:
    rollout, = make_rollouts(1, config=RolloutConfig(max_attempts=2))
    rid = rollout.rollout_id
    run_to_running(store, rollout, "w1")
    assert not store.release_lost(rid, "w2")  # not w2's attempt
    assert store.claim(rollout, "w2").outcome == "duplicate"
    assert store.release_lost(rid, "w1")
    claim = store.claim(rollout, "w2")
    assert (claim.outcome, claim.sequence_id) == ("claimed", 2)
    assert [a.status for a in store.get_attempts(rid)] == ["worker_lost", "preparing"]


# --------------------------------------------------------------------------- the sweep


def test_sweep_requeues_an_expired_attempt_and_refuses_its_late_result(
    store: RolloutStore, make_rollouts: MakeRollouts, status_index_members: Callable[[str], list[str]]
) -> None:
    rollout, fresh = make_rollouts(2, config=RolloutConfig(max_attempts=2))
    rid = rollout.rollout_id
    run_to_running(store, rollout)
    run_to_running(store, fresh)
    store.redis.zadd(store.keys.heartbeats, {rid: time.time() - 1})

    assert store.close_unresponsive() == [(rid, "requeuing", 1)]
    assert store.close_unresponsive() == []  # taken once
    [attempt] = store.get_attempts(rid)
    assert attempt.status == "unresponsive" and attempt.error.type == "UnresponsiveAttemptError"
    assert status_index_members(rid) == ["requeuing"]
    assert store.get_rollout(fresh.rollout_id).status == "running"  # its heartbeat is fresh
    # The hung process wakes up and reports: refused, nothing written.
    assert store.finish_attempt(rid, 1, "succeeded", "succeeded", result=RolloutResult(reward=1)) == "stale"
    assert store.get_attempts(rid)[0].status == "unresponsive"
    assert not store.heartbeat(rid, 1)
    # The republished message claims the next attempt.
    assert store.claim(rollout, "w2").sequence_id == 2


@pytest.mark.parametrize(
    "config",
    [RolloutConfig(max_attempts=1), RolloutConfig(max_attempts=3, retry_condition=["failed", "worker_lost"])],
    ids=["no-attempt-left", "unresponsive-not-retried"],
)
def test_sweep_fails_the_rollout_and_it_never_flips_to_succeeded(
    store: RolloutStore, make_rollouts: MakeRollouts, config: RolloutConfig
) -> None:
    rollout, = make_rollouts(1, config=config)
    rid = rollout.rollout_id
    run_to_running(store, rollout)
    store.redis.zadd(store.keys.heartbeats, {rid: 0})

    assert store.close_unresponsive() == [(rid, "failed", 1)]
    failed = store.get_rollout(rid)
    assert failed.status == "failed" and failed.error.type == "UnresponsiveAttemptError"
    assert failed.end_time is not None
    assert store.redis.ttl(store.keys.rollout(rid)) > 0  # expires like any finished rollout
    assert store.finish_attempt(rid, 1, "succeeded", "succeeded", result=RolloutResult(reward=1)) == "stale"
    after = store.get_rollout(rid)
    assert (after.status, after.result) == ("failed", None)


def test_sweep_reads_only_the_expired_head(store: RolloutStore, make_rollouts: MakeRollouts) -> None:
    rollouts = make_rollouts(5, config=RolloutConfig(max_attempts=2))
    for r in rollouts:
        run_to_running(store, r)
    now = time.time()
    store.redis.zadd(store.keys.heartbeats, {r.rollout_id: now - 10 + i for i, r in enumerate(rollouts[:3])})
    moved = store.close_unresponsive(limit=2)
    assert [m[0] for m in moved] == [r.rollout_id for r in rollouts[:2]]
    assert [m[0] for m in store.close_unresponsive(limit=2)] == [rollouts[2].rollout_id]
    assert store.close_unresponsive() == []


def test_concurrent_sweeps_take_each_expired_attempt_once(store: RolloutStore, make_rollouts: MakeRollouts) -> None:
    rollouts = make_rollouts(30, config=RolloutConfig(max_attempts=2))
    for r in rollouts:
        run_to_running(store, r)
    store.redis.zadd(store.keys.heartbeats, {r.rollout_id: 0 for r in rollouts})
    results: list[list[tuple[str, str, int]]] = []
    threads = [threading.Thread(target=lambda: results.append(store.close_unresponsive(limit=7))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    taken = [m[0] for batch in results for m in batch]
    assert sorted(taken) == sorted(r.rollout_id for r in rollouts)


def test_sweep_republishes_requeued_rollouts_with_their_backoff(
    fake_client: LightningClient, make_rollouts: MakeRollouts, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = fake_client.store
    retried, final = make_rollouts(1, config=RolloutConfig(max_attempts=3, retry_backoff_seconds=4))[0], \
        make_rollouts(1)[0]
    for r in (retried, final):
        run_to_running(store, r)
        store.redis.zadd(store.keys.heartbeats, {r.rollout_id: 0})
    task = FakeTask(fake_client, recording_agent()[0])

    moved = sweep_unresponsive(task.ctx)

    assert sorted(moved) == sorted([(retried.rollout_id, "requeuing", 1), (final.rollout_id, "failed", 1)])
    assert task.retries == [{"countdown": pytest.approx(4.0, abs=0.01)}]


def test_a_sweep_that_died_after_leasing_leaves_its_entries_due_again(
    store: RolloutStore, make_rollouts: MakeRollouts
) -> None:
    rollout, = make_rollouts(1, config=RolloutConfig(max_attempts=2))
    rid = rollout.rollout_id
    run_to_running(store, rollout)
    store.redis.zadd(store.keys.heartbeats, {rid: 0})
    now = time.time()
    store._lease(keys=[store.keys.heartbeats, store.keys.watchdog],
                 args=[repr(now), 10, repr(now + 5), store.keys.rollout_prefix, "15", "30"])
    assert store.close_unresponsive(now=now + 1) == []  # leased by the sweep that died
    assert store.get_rollout(rid).status == "running"
    assert store.close_unresponsive(now=now + 6) == [(rid, "requeuing", 1)]  # the lease ended


def test_an_attempt_that_beats_after_the_lease_is_left_alone(store: RolloutStore, make_rollouts: MakeRollouts) -> None:
    rollout, = make_rollouts(1, config=RolloutConfig(max_attempts=2))
    rid = rollout.rollout_id
    seq = run_to_running(store, rollout)
    store.redis.zadd(store.keys.heartbeats, {rid: 0})
    lease = store._lease
    def lease_then_beat(**kwargs: object) -> object:
        taken = lease(**kwargs)
        assert store.heartbeat(rid, seq)  # the "hung" process was only slow
        return taken
    store._lease = lease_then_beat  # type: ignore[method-assign]
    assert store.close_unresponsive() == []
    assert store.get_rollout(rid).status == "running"


# --------------------------------------------------------------------------- the heartbeat thread


def test_heartbeat_thread_beats_while_the_attempt_runs(store: RolloutStore, make_rollouts: MakeRollouts) -> None:
    rollout, = make_rollouts(1)
    rid = rollout.rollout_id
    seq = run_to_running(store, rollout)
    store.redis.zadd(store.keys.heartbeats, {rid: 1.0})
    beat = Heartbeat(store, interval=0.05)
    with beat.attempt(rid, seq):
        limit = time.monotonic() + 30
        while deadline(store, rid) == 1.0:
            assert time.monotonic() < limit, "no heartbeat was sent"
            time.sleep(0.01)
    assert deadline(store, rid) > time.time()
    # After the block the thread has no attempt to beat for (it stays, for the next rollout).
    assert beat.open_attempts() == [] and beat._thread is not None and beat._thread.is_alive()


def test_every_attempt_open_in_one_process_is_kept_alive(store: RolloutStore, make_rollouts: MakeRollouts) -> None:
    # Thread and gevent pools run many attempts in one process: each needs its own beats.
    rollouts = make_rollouts(3)
    seqs = {r.rollout_id: run_to_running(store, r) for r in rollouts}
    store.redis.zadd(store.keys.heartbeats, {rid: 1.0 for rid in seqs})
    beat = Heartbeat(store, interval=0.05)
    with contextlib.ExitStack() as stack:
        for rid, seq in seqs.items():
            stack.enter_context(beat.attempt(rid, seq))
        assert sorted(beat.open_attempts()) == sorted(seqs.items())
        limit = time.monotonic() + 30
        while any(deadline(store, rid) == 1.0 for rid in seqs):
            assert time.monotonic() < limit, "an open attempt got no heartbeat"
            time.sleep(0.01)
    assert all(deadline(store, rid) > time.time() for rid in seqs)
    assert beat.open_attempts() == []


def test_a_short_attempt_sends_no_heartbeat(store: RolloutStore, make_rollouts: MakeRollouts,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    rollout, = make_rollouts(1)
    seq = run_to_running(store, rollout)
    calls: list[tuple[str, int]] = []
    monkeypatch.setattr(store, "heartbeat", lambda rid, s: calls.append((rid, s)) or True)
    beat = Heartbeat(store, interval=60.0)
    with beat.attempt(rollout.rollout_id, seq):
        pass
    assert calls == []


# --------------------------------------------------------------------------- worker health


def record(**fields: object) -> dict:
    base = {"hostname": "w1@h", "pid": 1, "concurrency": 2, "active": 0, "queues": ["q"], "consuming": ["q"],
            "queued": {"q": 3}, "last_received": None, "backlog_since": None, "updated": 1000.0}
    return {**base, **fields}


@pytest.mark.parametrize(
    "fields, stalled",
    [
        ({"backlog_since": 900.0}, True),  # waited 100 s, free slots, never received
        ({"backlog_since": 990.0}, False),  # waited only 10 s
        ({"backlog_since": 900.0, "last_received": 995.0}, False),  # received recently
        ({"backlog_since": 900.0, "active": 2}, False),  # busy: no free slot
        ({"backlog_since": None, "queued": {"q": 0}}, False),  # nothing waiting
        ({"backlog_since": 900.0, "last_received": 800.0, "consuming": []}, True),
    ],
)
def test_judge_stalled_by_consumption(fields: dict, stalled: bool) -> None:
    health = judge(record(**fields), threshold=60, now=1000.0)
    assert health.stalled is stalled
    assert (health.reason is not None) is stalled


def test_judge_names_the_queue_it_no_longer_consumes() -> None:
    health = judge(record(backlog_since=900.0, consuming=[]), threshold=60, now=1000.0)
    assert "no longer consumes q" in health.reason


def test_recorder_tracks_the_backlog_and_client_reports_it(fake_client: LightningClient) -> None:
    recorder = HealthRecorder(fake_client.redis, fake_client.keys, "w1@h", ttl=30)
    queue_key = f"{fake_client.keys.celery_prefix}q"
    first = recorder.report(["q"], ["q"], active=0, concurrency=1)
    assert first["backlog_since"] is None and first["queued"] == {"q": 0}
    fake_client.redis.lpush(queue_key, "message")
    second = recorder.report(["q"], ["q"], active=0, concurrency=1)
    assert second["backlog_since"] is not None
    assert recorder.report(["q"], ["q"], 0, 1)["backlog_since"] == second["backlog_since"]  # still waiting
    recorder.received()
    assert recorder.report(["q"], ["q"], 1, 1)["backlog_since"] != second["backlog_since"]
    assert fake_client.redis.ttl(fake_client.keys.worker_health("w1@h")) > 0

    [health] = fake_client.worker_health(stall_threshold_seconds=0)
    assert (health.hostname, health.active, health.concurrency) == ("w1@h", 1, 1)
    assert not health.stalled  # busy
    fake_client.redis.delete(queue_key)
    recorder.report(["q"], ["q"], 0, 1)
    assert fake_client.worker_health(stall_threshold_seconds=0)[0].backlog_since is None


# --------------------------------------------------------------------------- settings consistency


def test_worker_warns_when_its_time_limits_outlast_the_visibility_timeout() -> None:
    from lightning_queue import Settings
    from lightning_queue.broker.app import celery_config
    from lightning_queue.worker.app import check_visibility_timeout

    ok = Settings(visibility_timeout=600, default_timeout_seconds=300, heartbeat_interval=10)
    assert check_visibility_timeout(ok) is None
    assert celery_config(ok)["broker_transport_options"]["visibility_timeout"] == 600
    too_long = ok.model_copy(update={"default_timeout_seconds": 595})  # + 10 s grace > 600
    assert "LQ_VISIBILITY_TIMEOUT" in check_visibility_timeout(too_long)
    slow_beats = ok.model_copy(update={"heartbeat_timeout": 600})
    assert "heartbeat timeout" in check_visibility_timeout(slow_beats)
    assert Settings(heartbeat_interval=4).heartbeat_deadline == 12
    assert Settings(heartbeat_interval=4).sweep_interval == 4


# --------------------------------------------------------------------------- outages


def redis_clock(store: RolloutStore) -> float:
    seconds, micros = store.redis.time()
    return seconds + micros / 1e6


def test_after_a_pause_of_the_sweeps_nothing_is_declared_dead_for_one_heartbeat_timeout(
    store: RolloutStore, make_rollouts: MakeRollouts
) -> None:
    rollout, = make_rollouts(1, config=RolloutConfig(max_attempts=2))
    rid = rollout.rollout_id
    run_to_running(store, rollout, "w1")
    store.redis.zadd(store.keys.heartbeats, {rid: 0})  # its deadline passed while Redis was away
    # The fleet's last sweep was 60 s ago (Redis's clock): nobody could reach Redis meanwhile.
    store.redis.hset(store.keys.watchdog, "last", repr(redis_clock(store) - 60))
    assert store.close_unresponsive(outage_seconds=10) == []
    hold = float(store.redis.hget(store.keys.watchdog, "hold"))
    assert hold - redis_clock(store) == pytest.approx(store.heartbeat_timeout, abs=5)
    assert store.close_unresponsive(outage_seconds=10) == []  # the next sweeps hold too
    # A redelivery meanwhile does not close it as lost either: it is dropped.
    claim = store.claim(rollout, "w2")
    assert (claim.outcome, claim.sequence_id) == ("held", 1)
    assert [a.status for a in store.get_attempts(rid)] == ["running"]
    # Its worker beats again during the hold: it is left alone for good.
    assert store.heartbeat(rid, 1)
    store.redis.hset(store.keys.watchdog, "hold", repr(redis_clock(store) - 1))  # the hold is over
    assert store.close_unresponsive(outage_seconds=10) == []
    # A worker that stayed silent through the hold is declared unresponsive once it ends.
    store.redis.zadd(store.keys.heartbeats, {rid: 0})
    assert store.close_unresponsive(outage_seconds=10) == [(rid, "requeuing", 1)]


def test_a_redelivery_right_after_an_outage_is_held_before_any_sweep_noticed_it(
    store: RolloutStore, make_rollouts: MakeRollouts
) -> None:
    rollout, = make_rollouts(1, config=RolloutConfig(max_attempts=2))
    run_to_running(store, rollout, "w1")
    store.redis.zadd(store.keys.heartbeats, {rollout.rollout_id: 0})
    store.redis.hset(store.keys.watchdog, "last", repr(redis_clock(store) - 60))  # no sweep since the outage
    assert store.claim(rollout, "w2").outcome == "held"
    store.redis.hset(store.keys.watchdog, "last", repr(redis_clock(store)))  # sweeps run again, no hold
    claim = store.claim(rollout, "w2")
    assert (claim.outcome, claim.sequence_id) == ("claimed", 2)
    assert [a.status for a in store.get_attempts(rollout.rollout_id)] == ["worker_lost", "preparing"]


def test_an_attempt_whose_process_died_is_claimed_at_once_even_during_a_hold(
    store: RolloutStore, make_rollouts: MakeRollouts
) -> None:
    # Its worker saw the pool process die and dropped its heartbeat: nothing would ever sweep it,
    # so the redelivery must not be held back.
    rollout, = make_rollouts(1, config=RolloutConfig(max_attempts=2))
    run_to_running(store, rollout, "w1")
    store.redis.hset(store.keys.watchdog, "hold", repr(redis_clock(store) + 60))
    assert store.release_lost(rollout.rollout_id, "w1")
    claim = store.claim(rollout, "w1")
    assert (claim.outcome, claim.sequence_id) == ("claimed", 2)
    assert [a.status for a in store.get_attempts(rollout.rollout_id)] == ["worker_lost", "preparing"]


def test_a_fresh_registry_or_sweeps_at_their_own_rhythm_hold_nothing(
    store: RolloutStore, make_rollouts: MakeRollouts
) -> None:
    rollout, = make_rollouts(1, config=RolloutConfig(max_attempts=2))
    run_to_running(store, rollout)
    store.redis.zadd(store.keys.heartbeats, {rollout.rollout_id: 0})
    assert store.redis.hget(store.keys.watchdog, "last") is None  # no sweep yet: nothing to compare with
    store.redis.hset(store.keys.watchdog, "last", repr(redis_clock(store) - 5))
    assert store.close_unresponsive(outage_seconds=10) == [(rollout.rollout_id, "requeuing", 1)]


def test_the_main_process_beats_only_for_its_own_pool_processes_open_attempts(
    store: RolloutStore, make_rollouts: MakeRollouts
) -> None:
    mine, theirs, done = make_rollouts(3)
    for rollout, worker in ((mine, "w1"), (theirs, "w2"), (done, "w1")):
        run_to_running(store, rollout, worker)
        store.redis.zadd(store.keys.heartbeats, {rollout.rollout_id: 5.0})
    store.finish_attempt(done.rollout_id, 1, "succeeded", "succeeded")
    assert store.heartbeat_for_workers([mine.rollout_id, theirs.rollout_id, done.rollout_id], "w1") == [
        True, False, False]
    assert deadline(store, mine.rollout_id) > time.time() and deadline(store, theirs.rollout_id) == 5.0
    assert deadline(store, done.rollout_id) is None


def test_beats_for_the_pool_skip_stopped_and_vanished_processes(store: RolloutStore, make_rollouts: MakeRollouts) -> None:
    import os
    import signal
    import subprocess

    from lightning_queue.worker.heartbeat import beat_for_pool, process_runs

    running, stopped, gone = make_rollouts(3)
    for rollout in (running, stopped, gone):
        run_to_running(store, rollout, "w1")
        store.redis.zadd(store.keys.heartbeats, {rollout.rollout_id: 5.0})
    alive = subprocess.Popen(["sleep", "60"])
    frozen = subprocess.Popen(["sleep", "60"])
    os.kill(frozen.pid, signal.SIGSTOP)
    finished = subprocess.Popen(["true"])
    finished.wait()
    try:
        assert process_runs(alive.pid) and not process_runs(finished.pid)
        deadline_ = time.monotonic() + 5
        while process_runs(frozen.pid):  # SIGSTOP takes effect asynchronously
            assert time.monotonic() < deadline_
            time.sleep(0.01)
        sent = beat_for_pool(store, "w1", [(running.rollout_id, alive.pid), (stopped.rollout_id, frozen.pid),
                                           (gone.rollout_id, finished.pid), ("not-accepted-yet", None),
                                           ("own", os.getpid())])
        assert sent == 1
        assert deadline(store, running.rollout_id) > time.time()
        assert deadline(store, stopped.rollout_id) == deadline(store, gone.rollout_id) == 5.0
    finally:
        for process in (alive, frozen):
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


# --------------------------------------------------------------------------- broker connection budget


@pytest.mark.parametrize("pool", ["celery.concurrency.gevent", "celery.concurrency.eventlet", "celery.concurrency.thread"])
def test_in_process_pools_get_a_connection_each_and_some(pool: str) -> None:
    app = create_app(Settings())
    assert apply_connection_budget(app, app.settings, pool, 200) == 210
    assert app.conf.broker_transport_options["max_connections"] == 210 and app.conf.broker_pool_limit == 210
    assert app.redis_connections == 210
    assert app.context.redis.connection_pool.max_connections == 210  # this process's own Redis client


def test_prefork_and_solo_keep_kombus_defaults() -> None:
    for pool in ("celery.concurrency.prefork", "celery.concurrency.solo"):
        app = create_app(Settings())
        assert apply_connection_budget(app, app.settings, pool, 64) is None
        assert "max_connections" not in app.conf.broker_transport_options and app.redis_connections is None


def test_a_budget_set_too_low_stops_the_worker_with_a_clear_error() -> None:
    settings = Settings(celery={"broker_transport_options": {"max_connections": 20}})
    app = create_app(settings)
    with pytest.raises(ConnectionBudgetError, match="max_connections is 20, but a gevent pool of 200 needs at least 210"):
        apply_connection_budget(app, settings, "celery.concurrency.gevent", 200)
    enough = Settings(celery={"broker_pool_limit": 500})
    app = create_app(enough)
    assert apply_connection_budget(app, enough, "celery.concurrency.gevent", 200) == 210
    assert app.conf.broker_pool_limit == 500  # the user's own, larger, limit is kept
