"""Integration fixtures: real ``celery worker`` processes against the real Redis.

Every test in this folder is marked ``integration`` (run them alone with
``pytest -m integration``). ``start_workers`` starts worker processes exactly
as a user would (``python -m celery -A <app> worker ...`` with ``LQ_*`` in the
environment), waits until each logs ``ready.``, and stops them after the test;
a failing test's report carries every worker's log.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from lightning_queue import Settings
from lightning_queue.ops.fleet import LocalFleet, WorkerProcess, wait_for_log
from tests.openai_stub import openai_stub  # noqa: F401 (a fixture for these tests)

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 60.0
# Teardown is not where warm shutdown is tested (test_restarts does that itself): SIGTERM, this
# long for the workers to exit, then SIGKILL to the process group. A warm shutdown takes ~2.5 s
# per test even when idle; its keys go with the test's prefix.
STOP_GRACE = 0.3


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.integration)


class WorkerPool:
    """The fleets one test started; see the ``start_workers`` fixture."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.fleets: list[LocalFleet] = []

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
    ) -> list[WorkerProcess]:
        logdir = self.tmp_path / f"fleet-{len(self.fleets) + 1}"
        logdir.mkdir()
        fleet = LocalFleet(settings, agent, count=count, pythonpath=[str(REPO_ROOT)], app=app, cwd=str(REPO_ROOT),
                           logdir=str(logdir))
        self.fleets.append(fleet)
        return fleet.add(count, timeout)

    def wait_for_log(self, text: str, timeout: float = 20.0) -> WorkerProcess:
        return wait_for_log(self.workers, text, timeout)

    def stop(self) -> None:
        for fleet in self.fleets:
            fleet.stop(STOP_GRACE)

    def logs(self) -> list[tuple[str, str]]:
        return [(f"worker {w.name} log", w.log()) for w in self.workers]


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
    for the test's settings (pass ``settings=`` to override) and waits until they are ready."""

    def start(agent: str | None, count: int = 2, **kwargs: Any) -> list[WorkerProcess]:
        return worker_pool.start(kwargs.pop("settings", settings), agent, count, **kwargs)

    return start


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
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
