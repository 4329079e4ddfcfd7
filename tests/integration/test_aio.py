"""The asyncio client on a real Redis: cancelled waits leave nothing behind."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

from lightning_queue import AsyncLightningClient, LightningClient, Rollout, Settings

REPO_ROOT = Path(__file__).resolve().parents[2]


def never_finishing(settings: Settings) -> str:
    """A rollout that stays ``queuing``: its record is written, no message is sent."""
    rollout = Rollout(input="never runs")
    with LightningClient(settings) as client:
        client.store.create_rollouts([rollout])
    return rollout.rollout_id


async def test_twenty_cancelled_waits_leave_the_client_usable(settings: Settings) -> None:
    rollout_id = never_finishing(settings)
    client = AsyncLightningClient(settings)
    try:
        for _ in range(20):
            try:
                await asyncio.wait_for(client.wait_for_rollouts([rollout_id]), 0.05)
            except TimeoutError:
                pass
            else:
                raise AssertionError("the rollout never finishes: the wait must time out")
        started = time.perf_counter()
        assert await asyncio.wait_for(client.get_pointer("prod"), 5) is None  # generous: a shared machine
        answered = time.perf_counter() - started
    finally:
        started = time.perf_counter()
        await asyncio.wait_for(client.close(), 5)
        closed = time.perf_counter() - started
    print(f"after 20 cancelled waits: get_pointer answered in {answered * 1000:.1f} ms, close() took "
          f"{closed * 1000:.1f} ms")
    with LightningClient(settings) as sync:  # each cancelled wait gave its subscription back
        assert sync.redis.pubsub_numsub(settings.keys.events)[0][1] == 0


SCRIPT = """
import asyncio, sys
from lightning_queue import AsyncLightningClient

async def main():
    client = AsyncLightningClient()  # settings from LQ_*; never closed, no `async with`
    try:
        await asyncio.wait_for(client.wait_for_rollouts([sys.argv[1]]), 0.05)
    except TimeoutError:
        print("cancelled", flush=True)

asyncio.run(main())
"""


def test_a_program_with_a_cancelled_wait_outside_async_with_exits(settings: Settings) -> None:
    rollout_id = never_finishing(settings)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LQ_")},
           "LQ_REDIS_URL": settings.redis_url, "LQ_KEY_PREFIX": settings.key_prefix}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", SCRIPT, rollout_id], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    print(f"the program exited after {time.monotonic() - started:.2f} s")
    assert (done.returncode, done.stdout) == (0, "cancelled\n"), done.stderr
