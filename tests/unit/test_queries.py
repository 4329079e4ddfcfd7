"""Rollout queries (filters, order, cursor pages), the finished-rollouts cursor and bulk cancel, on fakeredis."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import fakeredis
import pytest

from lightning_queue import LightningClient, PromptTemplate, Rollout, RolloutConfig, RolloutResult
from lightning_queue.core.errors import ExperimentNotFoundError, InvalidCursorError, InvalidFilterError
from lightning_queue.core.models import ErrorInfo
from lightning_queue.core.queries import RolloutFilter
from lightning_queue.storage.store import RolloutStore

MakeRollouts = Callable[..., list[Rollout]]


def ids(rollouts: list[Rollout]) -> list[str]:
    return [r.rollout_id for r in rollouts]


def run(store: RolloutStore, rollout: Rollout | str, outcome: str = "succeeded", worker: str = "w1",
        resources_id: str = "rs-a") -> None:
    """A worker runs the rollout to ``outcome`` (succeeded, failed or requeuing)."""
    claim = store.claim(rollout, worker)
    assert claim.outcome == "claimed"
    rid = claim.rollout.rollout_id if claim.rollout else str(rollout)
    assert store.start_attempt(rid, claim.sequence_id, resources_id, 1)
    if outcome == "succeeded":
        store.finish_attempt(rid, claim.sequence_id, "succeeded", "succeeded", result=RolloutResult(reward=1.0))
    else:
        store.finish_attempt(rid, claim.sequence_id, "failed", outcome,  # type: ignore[arg-type]
                             error=ErrorInfo(type="ToolError", message="broke"))


def expire(store: RolloutStore, rollout: Rollout) -> None:
    """What Redis does when the TTL runs out: the record disappears."""
    store.redis.delete(store.keys.rollout(rollout.rollout_id))


def add_experiment(store: RolloutStore, name: str, variants: list[str]) -> None:
    """An experiment's spec as the experiment manager stores it (only the variant names matter here)."""
    store.redis.hset(store.keys.experiment(name), mapping={"spec": json.dumps({"variants": [
        {"name": v} for v in variants]}), "status": "running"})


def enqueue_under(store: RolloutStore, make_rollouts: MakeRollouts, name: str, variant: str, n: int,
                  **fields: Any) -> list[Rollout]:
    """Rollouts enqueued through an experiment: metadata naming it, and its variant index."""
    meta = {"experiment": name, "variant": variant, **fields.pop("metadata", {})}
    rollouts = make_rollouts(n, metadata=meta, **fields)
    store.redis.zadd(store.keys.experiment_rollouts(name, variant), {r.rollout_id: r.enqueue_time for r in rollouts})
    return rollouts


def all_pages(store: RolloutStore, wanted: RolloutFilter, limit: int, scan_budget: int = 2000,
              index_budget: int = 20_000) -> list[Rollout]:
    out: list[Rollout] = []
    cursor = None
    for _ in range(1000):
        page = store.query_page(wanted, cursor=cursor, limit=limit, scan_budget=scan_budget,
                                index_budget=index_budget)
        assert len(page.rollouts) <= limit
        out += page.rollouts
        if page.next_cursor is None:
            return out
        cursor = page.next_cursor
    raise AssertionError("the pages never ended")


# --------------------------------------------------------------------------- queries


def test_filters_by_metadata_keys_on_the_records(store: RolloutStore, make_rollouts: MakeRollouts) -> None:
    alice = make_rollouts(3, metadata={"user": "alice", "n": 1})
    bob = make_rollouts(2, metadata={"user": "bob", "n": 1})
    make_rollouts(2)
    assert ids(store.query_rollouts(metadata={"user": "alice"})) == ids(alice)[::-1]
    assert ids(store.query_rollouts(metadata={"user": "bob", "n": 1})) == ids(bob)[::-1]
    assert store.query_rollouts(metadata={"user": "bob", "n": 2}) == []
    assert store.query_rollouts(metadata={"missing": None}) == []  # a key must be there to equal None


