"""Integration fixtures: real ``celery worker`` processes against the real Redis.

Every test in this folder is marked ``integration`` (run them alone with
``pytest -m integration``). Workers are started exactly as a user would
(``python -m celery -A <app> worker ...`` with ``LQ_*`` in the environment) and
waited for until each logs ``ready.``. Two ways to get them:

* ``start_workers`` starts workers of the test's own, stopped after it. For
  tests that kill or stop workers, restart Redis, or need settings or a key
  prefix of their own.
* ``shared_workers`` gives the test workers of a fleet started once per module
  for that agent, app, count and settings (see :class:`SharedFleet`), and a
  client on its key prefix and queue. A start-up is paid once per module
  instead of once per test. Not for a test that must enqueue or change the
  registry *before* its workers start: running workers get Celery's revoke
  broadcasts, and their snapshot caches resolve ``latest`` and pointers from
  registry events as they arrive, where freshly started workers read the
  registry as it stands.

Either way a failing test's report carries every worker's log (for a shared
fleet, what was logged since the test began).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lightning_queue import LightningClient, Settings
from lightning_queue.ops.fleet import LocalFleet, WorkerProcess, wait_for_log
from tests.conftest import delete_prefix

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 60.0
# Teardown is not where warm shutdown is tested (test_restarts does that itself): SIGTERM, this
# long for the workers to exit, then SIGKILL to the process group. A warm shutdown takes ~2.5 s
# per test even when idle; its keys go with the test's prefix.
STOP_GRACE = 0.3
IDLE_TIMEOUT = 10.0  # seconds a shared fleet has to take and ack the last test's messages before the next test


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.integration)


class WorkerPool:
    """The workers one test used: fleets it started (``start_workers``), stopped after it, and
    shares of shared fleets (``shared_workers``); a failing test's report carries their logs."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.fleets: list[LocalFleet] = []
        self.shares: list[FleetShare] = []

    @property
    def workers(self) -> list[WorkerProcess]:
        return [w for fleet in self.fleets for w in fleet.workers]

    def start(
        self,
        settings: Settings,
        agent: str | None,
        count: int = 2,
        app: str = "lightning_queue.app",
        timeout: float = READY_TIMEOUT,
        pool: str | None = None,
        concurrency: int = 1,
    ) -> list[WorkerProcess]:
        logdir = self.tmp_path / f"fleet-{len(self.fleets) + 1}"
        logdir.mkdir()
        fleet = LocalFleet(settings, agent, count=count, pythonpath=[str(REPO_ROOT)], app=app, cwd=str(REPO_ROOT),
                           logdir=str(logdir), pool=pool, concurrency=concurrency)
        self.fleets.append(fleet)
        return fleet.add(count, timeout)

    def wait_for_log(self, text: str, timeout: float = 20.0) -> WorkerProcess:
        return wait_for_log(self.workers, text, timeout)

    def stop(self) -> None:
        for fleet in self.fleets:
            fleet.stop(STOP_GRACE)

    def logs(self) -> list[tuple[str, str]]:
        own = [(f"worker {w.name} log", w.log()) for w in self.workers]
        return own + [section for share in self.shares for section in share.logs()]


