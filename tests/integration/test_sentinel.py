"""Redis Sentinel: clients, workers and the exporter find the primary through the Sentinels,
and carry on after a failover. Uses its own redis-server processes (a primary with a password,
a replica, one Sentinel), never the shared Redis."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from lightning_queue import LightningClient, PromptTemplate, Settings
from lightning_queue.core.errors import ConfigurationError
from lightning_queue.ops.embedded import free_port
from lightning_queue.storage.connections import connect, text

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary")

PASSWORD = "sentinel-test-pw"
MASTER = "lqprimary"


@dataclass
class SentinelSet:
    primary_port: int
    replica_port: int
    sentinel_port: int
    processes: dict[str, subprocess.Popen]

    @property
    def url(self) -> str:
        return f"sentinel://:{PASSWORD}@127.0.0.1:{self.sentinel_port}/0"

    def direct(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, password=PASSWORD, socket_timeout=5, retry=Retry(NoBackoff(), 0))

    def replica_known(self) -> bool:
        sentinel = redis.Redis(port=self.sentinel_port, socket_timeout=5, decode_responses=True)
        return any(int(r["port"]) == self.replica_port for r in sentinel.sentinel_slaves(MASTER))

    def primary_address(self) -> tuple[str, int]:
        sentinel = redis.Redis(port=self.sentinel_port, socket_timeout=5)
        host, port = sentinel.sentinel_get_master_addr_by_name(MASTER)
        return text(host), int(port)


def _wait(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except (redis.RedisError, OSError):
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture
def sentinel_set(tmp_path: Path) -> Iterator[SentinelSet]:
    primary, replica, sentinel = free_port(), free_port(), free_port()
    common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--requirepass", PASSWORD,
              "--masterauth", PASSWORD, "--loglevel", "warning"]
    processes: dict[str, subprocess.Popen] = {}

    def start(name: str, args: list[str]) -> None:
        (tmp_path / name).mkdir()
        log = open(tmp_path / f"{name}.log", "wb")
        processes[name] = subprocess.Popen(["redis-server", *args, "--dir", str(tmp_path / name)],
                                           stdout=log, stderr=subprocess.STDOUT)

    start("primary", ["--port", str(primary), *common])
    start("replica", ["--port", str(replica), *common, "--replicaof", "127.0.0.1", str(primary)])
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {sentinel}\nbind 127.0.0.1\n"
        f"sentinel monitor {MASTER} 127.0.0.1 {primary} 1\n"
        f"sentinel auth-pass {MASTER} {PASSWORD}\n"
        f"sentinel down-after-milliseconds {MASTER} 1000\n"
        f"sentinel failover-timeout {MASTER} 5000\n"
    )
    processes["sentinel"] = subprocess.Popen(
        ["redis-server", str(conf), "--sentinel", "--dir", str(tmp_path)],
        stdout=open(tmp_path / "sentinel.log", "wb"), stderr=subprocess.STDOUT)
    s = SentinelSet(primary, replica, sentinel, processes)
    try:
        _wait(lambda: s.direct(replica).info("replication")["master_link_status"] == "up", "the replica to sync")
        _wait(lambda: s.primary_address() == ("127.0.0.1", primary), "the Sentinel to know the primary")
        # The Sentinel finds replicas in the primary's INFO (every 10 s); until then it has none to promote.
        _wait(s.replica_known, "the Sentinel to discover the replica")
        yield s
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.terminate()
        for process in processes.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


def test_a_sentinel_url_needs_the_primary_name() -> None:
    with pytest.raises(ConfigurationError, match="LQ_SENTINEL_MASTER") as error:
        connect("sentinel://:s3cret@127.0.0.1:26379/0")
    assert "s3cret" not in str(error.value)
    with pytest.raises(ConfigurationError, match="sentinel://host1:26379"):
        connect("sentinel://127.0.0.1:26379;redis://127.0.0.1:6379", "mymaster")


def test_rollouts_run_through_sentinel_and_survive_a_failover(
    sentinel_set: SentinelSet, prefix: str, start_workers
) -> None:
    settings = Settings(redis_url=sentinel_set.url, sentinel_master=MASTER, key_prefix=prefix, queue=f"{prefix}-q")
    client = LightningClient(settings)
    client.add_resources({"prompt": PromptTemplate(template="{x}")}, "rs-sentinel")
    start_workers("tests.integration.agents:echo", count=1, settings=settings)

    first = client.wait_for_rollouts([r.rollout_id for r in client.enqueue_rollouts([{"x": i} for i in range(3)])],
                                     timeout=120)
    assert [r.status for r in first] == ["succeeded"] * 3
    # Everything went to the primary the Sentinel named, and reached the replica.
    primary = sentinel_set.direct(sentinel_set.primary_port)
    assert primary.exists(client.keys.snapshot("rs-sentinel"))
    assert primary.wait(1, 10_000) == 1

    # The primary dies; the Sentinel promotes the replica; clients and the worker follow it.
    sentinel_set.processes["primary"].kill()
    sentinel_set.processes["primary"].wait(10)
    _wait(lambda: sentinel_set.primary_address() == ("127.0.0.1", sentinel_set.replica_port),
          "the Sentinel to promote the replica")

    second = client.wait_for_rollouts(
        [r.rollout_id for r in client.enqueue_rollouts([{"x": i} for i in range(3)], resources_id="rs-sentinel")],
        timeout=180)
    assert [r.status for r in second] == ["succeeded"] * 3
    assert client.get_rollout(first[0].rollout_id).status == "succeeded"  # replicated before the failover
    assert sentinel_set.direct(sentinel_set.replica_port).exists(client.keys.rollout(second[0].rollout_id))
    client.close()
