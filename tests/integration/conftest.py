"""Integration fixtures: real ``celery worker`` processes against the real Redis.

Every test in this folder is marked ``integration`` (run them alone with
``pytest -m integration``). ``start_workers`` starts worker processes exactly
as a user would (``python -m celery -A <app> worker ...`` with ``LQ_*`` in the
environment), waits until each logs ``ready.``, and stops them after the test;
a failing test's report carries every worker's log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from lightning_queue import Settings
from tests.openai_stub import openai_stub  # noqa: F401 (a fixture for these tests)

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.integration)


def worker_env(settings: Settings, agent: str | None) -> dict[str, str]:
    """The environment a worker gets: ours, with every setting (and only those) as ``LQ_*``."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("LQ_")}
    for name, value in settings.model_dump().items():
        if value is not None:
            env[f"LQ_{name.upper()}"] = str(value)
    if agent is not None:
        env["LQ_AGENT"] = agent
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Worker:
    """One ``celery worker`` process (a main process and one pool child), logging to a file."""

    def __init__(self, name: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
        self.name = name
        self.process = process
        self.log_path = log_path

    @property
    def hostname(self) -> str:
        """The worker's node name, which the runner records as ``Attempt.worker_id``."""
        marker = " ready."
        for line in self.log().splitlines():
            if line.endswith(marker):
                return line.rsplit(marker, 1)[0].split()[-1]
        raise AssertionError(f"worker {self.name} has not logged that it is ready")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def is_ready(self) -> bool:
        return " ready." in self.log()

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # warm shutdown: finish the running rollout

    def wait_or_kill(self, timeout: float) -> None:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        # The process group is the worker and its pool children (start_new_session=True).
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout)


class WorkerPool:
    """The workers one test started; see the ``start_workers`` fixture."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.workers: list[Worker] = []

    def start(
        self,
        settings: Settings,
        agent: str | None,
        count: int = 2,
        app: str = "lightning_queue.app",
        timeout: float = READY_TIMEOUT,
    ) -> list[Worker]:
        env = worker_env(settings, agent)
        started = []
        for _ in range(count):
            index = len(self.workers) + 1
            name = f"w{index}-{settings.key_prefix}"
            log_path = self.tmp_path / f"worker-{index}.log"
            command = [
                sys.executable, "-m", "celery", "-A", app, "worker",
                "-c", "1", "-n", f"{name}@%h", "-Q", settings.queue,
                "--without-mingle", "--without-gossip", "--loglevel", "INFO",
            ]
            with log_path.open("wb") as log:
                process = subprocess.Popen(
                    command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True,
                )
            worker = Worker(name, process, log_path)
            self.workers.append(worker)
            started.append(worker)
        deadline = time.monotonic() + timeout
        for worker in started:
            while not worker.is_ready():
                if worker.process.poll() is not None:
                    raise RuntimeError(f"worker {worker.name} exited with {worker.process.returncode}:\n{worker.log()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"worker {worker.name} not ready after {timeout} s:\n{worker.log()}")
                time.sleep(0.1)
        return started

    def wait_for_log(self, text: str, timeout: float = 20.0) -> Worker:
        """The first worker whose log contains ``text``; raises after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for worker in self.workers:
                if text in worker.log():
                    return worker
            time.sleep(0.1)
        raise TimeoutError(f"no worker logged {text!r} within {timeout} s")

    def stop(self) -> None:
        for worker in self.workers:
            worker.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        for worker in self.workers:
            worker.wait_or_kill(max(0.1, deadline - time.monotonic()))

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
def start_workers(worker_pool: WorkerPool, settings: Settings) -> Callable[..., list[Worker]]:
    """``start_workers("tests.integration.agents:echo", count=2)`` starts real workers
    for the test's settings (pass ``settings=`` to override) and waits until they are ready."""

    def start(agent: str | None, count: int = 2, **kwargs: Any) -> list[Worker]:
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
