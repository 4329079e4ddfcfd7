"""The Prometheus collector and the overview it reads, on fakeredis: values, labels, cost."""

from __future__ import annotations

import json
import time

import fakeredis
import pytest
from kombu.transport import redis as kombu_redis
from prometheus_client import generate_latest

from lightning_queue import (
    LightningClient,
    PromptTemplate,
    Rollout,
    RolloutConfig,
    RolloutResult,
    Settings,
)
from lightning_queue.core.errors import redacted_url
from lightning_queue.core.keys import (
    CELERY_PRIORITY_SEP,
    CELERY_PRIORITY_STEPS,
    ROLLOUT_STATUSES,
    Keys,
)
from lightning_queue.ops.monitoring import (
    LightningCollector,
    exporter_registry,
    read_overview,
)


def _stats(hits: int, misses: int, loads: int, load_seconds: float, entries: int = 2) -> str:
    return json.dumps({"hits": hits, "misses": misses, "hit_ratio": hits / max(1, hits + misses),
                       "entries": entries, "bytes": 1000 * entries, "load_count": loads,
                       "load_seconds_total": load_seconds, "mean_load_ms": 1000 * load_seconds / max(1, loads),
                       "evictions": 0, "time": time.time()})


@pytest.fixture
def populated(fake_client: LightningClient) -> LightningClient:
    """rs-a (prod) and rs-b (latest); rollouts: 3 queuing on rs-a, 2 running on rs-b, 1 succeeded
    unpinned; 3 messages in the default queue (one at priority 6), 2 unacked; two worker processes."""
    c = fake_client
    c.add_resources({"prompt": PromptTemplate(template="a {x}")}, "rs-a")
    c.add_resources({"prompt": PromptTemplate(template="b {x}")}, "rs-b")
    c.set_pointer("prod", "rs-a")
    rows = ([Rollout(input=i, resources_id="rs-a", config=RolloutConfig()) for i in range(3)]
            + [Rollout(input=i, resources_id="rs-b", status="running", config=RolloutConfig()) for i in range(2)]
            + [Rollout(input=9, status="succeeded", config=RolloutConfig())])
    c.store.create_rollouts(rows)
    k = c.keys
    c.redis.lpush(k.celery_queue(c.settings.queue), "m1", "m2")
    c.redis.lpush(k.celery_queue(c.settings.queue, 6), "m3")
    c.redis.hset(k.celery_unacked, mapping={"tag1": "x", "tag2": "y"})
    c.redis.set(k.cache_stats("w1@h:11"), _stats(hits=30, misses=10, loads=10, load_seconds=0.5))
    c.redis.set(k.cache_stats("w2@h:12"), _stats(hits=10, misses=10, loads=10, load_seconds=0.1))
    return c