def test_filters_by_experiment_and_variant_from_their_indexes(
    store: RolloutStore, make_rollouts: MakeRollouts
) -> None:
    add_experiment(store, "ab", ["control", "treatment"])
    control = enqueue_under(store, make_rollouts, "ab", "control", 2)
    treatment = enqueue_under(store, make_rollouts, "ab", "treatment", 3)
    make_rollouts(2)
    assert ids(store.query_rollouts(experiment="ab", variant="treatment")) == ids(treatment)[::-1]
    assert ids(store.query_rollouts(experiment="ab")) == ids(control + treatment)[::-1]
    assert ids(store.query_rollouts(experiment="ab", newest_first=False, limit=3)) == ids(control + treatment)[:3]
    with pytest.raises(ExperimentNotFoundError, match="nope"):
        store.query_rollouts(experiment="nope")
    with pytest.raises(ValueError, match="variant needs experiment"):
        store.query_rollouts(variant="treatment")


def test_time_ranges_and_both_orders(store: RolloutStore, make_rollouts: MakeRollouts) -> None:
    rollouts = make_rollouts(6)  # enqueue times 1_000_000 ... 1_000_005
    times = [r.enqueue_time for r in rollouts]
    assert ids(store.query_rollouts(enqueued_after=times[2], enqueued_before=times[5])) == ids(rollouts[2:5])[::-1]
    assert ids(store.query_rollouts(enqueued_after=times[2], newest_first=False, limit=2)) == ids(rollouts[2:4])
    # End time: finished in another order than enqueued; unfinished rollouts have none.
    order = [rollouts[4], rollouts[1], rollouts[3]]
    for r in order:
        run(store, r)
    ended = store.query_rollouts(order_by="end_time", newest_first=False)
    assert ids(ended) == ids(order)
    assert [r.end_time for r in ended] == sorted(r.end_time for r in ended if r.end_time)
    first_end = ended[0].end_time
    assert first_end is not None
    assert ids(store.query_rollouts(order_by="end_time", ended_after=ended[1].end_time)) == ids(order[1:])[::-1]
    # An end range with the enqueue order: finished ones only, newest enqueued first.
    assert ids(store.query_rollouts(ended_after=first_end)) == ids([rollouts[4], rollouts[3], rollouts[1]])
    assert ids(store.query_rollouts(ended_before=first_end)) == []


def test_queries_agree_with_a_brute_force_reading_page_by_page(
    store: RolloutStore, make_rollouts: MakeRollouts
) -> None:
    agree_with_brute_force(store, make_rollouts)


def agree_with_brute_force(store: RolloutStore, make_rollouts: MakeRollouts) -> None:
    """Random rollouts (statuses, modes, workers, experiment variants, metadata); every filter below,
    read page by page at several page sizes and budgets, gives what filtering every record in Python
    gives. (tests/integration/test_queries_live.py runs it on a real Redis.)"""
    rng = random.Random(7)
    add_experiment(store, "ab", ["a", "b"])
    every: list[Rollout] = []
    for i in range(90):
        mode = rng.choice(["train", "val"])
        meta = {"user": rng.choice(["u1", "u2", "u3"])}
        if rng.random() < 0.5:
            (r,) = enqueue_under(store, make_rollouts, "ab", rng.choice(["a", "b"]), 1, mode=mode, metadata=meta)
        else:
            (r,) = make_rollouts(1, mode=mode, metadata=meta)
        every.append(r)
        if i % 3 == 0:
            run(store, r, rng.choice(["succeeded", "failed"]), worker=rng.choice(["w1", "w2"]))
        elif i % 7 == 0:
            store.terminate(r.rollout_id, "cancelled")
    every = store.get_rollouts(ids(every))
    workers = {rid: w for w in ("w1", "w2")
               for rid in (m.decode() for m in store.redis.zrange(store.keys.rollouts_by_worker(w), 0, -1))}
    filters = [
        RolloutFilter(),
        RolloutFilter(status=("succeeded", "failed"), mode="val"),
        RolloutFilter(experiment="ab", metadata={"user": "u2"}),
        RolloutFilter(experiment="ab", variant="b", status="queuing", newest_first=False),
        RolloutFilter(worker_id="w2", order_by="end_time"),
        RolloutFilter(metadata={"user": "u1"}, enqueued_after=every[20].enqueue_time,
                      enqueued_before=every[70].enqueue_time, newest_first=False),
        RolloutFilter(order_by="end_time", newest_first=False, mode="train"),
        # Every group a union: intersected into a scratch key (the other plan).
        RolloutFilter(experiment="ab", status=("queuing", "failed"), newest_first=False),
        RolloutFilter(experiment="ab", status=("succeeded", "cancelled", "failed"), metadata={"user": "u3"}),
        RolloutFilter(status=("succeeded", "cancelled"), ended_after=every[0].enqueue_time),
    ]
    for wanted in filters:
        def expected_match(r: Rollout, wanted: RolloutFilter = wanted) -> bool:
            return wanted.matches(r) and (wanted.worker_id is None or workers.get(r.rollout_id) == wanted.worker_id)

        key = (lambda r: (r.end_time, r.rollout_id)) if wanted.order_by == "end_time" else \
            (lambda r: (r.enqueue_time, r.rollout_id))
        expected = sorted((r for r in every if expected_match(r)), key=key, reverse=wanted.newest_first)
        assert expected, wanted
        for limit, budget, index_budget in ((1, 2000, 20_000), (4, 2000, 20_000), (5, 7, 20_000), (5, 2000, 3),
                                            (100, 2000, 20_000)):
            assert ids(all_pages(store, wanted, limit, budget, index_budget)) == ids(expected), (wanted, limit, budget)
        assert ids(store.query_rollouts(wanted, offset=2, limit=3)) == ids(expected)[2:5]