@pytest.fixture
def worker_pool(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[WorkerPool]:
    pool = WorkerPool(tmp_path)
    request.node._lq_worker_pool = pool
    try:
        yield pool
    finally:
        pool.stop()


@pytest.fixture
def start_workers(worker_pool: WorkerPool, settings: Settings) -> Callable[..., list[WorkerProcess]]:
    """``start_workers("tests.integration.agents:echo", count=2)`` starts real workers
    for the test's settings (pass ``settings=`` to override; ``pool=`` and ``concurrency=`` are
    Celery's) and waits until they are ready."""

    def start(agent: str | None, count: int = 2, **kwargs: Any) -> list[WorkerProcess]:
        return worker_pool.start(kwargs.pop("settings", settings), agent, count, **kwargs)

    return start


# --------------------------------------------------------------------------- shared fleets


@dataclass(frozen=True)
class FleetKey:
    agent: str | None
    app: str
    count: int
    overrides: tuple[tuple[str, Any], ...]  # Settings fields besides redis_url, key_prefix and queue

    @classmethod
    def of(cls, agent: str | None, app: str, count: int, overrides: dict[str, Any]) -> FleetKey:
        # Mappings (a price table, Celery options) are keyed by their JSON, so the key stays hashable.
        frozen = ((k, _Frozen(json.dumps(v, sort_keys=True, default=repr)) if isinstance(v, dict) else v)
                  for k, v in overrides.items())
        return cls(agent, app, count, tuple(sorted(frozen)))

    def settings_overrides(self) -> dict[str, Any]:
        return {k: json.loads(v) if isinstance(v, _Frozen) else v for k, v in self.overrides}


class _Frozen(str):
    """A mapping override, as JSON."""


class SharedFleet:
    """Workers for one :class:`FleetKey`, started on first use and kept for the module.

    The tests that use it share its key prefix and queue, so each looks only at the
    rollouts it enqueued (by id) and names its snapshots, pointers and experiments apart
    from the others'. Before each test (:meth:`ready`) the fleet is checked: a dead worker,
    or a previous test that failed (it may have left work running or a worker wedged),
    gets the fleet restarted with its queue emptied; otherwise the test waits until the
    previous one's messages are all taken and acked, so it starts on an idle fleet.
    """

    def __init__(self, key: FleetKey, redis_url: str, logdir: Path) -> None:
        self.key = key
        prefix = f"lqtest-shared-{uuid.uuid4().hex[:10]}"
        self.settings = Settings(redis_url=redis_url, key_prefix=prefix, queue=f"{prefix}-q",
                                 **key.settings_overrides())
        self.logdir = logdir
        self.fleet: LocalFleet | None = None
        self.dirty = False
        self.starts = 0

    @property
    def workers(self) -> list[WorkerProcess]:
        return list(self.fleet.workers) if self.fleet is not None else []

    def ready(self, client: LightningClient) -> list[WorkerProcess]:
        """The workers, alive and idle: started now if this is the first use, restarted if
        any died, the last test that used them failed, or its messages never drained."""
        if self.fleet is None or self.dirty or not all(w.alive for w in self.fleet.workers) \
                or not self._drained(client):
            self.restart(client)
        return self.workers

    def _drained(self, client: LightningClient) -> bool:
        deadline = time.monotonic() + IDLE_TIMEOUT
        while self._messages(client):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def _messages(self, client: LightningClient) -> int:
        """Messages waiting in the queue or taken and not yet acked."""
        keys = client.keys
        with client.redis.pipeline(transaction=False) as pipe:
            for key in keys.celery_queues(self.settings.queue).values():
                pipe.llen(key)
            pipe.hlen(keys.celery_unacked)
            return sum(pipe.execute())

    def restart(self, client: LightningClient) -> None:
        if self.fleet is not None:
            self.fleet.stop(STOP_GRACE)
            # What the last test left queued or unacked must not run during the next one.
            client.redis.delete(*client.keys.celery_queues(self.settings.queue).values(), client.keys.celery_unacked,
                                f"{client.keys.celery_unacked}_index")
        self.starts += 1
        logdir = self.logdir / f"start-{self.starts}"
        logdir.mkdir(parents=True)
        self.fleet = LocalFleet(self.settings, self.key.agent, count=self.key.count, pythonpath=[str(REPO_ROOT)],
                                app=self.key.app, cwd=str(REPO_ROOT), logdir=str(logdir))
        self.dirty = False
        self.fleet.add(self.key.count, READY_TIMEOUT)

    def stop(self) -> None:
        if self.fleet is not None:
            self.fleet.stop(STOP_GRACE)


class FleetShare:
    """One test's use of a :class:`SharedFleet`: its workers, a client on its settings, and
    the part of the workers' logs written since the test began."""

    def __init__(self, fleet: SharedFleet) -> None:
        self.fleet = fleet
        self.settings = fleet.settings
        self.client = LightningClient(self.settings)
        try:
            self.workers = fleet.ready(self.client)
        except BaseException:
            self.client.close()
            raise
        self._log_start = {w.log_path: w.log_path.stat().st_size for w in self.workers}

    def log(self, worker: WorkerProcess) -> str:
        """What ``worker`` logged since this test began."""
        try:
            with open(worker.log_path, "rb") as f:
                f.seek(self._log_start.get(worker.log_path, 0))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def logs(self) -> list[tuple[str, str]]:
        return [(f"worker {w.name} log (shared fleet, since this test began; all of it: {w.log_path})", self.log(w))
                for w in self.workers]

    def wait_for_log(self, text: str, timeout: float = 20.0) -> WorkerProcess:
        """The first worker that logged ``text`` since this test began; raises after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            for worker in self.workers:
                if text in self.log(worker):
                    return worker
            if time.monotonic() > deadline:
                raise TimeoutError(f"no worker logged {text!r} within {timeout} s")
            time.sleep(0.1)

    def close(self, failed: bool) -> None:
        self.client.close()
        if failed:
            self.fleet.dirty = True


class SharedFleets:
    """The shared fleets of one module, by :class:`FleetKey`."""

    def __init__(self, redis_url: str, logdir: Path) -> None:
        self.redis_url = redis_url
        self.logdir = logdir
        self.fleets: dict[FleetKey, SharedFleet] = {}

    def get(self, key: FleetKey) -> SharedFleet:
        if key not in self.fleets:
            self.fleets[key] = SharedFleet(key, self.redis_url, self.logdir / f"fleet-{len(self.fleets) + 1}")
        return self.fleets[key]

    def close(self) -> None:
        for fleet in self.fleets.values():
            fleet.stop()
            delete_prefix(self.redis_url, fleet.settings.key_prefix)


@pytest.fixture(scope="module")
def shared_fleets(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedFleets]:
    fleets = SharedFleets(redis_url, tmp_path_factory.mktemp("shared-fleets"))
    try:
        yield fleets
    finally:
        fleets.close()


@pytest.fixture
def shared_workers(
    request: pytest.FixtureRequest, worker_pool: WorkerPool, shared_fleets: SharedFleets
) -> Iterator[Callable[..., FleetShare]]:
    """``shared_workers("tests.integration.agents:echo", count=2)`` gives the test a
    :class:`FleetShare` of the module's fleet for that agent (``app=``, ``count=`` and any
    Settings field as a keyword pick the fleet): ``.workers``, alive and idle, and a
    ``.client`` on the fleet's prefix and queue."""
    shares: list[FleetShare] = []

    def share(agent: str | None, count: int = 2, app: str = "lightning_queue.app", **overrides: Any) -> FleetShare:
        taken = FleetShare(shared_fleets.get(FleetKey.of(agent, app, count, overrides)))
        shares.append(taken)
        worker_pool.shares.append(taken)
        return taken

    yield share
    failed = any(report.failed for report in getattr(request.node, "_lq_reports", {}).values())
    for taken in shares:
        taken.close(failed)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    item.__dict__.setdefault("_lq_reports", {})[call.when] = report  # read by shared_workers at teardown
    pool: WorkerPool | None = getattr(item, "_lq_worker_pool", None)
    if pool is not None and report.failed and call.when in ("setup", "call"):
        for title, text in pool.logs():
            report.sections.append((title, text))
    return report


@pytest.fixture
def marker_dir(tmp_path: Path) -> str:
    """A directory agents in worker processes leave marker files in (see ``agents.py``)."""
    path = tmp_path / "markers"
    path.mkdir()
    return str(path)