def _value(registry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_collector_reports_the_queue_state_with_labels(populated: LightningClient) -> None:
    registry = exporter_registry(LightningCollector(populated))
    p, q = populated.keys.prefix, populated.settings.queue

    assert _value(registry, "lq_up", prefix=p) == 1
    expected = {"queuing": 3, "running": 2, "succeeded": 1}
    for status in ROLLOUT_STATUSES:
        assert _value(registry, "lq_rollouts", prefix=p, status=status) == expected.get(status, 0)
    assert _value(registry, "lq_rollouts_by_resources", prefix=p, resources_id="rs-a") == 3
    assert _value(registry, "lq_rollouts_by_resources", prefix=p, resources_id="rs-b") == 2
    assert _value(registry, "lq_pointer", prefix=p, pointer="prod", resources_id="rs-a") == 1
    assert _value(registry, "lq_pointer", prefix=p, pointer="latest", resources_id="rs-b") == 1
    assert _value(registry, "lq_pointer", prefix=p, pointer="prod", resources_id="rs-b") is None
    assert _value(registry, "lq_snapshots", prefix=p) == 2
    assert _value(registry, "lq_queue_messages", prefix=p, queue=q, priority="0") == 2
    assert _value(registry, "lq_queue_messages", prefix=p, queue=q, priority="6") == 1
    assert _value(registry, "lq_queue_messages", prefix=p, queue=q, priority="3") == 0
    assert _value(registry, "lq_queue_unacked", prefix=p) == 2
    assert _value(registry, "lq_retries_waiting", prefix=p) == 0 and _value(registry, "lq_dead_letters", prefix=p) == 0
    populated.redis.zadd(populated.keys.delayed, {"ro-x": 1.0})
    populated.redis.lpush(populated.keys.dead_letters, "{}", "{}")
    again = exporter_registry(LightningCollector(populated))
    assert _value(again, "lq_retries_waiting", prefix=p) == 1 and _value(again, "lq_dead_letters", prefix=p) == 2

    assert _value(registry, "lq_worker_processes", prefix=p) == 2
    # Counters per worker host, summed over its pool processes (no PID label): PromQL derives the ratios.
    assert _value(registry, "lq_snapshot_cache_hits_total", prefix=p, worker="w1@h") == 30
    assert _value(registry, "lq_snapshot_cache_misses_total", prefix=p, worker="w2@h") == 10
    assert _value(registry, "lq_snapshot_load_seconds_sum", prefix=p, worker="w1@h") == 0.5
    assert _value(registry, "lq_snapshot_load_seconds_count", prefix=p, worker="w1@h") == 10
    assert _value(registry, "lq_snapshot_cache_entries", prefix=p, worker="w2@h") == 2
    populated.redis.set(populated.keys.cache_stats("w1@h:99"), _stats(hits=5, misses=1, loads=1, load_seconds=0.25))
    pooled = exporter_registry(LightningCollector(populated, cache_stats_every=0))
    assert _value(pooled, "lq_snapshot_cache_hits_total", prefix=p, worker="w1@h") == 35
    assert _value(pooled, "lq_snapshot_load_seconds_sum", prefix=p, worker="w1@h") == 0.75
    assert _value(pooled, "lq_worker_processes", prefix=p) == 3
    # The text exposition a Prometheus server scrapes renders without error.
    assert b'lq_rollouts{prefix="%s",status="queuing"} 3.0' % p.encode() in generate_latest(registry)


def test_each_scrape_reads_fresh_counts(populated: LightningClient) -> None:
    registry = exporter_registry(LightningCollector(populated))
    p = populated.keys.prefix
    assert _value(registry, "lq_rollouts", prefix=p, status="queuing") == 3
    # A new rollout (publishing needs a broker: its record is written directly), a message taken.
    populated.store.create_rollouts([Rollout(input=1, resources_id="rs-b", config=RolloutConfig())])
    populated.redis.rpop(populated.keys.celery_queue(populated.settings.queue))
    assert _value(registry, "lq_rollouts", prefix=p, status="queuing") == 4
    assert _value(registry, "lq_rollouts_by_resources", prefix=p, resources_id="rs-b") == 3
    assert _value(registry, "lq_queue_messages", prefix=p, queue=populated.settings.queue, priority="0") == 1


def test_cache_stats_are_scanned_at_most_once_per_interval(populated: LightningClient) -> None:
    calls = []
    original = populated.cache_stats
    populated.cache_stats = lambda: calls.append(1) or original()  # type: ignore[method-assign]
    registry = exporter_registry(LightningCollector(populated, cache_stats_every=3600))
    for _ in range(3):
        assert _value(registry, "lq_worker_processes", prefix=populated.keys.prefix) == 2
    assert len(calls) == 1
    registry = exporter_registry(LightningCollector(populated, cache_stats_every=0))
    for _ in range(3):
        _value(registry, "lq_worker_processes", prefix=populated.keys.prefix)
    assert len(calls) == 4


def test_scrape_cost_does_not_grow_with_rollouts(fake_client: LightningClient) -> None:
    """Two pipelines whatever the number of rollouts: no rollout record is read."""
    fake_client.add_resources({"prompt": PromptTemplate(template="{x}")}, "rs-a")
    fake_client.store.create_rollouts([Rollout(input=i, config=RolloutConfig()) for i in range(500)])
    executed = []
    real_pipeline = fake_client.redis.pipeline

    def counting_pipeline(*args, **kwargs):
        pipe = real_pipeline(*args, **kwargs)
        real_execute = pipe.execute

        def execute(*a, **kw):
            executed.append([c[0][0] for c in pipe.command_stack])
            return real_execute(*a, **kw)

        pipe.execute = execute
        return pipe

    fake_client.redis.pipeline = counting_pipeline  # type: ignore[method-assign]
    overview = read_overview(fake_client, [fake_client.settings.queue])
    assert overview.rollouts_by_status["queuing"] == 500
    assert len(executed) == 2
    commands = [cmd for cmds in executed for cmd in cmds]
    assert len(commands) < 30, commands
    assert commands.count("HGETALL") == 1  # the pointers hash only, never a rollout record
    assert not {"HGET", "HMGET", "SCAN", "KEYS", "ZRANGE"} & set(commands)


def test_max_snapshots_limits_the_series_but_keeps_pointer_targets(fake_client: LightningClient) -> None:
    for i in range(5):
        fake_client.add_resources({"prompt": PromptTemplate(template=f"{i} {{x}}")}, f"rs-{i}")
    fake_client.set_pointer("prod", "rs-0")
    overview = read_overview(fake_client, [fake_client.settings.queue], max_snapshots=2)
    assert set(overview.rollouts_by_resources) == {"rs-4", "rs-3", "rs-0"}
    assert overview.snapshots == 5
    assert overview.pointers_naming("rs-4") == ["latest"]
    with pytest.raises(ValueError, match="max_snapshots"):
        read_overview(fake_client, [], max_snapshots=0)


def _unreachable(prefix: str) -> LightningClient:
    server = fakeredis.FakeServer()
    server.connected = False  # every command raises redis.ConnectionError
    return LightningClient(Settings(redis_url="redis://127.0.0.1:1/0", key_prefix=prefix),
                           redis_client=fakeredis.FakeRedis(server=server))


def test_redis_down_reports_lq_up_zero_not_an_error(prefix: str) -> None:
    client = _unreachable(prefix)
    registry = exporter_registry(LightningCollector(client))
    assert _value(registry, "lq_up", prefix=prefix) == 0
    assert _value(registry, "lq_rollouts", prefix=prefix, status="queuing") is None


def test_experiment_traffic_hook_is_added_and_cannot_break_a_scrape(populated: LightningClient) -> None:
    from prometheus_client.core import GaugeMetricFamily

    def traffic(client: LightningClient):
        gauge = GaugeMetricFamily("lq_experiment_rollouts", "test", labels=["experiment", "variant"])
        gauge.add_metric(["exp1", "a"], 7)
        yield gauge

    registry = exporter_registry(LightningCollector(populated, experiment_traffic=traffic))
    assert _value(registry, "lq_experiment_rollouts", experiment="exp1", variant="a") == 7

    def broken(client: LightningClient):
        raise RuntimeError("boom")

    registry = exporter_registry(LightningCollector(populated, experiment_traffic=broken))
    assert _value(registry, "lq_rollouts", prefix=populated.keys.prefix, status="queuing") == 3


def test_finished_rollouts_are_counted_from_the_aggregates_by_status(fake_client: LightningClient) -> None:
    store = fake_client.store
    rollouts = [Rollout(input=i) for i in range(3)]
    store.create_rollouts(rollouts)
    claim = store.claim(rollouts[0], "w@host")
    store.start_attempt(rollouts[0].rollout_id, claim.sequence_id, "rs-x", 4)
    store.finish_attempt(rollouts[0].rollout_id, claim.sequence_id, "succeeded", "succeeded",
                         result=RolloutResult(reward=0.5))
    store.terminate(rollouts[1].rollout_id, "cancelled")
    registry = exporter_registry(LightningCollector(fake_client))
    p = fake_client.keys.prefix
    assert _value(registry, "lq_rollouts_finished_total", prefix=p, status="succeeded") == 1
    assert _value(registry, "lq_rollouts_finished_total", prefix=p, status="cancelled") == 1
    assert _value(registry, "lq_rollouts_finished_total", prefix=p, status="failed") == 0
    assert _value(registry, "lq_rollout_duration_seconds_count", prefix=p) == 1
    assert _value(registry, "lq_rollout_duration_seconds_bucket", prefix=p, le="+Inf") == 1
    assert _value(registry, "lq_rollout_queue_wait_seconds_count", prefix=p) == 1
    snap = {"prefix": p, "resources_id": "rs-x", "version": "4"}
    assert _value(registry, "lq_snapshot_rollouts_finished_total", **snap, status="succeeded") == 1
    assert _value(registry, "lq_snapshot_reward_sum", **snap) == 0.5
    assert _value(registry, "lq_snapshot_reward_count", **snap) == 1
    assert _value(registry, "lq_snapshot_reward_max", **snap) == 0.5
    assert _value(registry, "lq_snapshot_rollout_duration_seconds_count", **snap) == 1
    assert _value(registry, "lq_metrics_series_folded_total", prefix=p, kind="snapshot") == 0
    assert _value(registry, "lq_registry_writes_total", prefix=p) == 0
    assert _value(registry, "lq_registry_seq", prefix=p) is None


def test_every_exported_name_follows_prometheus_conventions(populated: LightningClient) -> None:
    """Counters end in _total, durations are in seconds, no derived ratio or mean, no PID label."""
    registry = exporter_registry(LightningCollector(populated))
    for family in registry.collect():
        assert family.name.startswith("lq_")
        assert not family.name.endswith(("_ratio", "_mean")), family.name
        for sample in family.samples:
            assert "process" not in sample.labels, sample
            if family.type == "counter":
                assert sample.name.endswith(("_total", "_created")), sample.name


def test_queue_keys_match_kombus_names_under_the_global_prefix() -> None:
    """The lists the exporter (and KEDA) measure are the ones kombu's Redis transport writes."""
    assert CELERY_PRIORITY_STEPS == tuple(kombu_redis.PRIORITY_STEPS)
    assert CELERY_PRIORITY_SEP == kombu_redis.Channel.sep
    assert kombu_redis.Channel.unacked_key == "unacked"
    keys = Keys("team1")
    channel = object.__new__(kombu_redis.Channel)  # _q_for_pri only reads the class attributes
    for step in CELERY_PRIORITY_STEPS:
        assert keys.celery_queue("calc", step) == keys.celery_prefix + channel._q_for_pri("calc", step)
    assert keys.celery_queue("calc") == "team1:celery:calc"



# --------------------------------------------------------------------------- lightning-queue status


def _status(client: LightningClient, monkeypatch: pytest.MonkeyPatch, *args: str):
    from typer.testing import CliRunner

    from lightning_queue.ops import cli

    return CliRunner().invoke(cli.app, ["status", "--once", *args], env={"COLUMNS": "200"},
                              obj=cli.CliContext(client=client))


def _row(output: str, first_cell: str) -> list[str]:
    """The cells of the table row starting with ``first_cell`` (columns start where the header
    line above the row's table has a word after two spaces)."""
    import re

    lines = output.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(f"{first_cell} "))
    rule = max(i for i in range(at) if lines[i].startswith("─"))
    starts = [m.start() for m in re.finditer(r"(?:^|(?<=  ))\S", lines[rule - 1])]
    return [lines[at][a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]


def test_status_once_prints_one_frame(populated: LightningClient, monkeypatch: pytest.MonkeyPatch) -> None:
    result = _status(populated, monkeypatch, "--no-ping")
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    out = result.stdout
    # worker, processes, ping, consuming, hit ratio, loads, mean load ms, cache MB
    assert _row(out, "w1@h") == ["w1@h", "1", "-", "-", "75.0%", "10", "50.00", "0.00"]
    assert _row(out, "w2@h")[4] == "50.0%"
    assert _row(out, populated.settings.queue) == [populated.settings.queue, "3", "p0:2 p6:1"]
    assert _row(out, "3") == ["3", "0", "2", "0", "1", "0", "0"]  # queuing ... cancelled
    assert _row(out, "rs-a") == ["rs-a", "prod", "3"]
    assert _row(out, "rs-b") == ["rs-b", "latest", "2"]
    flat = " ".join(out.split())  # the header line wraps where the console is narrower than COLUMNS
    assert "2 message(s) held by workers" in flat and "fleet cache hit ratio 66.7%" in flat


def test_status_shows_ping_replies_and_the_liveness_hook(
    populated: LightningClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_queue.ops import cli, monitoring

    monkeypatch.setattr(cli.status, "_ping", lambda client, timeout: {"w1@h": True, "w3@h": True})
    monkeypatch.setattr(monitoring, "worker_liveness", lambda client: {"w2@h": "stalled"})
    out = _status(populated, monkeypatch).stdout
    assert _row(out, "w1@h")[2:4] == ["pong", "-"]
    assert _row(out, "w2@h")[2:4] == ["no reply", "stalled"]
    assert _row(out, "w3@h")[1:5] == ["0", "pong", "-", "-"]  # answers pings, reports no cache


def test_status_without_redis_is_a_one_line_error(prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    client = _unreachable(prefix)
    result = _status(client, monkeypatch, "--no-ping")
    assert result.exit_code == 1 and "cannot reach Redis" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("url, shown", [
    ("redis://:s3cret@h:6379/0", "redis://:**@h:6379/0"),
    ("rediss://user:s3cret@h:6380/0", "rediss://user:**@h:6380/0"),
    ("redis://h:6379/0", "redis://h:6379/0"),
    ("sentinel://:s3cret@h1:26379;sentinel://:s3cret@h2:26379", "sentinel://:**@h1:26379;sentinel://:**@h2:26379"),
])
def test_redact_url(url: str, shown: str) -> None:
    assert redacted_url(url) == shown


def test_status_never_shows_the_redis_password(populated: LightningClient, monkeypatch: pytest.MonkeyPatch) -> None:
    populated.settings = populated.settings.model_copy(update={"redis_url": "redis://:s3cret@10.0.0.5:6379/0"})
    result = _status(populated, monkeypatch, "--no-ping")
    assert result.exit_code == 0 and "s3cret" not in result.stdout and "redis://:**@10.0.0.5:6379/0" in result.stdout


def test_experiment_traffic_is_counted_per_variant(populated: LightningClient, published: list[str]) -> None:
    from lightning_queue import Experiments, Variant
    from lightning_queue.experiments.manager import Experiment

    experiments = Experiments(populated)
    experiments.create(Experiment(name="ab", unit_key="input.user",
                                  variants=[Variant(name="control", resources_id="rs-a"),
                                            Variant(name="treatment", resources_id="rs-b")]))
    experiments.start("ab")
    rollouts = experiments.enqueue("ab", [{"user": f"u{i}"} for i in range(40)])
    per_variant = {v: sum(r.metadata["variant"] == v for r in rollouts) for v in ("control", "treatment")}
    assert all(per_variant.values())  # both variants got traffic, so both series are checked

    registry = exporter_registry(LightningCollector(populated))
    p = populated.keys.prefix
    for variant, n in per_variant.items():
        assert _value(registry, "lq_experiment_rollouts", prefix=p, experiment="ab", variant=variant,
                      status="running") == n


def test_a_worker_that_stopped_consuming_is_exported_as_stalled(populated: LightningClient) -> None:
    now = time.time()
    base = {"pid": 1, "concurrency": 2, "active": 0, "queues": ["q"], "queued": {"q": 5},
            "last_received": now - 600, "backlog_since": now - 600, "updated": now}
    populated.redis.set(populated.keys.worker_health("w1@h"),
                        json.dumps({**base, "hostname": "w1@h", "consuming": []}))
    populated.redis.set(populated.keys.worker_health("w2@h"),
                        json.dumps({**base, "hostname": "w2@h", "consuming": ["q"], "last_received": now,
                                    "backlog_since": None}))

    registry = exporter_registry(LightningCollector(populated))
    p = populated.keys.prefix
    assert _value(registry, "lq_worker_stalled", prefix=p, worker="w1@h") == 1
    assert _value(registry, "lq_worker_stalled", prefix=p, worker="w2@h") == 0
