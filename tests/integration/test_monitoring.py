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
                   if name in ("lq_worker_cache_hits_total", "lq_worker_cache_misses_total"))
        return s if (_value(s, "lq_rollouts_finished_total", prefix=p) == 6 and gets >= 6) else None

    samples = _wait_for(settled, "6 finished rollouts and the workers' cache stats")
    assert _value(samples, "lq_rollouts", prefix=p, status="succeeded") == 6
    assert _value(samples, "lq_rollouts", prefix=p, status="queuing") == 4  # the idle queue's, still waiting
    assert _value(samples, "lq_rollouts_by_resources", prefix=p, resources_id="rs-mon") == 10
    assert _value(samples, "lq_queue_messages", prefix=p, queue=q, priority="0") == 0
    assert _value(samples, "lq_worker_processes", prefix=p) == 1
    assert 0.0 <= _value(samples, "lq_cache_hit_ratio", prefix=p) <= 1.0
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
