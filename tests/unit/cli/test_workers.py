"""``lightning-queue workers``: consumption health and snapshot caches, and exit 1 on a stalled worker."""

from __future__ import annotations

import json
import time

from lightning_queue import LightningClient
from tests.unit.cli.expect import Invoke


def test_workers_shows_each_process_cache_and_the_fleet_hit_ratio(client: LightningClient, invoke: Invoke) -> None:
    assert "no worker process has reported" in invoke("workers").output
    stats = {"hits": 9, "misses": 1, "hit_ratio": 0.9, "entries": 2, "bytes": 2_000_000, "evictions": 0,
             "mean_load_ms": 2.5}
    client.redis.set(client.keys.cache_stats("w1@h:11"), json.dumps(stats))
    client.redis.set(client.keys.cache_stats("w2@h:12"), json.dumps({**stats, "hits": 1, "misses": 9,
                                                                      "hit_ratio": 0.1}))
    result = invoke("workers")
    assert result.exit_code == 0, result.output
    assert "w1@h:11" in result.output and "90.0%" in result.output and "2.00" in result.output
    assert "fleet: 2 process(es), hit ratio 50.0%" in result.output


def test_workers_reports_a_stalled_worker_and_exits_1(client: LightningClient, invoke: Invoke) -> None:
    now = time.time()
    base = {"pid": 1, "concurrency": 1, "queues": ["q"], "queued": {"q": 4}, "updated": now}
    client.redis.set(client.keys.worker_health("stuck@h"), json.dumps(
        {**base, "hostname": "stuck@h", "active": 0, "consuming": [], "last_received": None,
         "backlog_since": now - 3600}))
    client.redis.set(client.keys.worker_health("busy@h"), json.dumps(
        {**base, "hostname": "busy@h", "active": 1, "consuming": ["q"], "last_received": now - 5,
         "backlog_since": now - 3600}))
    result = invoke("workers")
    assert result.exit_code == 1, result.output
    assert "STALLED" in result.output and "busy@h" in result.output
    assert "stalled: stuck@h: messages waited" in result.output and "no longer consumes q" in result.output
    assert "stalled: busy@h" not in result.output
    client.redis.delete(client.keys.worker_health("stuck@h"))
    assert invoke("workers").exit_code == 0