def test_a_page_with_rare_matches_comes_back_short_with_a_cursor(
    store: RolloutStore, make_rollouts: MakeRollouts
) -> None:
    (needle,) = make_rollouts(1, metadata={"user": "needle"})
    make_rollouts(30)
    page = store.query_page(RolloutFilter(metadata={"user": "needle"}), limit=5, scan_budget=10)
    assert page.rollouts == [] and page.next_cursor is not None  # 10 records read, none matched
    rest = all_pages(store, RolloutFilter(metadata={"user": "needle"}), 5, scan_budget=10)
    assert ids(rest) == [needle.rollout_id]
    # The same with indexed filters: the walk in Redis stops after index_budget entries. Two large
    # indexes (cancelled, train) whose only common rollout is the oldest:
    for r in [needle, *make_rollouts(30, mode="val")]:
        store.terminate(r.rollout_id, "cancelled")
    make_rollouts(30, mode="train")
    cancelled = RolloutFilter(status="cancelled", mode="train")
    page = store.query_page(cancelled, limit=5, index_budget=10)
    assert page.rollouts == [] and page.next_cursor is not None
    assert ids(all_pages(store, cancelled, 5, index_budget=10)) == [needle.rollout_id]


def test_a_cursor_is_not_shifted_by_new_or_departed_rollouts(
    store: RolloutStore, make_rollouts: MakeRollouts
) -> None:
    # Ties: one batch with one enqueue time, paged one at a time while members leave the index.
    batch = [Rollout(input=i, enqueue_time=5.0, rollout_id=f"ro-{i:02d}", config=RolloutConfig()) for i in range(8)]
    store.create_rollouts(batch)
    queued = RolloutFilter(status="queuing")
    first = store.query_page(queued, limit=3)
    assert ids(first.rollouts) == ["ro-07", "ro-06", "ro-05"]  # ties: greater id first
    store.terminate("ro-05", "cancelled")  # the cursor's own entry leaves the queuing index
    store.terminate("ro-06", "cancelled")
    make_rollouts(2)  # newer ones arrive at the head
    second = store.query_page(queued, cursor=first.next_cursor, limit=3)
    assert ids(second.rollouts) == ["ro-04", "ro-03", "ro-02"]
    oldest = store.query_page(RolloutFilter(newest_first=False, status="queuing"), limit=2)
    assert ids(oldest.rollouts) == ["ro-00", "ro-01"]
    store.terminate("ro-01", "cancelled")
    after = store.query_page(RolloutFilter(newest_first=False, status="queuing"), cursor=oldest.next_cursor, limit=2)
    assert ids(after.rollouts) == ["ro-02", "ro-03"]


def test_expired_records_are_skipped_and_dropped_from_the_indexes(
    store: RolloutStore, make_rollouts: MakeRollouts
) -> None:
    rollouts = make_rollouts(5, metadata={"k": 1})
    for r in rollouts[1:3]:
        run(store, r)
        expire(store, r)
    assert ids(store.query_rollouts(metadata={"k": 1})) == ids([rollouts[4], rollouts[3], rollouts[0]])
    assert store.redis.zscore(store.keys.rollouts, rollouts[1].rollout_id) is None
    assert store.redis.zscore(store.keys.rollouts_ended, rollouts[1].rollout_id) is None


def test_bad_cursors_and_filters_are_refused(store: RolloutStore) -> None:
    with pytest.raises(InvalidCursorError):
        store.query_page(cursor="not-a-cursor")
    with pytest.raises(ValueError):
        RolloutFilter(status="done")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        RolloutFilter(enqueued_after=float("nan"))


