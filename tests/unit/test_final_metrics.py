"""The aggregates every final transition writes (``lua/_final_metrics.lua``, read by
:func:`lightning_queue.storage.metrics.read_final_metrics`), and the snapshot each rollout ran with on
its record (``Rollout.ran_resources_id``/``ran_resources_version``)."""

from __future__ import annotations

import itertools
import math

import fakeredis
import pytest

from lightning_queue import LightningClient, PromptTemplate, Rollout, Settings
from lightning_queue.core.metrics import DURATION_BUCKETS, OTHER, QUEUE_WAIT_BUCKETS, SeriesCaps
from lightning_queue.core.models import ErrorInfo, RolloutResult
from lightning_queue.experiments.manager import Experiment, Experiments, Variant
from lightning_queue.storage.metrics import read_final_metrics
from lightning_queue.storage.store import RolloutStore, StartWith

_clock = itertools.count(1_000_000)


def _run(store: RolloutStore, resources_id: str, version: int, *, reward: float | None = None,
         status: str = "succeeded", metadata: dict[str, str] | None = None, claim_starts: bool = False) -> Rollout:
    """One rollout through the store's own scripts: enqueue, claim, start with (resources_id, version), finish."""
    rollout = Rollout(input={}, enqueue_time=float(next(_clock)), metadata=metadata or {})
    store.create_rollouts([rollout])
    if claim_starts:
        mark = store.epoch.expected() or store.redis.get(store.keys.epoch).decode()
        claim = store.claim(rollout, "w@host", StartWith(None, None, resources_id, version, mark))
        assert claim.started
    else:
        claim = store.claim(rollout, "w@host")
        assert store.start_attempt(rollout.rollout_id, claim.sequence_id, resources_id, version)
    if status == "succeeded":
        store.finish_attempt(rollout.rollout_id, claim.sequence_id, "succeeded", "succeeded",
                             result=RolloutResult(reward=reward))
    else:
        store.finish_attempt(rollout.rollout_id, claim.sequence_id, "failed", "failed",
                             error=ErrorInfo(type="ToolError", message="broke"))
    return store.get_rollout(rollout.rollout_id)


def test_the_record_names_the_snapshot_an_unpinned_rollout_ran_with(fake_client: LightningClient) -> None:
    store = fake_client.store
    started = _run(store, "rs:with:colons", 3, reward=1.0)
    claimed = _run(store, "rs-b", 12, reward=0.5, claim_starts=True)
    assert started.resources_id is None  # it followed latest
    assert (started.ran_resources_id, started.ran_resources_version) == ("rs:with:colons", 3)
    assert (claimed.ran_resources_id, claimed.ran_resources_version) == ("rs-b", 12)
    # Batch reads carry it: no attempt read per rollout.
    batch = store.get_rollouts([started.rollout_id, claimed.rollout_id])
    assert [(r.ran_resources_id, r.ran_resources_version) for r in batch] == [("rs:with:colons", 3), ("rs-b", 12)]
    assert {r.ran_resources_id for r in store.query_rollouts(status="succeeded")} == {"rs:with:colons", "rs-b"}
    queued = Rollout(input={})
    store.create_rollouts([queued])
    assert store.get_rollout(queued.rollout_id).ran_resources_id is None


def test_totals_histograms_and_rewards_match_the_records(fake_client: LightningClient) -> None:
    store = fake_client.store
    done = [_run(store, "rs-a", 1, reward=r) for r in (0.2, 0.9, 0.4)]
    done += [_run(store, "rs-b", 2, status="failed"), _run(store, "rs-b", 2, reward=None)]
    cancelled = Rollout(input={})
    store.create_rollouts([cancelled])
    store.terminate(cancelled.rollout_id, "cancelled")

    m = read_final_metrics(store.redis, store.keys)
    assert m.totals.finished == {"succeeded": 4, "failed": 1, "cancelled": 1}
    durations = [r.end_time - r.start_time for r in done if r.start_time and r.end_time]
    assert m.totals.duration.count == len(durations) == 5  # the cancelled one never started
    assert m.totals.duration.sum == pytest.approx(sum(durations))
    for bound, count in m.totals.duration.cumulative():
        assert count == sum(d <= float(bound) for d in durations)
    waits = [r.start_time - r.enqueue_time for r in done if r.start_time]
    assert m.queue_wait.count == 5 and m.queue_wait.sum == pytest.approx(sum(waits))
    assert m.queue_wait.bounds == QUEUE_WAIT_BUCKETS and m.totals.duration.bounds == DURATION_BUCKETS

    a, b = m.snapshots[("rs-a", "1")], m.snapshots[("rs-b", "2")]
    assert a.finished == {"succeeded": 3}
    assert (a.reward_count, a.reward_sum, a.reward_min, a.reward_max) == (3, pytest.approx(1.5), 0.2, 0.9)
    assert b.finished == {"failed": 1, "succeeded": 1}
    assert (b.reward_count, b.reward_min) == (0, None)  # no reward reported, none averaged in
    assert m.variants == {} and m.folded == {}


