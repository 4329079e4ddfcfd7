"""The Prometheus exporter and ``lightning-queue status``, run as a user runs them, against real workers."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lightning_queue import LightningClient, PromptTemplate, Settings
from lightning_queue.ops.embedded import free_port
from lightning_queue.ops.fleet import worker_env

REPO_ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-c", "from lightning_queue.ops.cli import main; main()"]


def _scrape(port: int) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        body = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def _value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def _wait_for(condition, what: str, timeout: float = 60.0):
    """Poll ``condition()`` until it returns a true value (the scrape it judged is returned)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture
def monitored(settings: Settings) -> Settings:
    # Workers report their cache stats often, so the test sees them soon.
    return settings.model_copy(update={"cache_stats_interval_seconds": 0.3})


@pytest.fixture
def exporter(monitored: Settings, tmp_path: Path) -> Iterator[tuple[int, subprocess.Popen]]:
    """``lightning-queue exporter`` as a process, measuring the test's queue and an idle one."""
    port = free_port()
    log = tmp_path / "exporter.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [*CLI, "exporter", "--port", str(port),  # and the default address
             "--queues", f"{monitored.queue},{monitored.queue}-idle"],
            cwd=REPO_ROOT, env=worker_env(monitored, None), stdout=out, stderr=subprocess.STDOUT)

    def up() -> bool:
        assert process.poll() is None, log.read_text(errors="replace")
        try:
            return _value(_scrape(port), "lq_up", prefix=monitored.key_prefix) == 1
        except OSError:
            return False

    try:
        _wait_for(up, "the exporter to serve /metrics")
        yield port, process
    finally:
        process.terminate()  # SIGTERM: the exporter stops cleanly
        try:
            assert process.wait(15) == 0, log.read_text(errors="replace")
        finally:
            if process.poll() is None:
                process.kill()