# --------------------------------------------------------------------------- the finished-rollouts cursor


def test_every_final_transition_appends_once_in_order(
    fake_client: LightningClient, make_rollouts: MakeRollouts
) -> None:
    store = fake_client.store
    ok, failed, cancelled, retried, queued = make_rollouts(5)
    assert store.finished_rollouts().items == []
    assert store.finished_rollouts().cursor is None
    run(store, failed, "failed")
    store.terminate(cancelled.rollout_id, "cancelled")
    store.terminate(cancelled.rollout_id, "cancelled")  # already final: not again
    run(store, retried, "requeuing")  # not final: not in the stream
    run(store, ok)
    run(store, retried)
    page = store.finished_rollouts()
    assert [(i.rollout_id, i.status) for i in page.items] == [
        (failed.rollout_id, "failed"), (cancelled.rollout_id, "cancelled"), (ok.rollout_id, "succeeded"),
        (retried.rollout_id, "succeeded")]
    assert all(i.rollout is not None and i.rollout.status == i.status for i in page.items)
    assert page.cursor == page.items[-1].cursor
    # Resuming after any entry gives exactly the entries after it.
    for n, item in enumerate(page.items):
        assert store.finished_rollouts(item.cursor).items == page.items[n + 1:]
    two = store.finished_rollouts(limit=2)
    assert two.items == page.items[:2] and store.finished_rollouts(two.cursor, limit=2).items == page.items[2:]
    assert store.finished_rollouts(page.cursor).items == [] and store.finished_rollouts(page.cursor).cursor == \
        page.cursor
    # A forced snapshot delete fails the rollouts using it: they are appended too.
    fake_client.add_resources({"prompt": PromptTemplate(template="x {q}")}, "rs-x")
    (pinned,) = make_rollouts(1, resources_id="rs-x")
    fake_client.delete_resources("rs-x", force=True)
    assert [(i.rollout_id, i.status) for i in store.finished_rollouts(page.cursor).items] == [
        (pinned.rollout_id, "failed")]
    assert queued.rollout_id not in {i.rollout_id for i in store.finished_rollouts().items}


def test_the_cursor_filters_by_experiment_and_queue_and_reports_expired_records(
    store: RolloutStore, make_rollouts: MakeRollouts
) -> None:
    add_experiment(store, "ab", ["a", "b"])
    (in_a,) = enqueue_under(store, make_rollouts, "ab", "a", 1)
    (other_queue,) = make_rollouts(1, queue="q2")
    (gone,) = make_rollouts(1)
    for r in (in_a, other_queue, gone):
        store.terminate(r.rollout_id, "cancelled")
    expire(store, gone)
    page = store.finished_rollouts(filter=RolloutFilter(experiment="ab", variant="a"))
    assert [i.rollout_id for i in page.items] == [in_a.rollout_id]
    assert page.cursor == store.finished_rollouts().cursor  # past the entries left out, too
    assert [i.rollout_id for i in store.finished_rollouts(filter=RolloutFilter(queue="q2")).items] == [
        other_queue.rollout_id]
    everything = store.finished_rollouts().items
    assert everything[-1].rollout_id == gone.rollout_id and everything[-1].rollout is None
    with pytest.raises(InvalidFilterError, match="worker_id"):
        store.finished_rollouts(filter=RolloutFilter(worker_id="w1"))
    with pytest.raises(InvalidCursorError):
        store.finished_rollouts("yesterday")


def test_the_stream_is_trimmed_to_the_rollout_ttl(fake_redis: fakeredis.FakeRedis, fake_client: LightningClient,
                                                  make_rollouts: MakeRollouts) -> None:
    k = fake_client.keys
    for n in range(1, 151):  # entries from 1970: far older than any TTL
        fake_redis.xadd(k.finished, {"id": f"ro-old-{n}", "status": "succeeded"}, id=f"{n}-0")
    kept_forever = RolloutStore(fake_redis, k, rollout_ttl_seconds=None)
    (a, b) = make_rollouts(2)
    kept_forever.terminate(a.rollout_id, "cancelled")
    assert fake_redis.xlen(k.finished) == 151  # records kept forever: so is the stream
    RolloutStore(fake_redis, k, rollout_ttl_seconds=3600).terminate(b.rollout_id, "cancelled")
    # Approximate trimming drops whole stream nodes (100 entries on a real Redis): at least the first.
    assert fake_redis.xlen(k.finished) <= 52
    newest = [text for _, fields in fake_redis.xrange(k.finished) for text in [fields[b"id"].decode()]][-2:]
    assert newest == [a.rollout_id, b.rollout_id]
    # A saved cursor older than what is kept resumes at the oldest entry kept.
    assert fake_client.store.finished_rollouts("1-0", limit=1000).items[-1].rollout_id == b.rollout_id