def test_variants_are_aggregated_for_existing_experiments_only(fake_client: LightningClient) -> None:
    for rid in ("rs-a", "rs-b"):
        fake_client.add_resources({"p": PromptTemplate(template=rid)}, rid)
    Experiments(fake_client).create(Experiment(name="ab", variants=[Variant(name="control", resources_id="rs-a"),
                                                                     Variant(name="treatment", resources_id="rs-b")]))
    store = fake_client.store
    _run(store, "rs-a", 1, reward=0.5, metadata={"experiment": "ab", "variant": "control"})
    _run(store, "rs-b", 1, reward=0.75, metadata={"experiment": "ab", "variant": "treatment"})
    _run(store, "rs-b", 1, reward=0.25, metadata={"experiment": "ab", "variant": "treatment"})
    _run(store, "rs-b", 1, reward=9.0, metadata={"experiment": "gone", "variant": "x"})
    m = read_final_metrics(store.redis, store.keys)
    assert set(m.variants) == {("ab", "control"), ("ab", "treatment")}
    treatment = m.variants[("ab", "treatment")]
    assert (treatment.reward_count, treatment.reward_sum, treatment.reward_max) == (2, 1.0, 0.75)
    # The tally names the snapshot versions each variant ran (reports show them).
    tally = store.redis.hgetall(store.keys.experiment_tally("ab", "treatment"))
    assert tally[b"ran:1:rs-b"] == b"2"


def test_series_past_the_cap_fold_into_other_and_nothing_is_lost(fake_redis: fakeredis.FakeRedis,
                                                                  prefix: str) -> None:
    settings = Settings(redis_url="redis://fakeredis.invalid:1/0", key_prefix=prefix,
                        metrics_max_snapshot_versions=200)
    store = LightningClient(settings, redis_client=fake_redis).store
    for i in range(1000):
        _run(store, f"rs-{i:04d}", 1, reward=float(i))
    m = read_final_metrics(store.redis, store.keys)
    named = [key for key in m.snapshots if key != (OTHER, OTHER)]
    assert len(named) == 200
    assert set(named) == {(f"rs-{i:04d}", "1") for i in range(800, 1000)}  # the most recent ones
    assert m.folded == {"snapshot": 800}
    other = m.snapshots[(OTHER, OTHER)]
    assert other.finished == {"succeeded": 800}
    assert (other.reward_count, other.reward_sum) == (800, float(sum(range(800))))
    assert (other.reward_min, other.reward_max) == (0.0, 799.0)
    assert sum(s.duration.count for s in m.snapshots.values()) == m.totals.duration.count == 1000
    # Memory stays bounded too: the folded series' hashes are gone.
    assert len(list(fake_redis.scan_iter(store.keys.metrics_snapshot("*")))) == 201
    # And so does what a scrape exports: 200 versions plus "other".
    from lightning_queue.ops.monitoring import LightningCollector

    collector = LightningCollector(LightningClient(settings, redis_client=fake_redis))
    versions = {(s.labels["resources_id"], s.labels["version"]) for family in collector.collect()
                for s in family.samples if "version" in s.labels}
    assert len(versions) == 201 and (OTHER, OTHER) in versions


def test_a_series_folded_at_once_leaves_no_orphan(fake_client: LightningClient) -> None:
    store = RolloutStore(fake_client.redis, fake_client.keys, series_caps=SeriesCaps(snapshot_versions=1))
    _run(store, "rs-new", 1, reward=1.0)
    # A worker whose clock is behind: its rollout's end time is older than every series' last finish.
    store.redis.zadd(store.keys.metrics_snapshots, {"rs-new:1": math.inf})
    _run(store, "rs-late", 1, reward=2.0)
    m = read_final_metrics(store.redis, store.keys)
    assert set(m.snapshots) == {("rs-new", "1"), (OTHER, OTHER)}
    assert m.snapshots[(OTHER, OTHER)].reward_sum == 2.0
    assert not store.redis.exists(store.keys.metrics_snapshot("rs-late:1"))


def test_a_forced_snapshot_delete_counts_the_rollouts_it_fails(fake_client: LightningClient) -> None:
    fake_client.add_resources({"p": PromptTemplate(template="x")}, "rs-del")
    store = fake_client.store
    rollout = Rollout(input={}, resources_id="rs-del", resources_version=1, resolve="pinned")
    store.create_rollouts([rollout])
    claim = store.claim(rollout, "w@host")
    store.start_attempt(rollout.rollout_id, claim.sequence_id, "rs-del", 1)
    fake_client.registry.delete_resources("rs-del", force=True)
    m = read_final_metrics(store.redis, store.keys)
    assert m.totals.finished == {"failed": 1}
    assert m.snapshots[("rs-del", "1")].finished == {"failed": 1}