def test_exporter_listens_on_loopback_by_default(exporter: tuple[int, subprocess.Popen]) -> None:
    # It has no authentication: reachable from this machine only, unless told otherwise.
    import psutil

    port, process = exporter
    listening = {c.laddr.ip for c in psutil.Process(process.pid).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    assert listening == {"127.0.0.1"}


def test_exporter_reports_rollouts_queues_and_worker_caches(
    monitored: Settings, exporter: tuple[int, subprocess.Popen], start_workers
) -> None:
    port, _ = exporter
    p, q = monitored.key_prefix, monitored.queue
    client = LightningClient(monitored)
    client.add_resources({"prompt": PromptTemplate(template="{x}")}, "rs-mon")
    client.set_pointer("prod", "rs-mon")
    # Waiting messages, published by Celery itself to a queue no worker consumes: the exporter
    # must measure kombu's real list keys.
    client.enqueue_rollouts([{"x": i} for i in range(4)], resources_id="rs-mon", queue=f"{q}-idle")
    samples = _wait_for(
        lambda: (s := _scrape(port)) and _value(s, "lq_queue_messages", prefix=p, queue=f"{q}-idle", priority="0") == 4
        and s,
        "4 waiting messages in the idle queue")
    assert _value(samples, "lq_rollouts", prefix=p, status="queuing") == 4
    assert _value(samples, "lq_pointer", prefix=p, pointer="prod", resources_id="rs-mon") == 1

    start_workers("tests.integration.agents:echo", count=1, settings=monitored)
    done = client.wait_for_rollouts(
        [r.rollout_id for r in client.enqueue_rollouts([{"x": i} for i in range(6)], resources_id="rs-mon")],
        timeout=120)
    assert len(done) == 6 and {r.status for r in done} == {"succeeded"}

    def settled() -> dict | None:
        s = _scrape(port)
        gets = sum(v for (name, _), v in s.items()
                   if name in ("lq_snapshot_cache_hits_total", "lq_snapshot_cache_misses_total"))
        return s if (_value(s, "lq_rollouts_finished_total", prefix=p, status="succeeded") == 6 and gets >= 6) \
            else None

    samples = _wait_for(settled, "6 finished rollouts and the workers' cache stats")
    assert _value(samples, "lq_rollouts", prefix=p, status="succeeded") == 6
    assert _value(samples, "lq_rollouts", prefix=p, status="queuing") == 4  # the idle queue's, still waiting
    assert _value(samples, "lq_rollouts_by_resources", prefix=p, resources_id="rs-mon") == 10
    assert _value(samples, "lq_queue_messages", prefix=p, queue=q, priority="0") == 0
    assert _value(samples, "lq_worker_processes", prefix=p) == 1
    assert _value(samples, "lq_rollout_duration_seconds_count", prefix=p) == 6
    client.close()


def test_exporter_series_per_snapshot_and_variant_match_the_records(
    monitored: Settings, exporter: tuple[int, subprocess.Popen], start_workers
) -> None:
    """Rollouts on two snapshots and two experiment variants, run by a real worker: the histograms,
    counters and reward summaries the exporter serves are what the rollout records say."""
    from lightning_queue.core.metrics import DURATION_BUCKETS, QUEUE_WAIT_BUCKETS
    from lightning_queue.experiments.manager import Experiment, Experiments, Variant

    port, _ = exporter
    p = monitored.key_prefix
    client = LightningClient(monitored)
    client.add_resources({"prompt": PromptTemplate(template="one {x}")}, "rs-m1")
    client.add_resources({"prompt": PromptTemplate(template="two {x}")}, "rs-m2")
    experiments = Experiments(client)
    experiments.create(Experiment(name="mx", unit_key="input.user",
                                  variants=[Variant(name="control", resources_id="rs-m1"),
                                            Variant(name="treatment", resources_id="rs-m2")]))
    experiments.start("mx")
    start_workers("tests.integration.agents:scored", count=1, settings=monitored)
    ids = [r.rollout_id for r in experiments.enqueue(
        "mx", [{"user": f"u{i}", "reward": i / 10, "fail": i % 7 == 3} for i in range(24)])]
    ids += [r.rollout_id for r in client.enqueue_rollouts([{"reward": 2.0 + i} for i in range(4)],
                                                           resources_id="rs-m2")]
    assert len(client.wait_for_rollouts(ids, timeout=120)) == len(ids)
    records = client.store.get_rollouts(ids)
    assert {r.status for r in records} == {"succeeded", "failed"}

    def scraped() -> dict | None:
        s = _scrape(port)
        total = sum(_value(s, "lq_rollouts_finished_total", prefix=p, status=st) or 0 for st in ("succeeded", "failed"))
        return s if total == len(ids) else None

    samples = _wait_for(scraped, "every finished rollout counted")
    for status in ("succeeded", "failed", "cancelled"):
        assert _value(samples, "lq_rollouts_finished_total", prefix=p, status=status) == \
            sum(r.status == status for r in records)

    def check_histogram(name: str, labels: dict, bounds: tuple[float, ...], values: list[float]) -> None:
        assert _value(samples, f"{name}_count", **labels) == len(values)
        assert _value(samples, f"{name}_sum", **labels) == pytest.approx(sum(values))
        for bound in bounds:
            assert _value(samples, f"{name}_bucket", **labels, le=repr(bound)) == sum(v <= bound for v in values)
        assert _value(samples, f"{name}_bucket", **labels, le="+Inf") == len(values)

    durations = [r.end_time - r.start_time for r in records if r.start_time and r.end_time]
    waits = [r.start_time - r.enqueue_time for r in records if r.start_time]
    check_histogram("lq_rollout_duration_seconds", {"prefix": p}, DURATION_BUCKETS, durations)
    check_histogram("lq_rollout_queue_wait_seconds", {"prefix": p}, QUEUE_WAIT_BUCKETS, waits)

    def check_series(kind: str, labels: dict, rs: list) -> None:
        assert rs, labels
        for status in ("succeeded", "failed"):
            assert _value(samples, f"lq_{kind}_rollouts_finished_total", **labels, status=status) == \
                (sum(r.status == status for r in rs) or None)  # a status never seen has no series
        rewards = [r.reward for r in rs if r.status == "succeeded" and r.reward is not None]
        assert _value(samples, f"lq_{kind}_reward_count", **labels) == len(rewards)
        assert _value(samples, f"lq_{kind}_reward_sum", **labels) == pytest.approx(sum(rewards))
        assert _value(samples, f"lq_{kind}_reward_min", **labels) == pytest.approx(min(rewards))
        assert _value(samples, f"lq_{kind}_reward_max", **labels) == pytest.approx(max(rewards))
        check_histogram(f"lq_{kind}_rollout_duration_seconds", labels, DURATION_BUCKETS,
                        [r.end_time - r.start_time for r in rs])

    ran = {(r.ran_resources_id, r.ran_resources_version) for r in records}
    assert ran == {("rs-m1", 1), ("rs-m2", 1)}  # every record names the snapshot it ran
    for rid in ("rs-m1", "rs-m2"):
        check_series("snapshot", {"prefix": p, "resources_id": rid, "version": "1"},
                     [r for r in records if r.ran_resources_id == rid])
    for variant in ("control", "treatment"):
        check_series("variant", {"prefix": p, "experiment": "mx", "variant": variant},
                     [r for r in records if r.metadata.get("variant") == variant])
    assert not any(name == "lq_registry_seq" or "process" in dict(labels) for name, labels in samples)
    client.close()


def test_status_once_shows_workers_queues_and_snapshots(monitored: Settings, start_workers) -> None:
    client = LightningClient(monitored)
    client.add_resources({"prompt": PromptTemplate(template="{x}")}, "rs-status")
    workers = start_workers("tests.integration.agents:echo", count=1, settings=monitored)
    done = client.wait_for_rollouts([r.rollout_id for r in client.enqueue_rollouts([{"x": 1}, {"x": 2}])],
                                    timeout=120)
    assert len(done) == 2
    _wait_for(lambda: client.cache_stats(), "the worker's cache stats")

    result = subprocess.run([*CLI, "status", "--once", "--ping-timeout", "5"], check=False, cwd=REPO_ROOT,
                            env={**worker_env(monitored, None), "COLUMNS": "200"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    node = workers[0].hostname
    line = next(line for line in result.stdout.splitlines() if node in line)
    assert "pong" in line, result.stdout
    assert "rs-status" in result.stdout and "latest" in result.stdout
    assert "succeeded" in result.stdout
    client.close()