def test_the_iterator_ends_after_idle_seconds(fake_client: LightningClient, make_rollouts: MakeRollouts) -> None:
    store = fake_client.store
    rollouts = make_rollouts(3)
    for r in rollouts:
        store.terminate(r.rollout_id, "cancelled")
    seen = list(fake_client.iter_finished_rollouts(idle_seconds=0.05, batch=2))
    assert [i.rollout_id for i in seen] == ids(rollouts)
    assert list(fake_client.iter_finished_rollouts(seen[0].cursor, idle_seconds=0.05)) == seen[1:]


# --------------------------------------------------------------------------- bulk cancel


@pytest.fixture
def with_celery(fake_client: LightningClient) -> tuple[LightningClient, list[list[str]]]:
    revoked: list[list[str]] = []
    celery = SimpleNamespace(control=SimpleNamespace(revoke=lambda task_id, **_: revoked.append(list(task_id))))
    client = LightningClient(fake_client.settings, redis_client=fake_client.redis, celery=celery)  # type: ignore[arg-type]
    return client, revoked


def test_bulk_cancel_is_a_dry_run_first(
    with_celery: tuple[LightningClient, list[list[str]]], make_rollouts: MakeRollouts
) -> None:
    client, revoked = with_celery
    store = client.store
    old = make_rollouts(3, metadata={"team": "x"})
    running = old[0]
    store.claim(running, "w1")
    done = make_rollouts(1, metadata={"team": "x"})[0]
    run(store, done)
    make_rollouts(2, metadata={"team": "y"})
    wanted = RolloutFilter(metadata={"team": "x"})
    before = {r.rollout_id: r.status for r in store.query_rollouts(limit=1000)}

    report = client.cancel_rollouts(wanted)
    assert report.dry_run and report.matched == ids(old)[::-1] and report.cancelled == []
    assert {r.rollout_id: r.status for r in store.query_rollouts(limit=1000)} == before and revoked == []

    report = client.cancel_rollouts(wanted, dry_run=False, batch=2)
    assert report.cancelled == ids(old)[::-1] and report.already_finished == report.not_found == []
    assert {store.get_rollout(r.rollout_id).status for r in old} == {"cancelled"}
    assert store.get_rollout(done.rollout_id).status == "succeeded"
    assert revoked == [ids(old)[::-1][:2], ids(old)[::-1][2:]]  # one broadcast per batch
    assert client.cancel_rollouts(wanted, dry_run=False).matched == []


def test_bulk_cancel_counts_what_finished_or_vanished_meanwhile(
    store: RolloutStore, make_rollouts: MakeRollouts
) -> None:
    queued, finished, gone = make_rollouts(3)
    run(store, finished)
    expire(store, gone)
    assert store.cancel_batch([queued.rollout_id, finished.rollout_id, gone.rollout_id]) == [
        ("queuing", "cancelled"), ("succeeded", "succeeded"), (None, "missing")]


def test_bulk_cancel_refuses_final_statuses(fake_client: LightningClient) -> None:
    with pytest.raises(InvalidFilterError, match="nothing to cancel"):
        fake_client.cancel_rollouts(RolloutFilter(status=("succeeded", "failed")))


def test_bulk_cancel_restricts_to_unfinished_statuses(fake_client: LightningClient,
                                                      make_rollouts: MakeRollouts) -> None:
    store = fake_client.store
    a, b = make_rollouts(2)
    run(store, a)
    report = fake_client.cancel_rollouts(RolloutFilter(status=("succeeded", "queuing")))
    assert report.matched == [b.rollout_id]



def test_every_script_that_ends_a_rollout_appends_it_to_the_stream() -> None:
    from importlib import resources

    lua = resources.files("lightning_queue.storage").joinpath("lua")
    ending = {p.name for p in lua.iterdir() if p.name.endswith(".lua") and "tally_experiment(" in p.read_text()
              and not p.name.startswith("_")}
    assert ending == {"finish_attempt.lua", "terminate_rollout.lua", "delete_snapshot.lua"}
    for name in ending:
        assert lua.joinpath(name).read_text().count("record_finished(") == 1, name
