"""A local fleet: real ``celery worker`` processes on this machine, for the demo and tests.

Production fleets are started by hand or by a process manager on each machine
(see ``deploy/``); this module starts, waits for and stops workers the same
way, as subprocesses: ``python -m celery -A <app> worker`` with the settings
in ``LQ_*`` environment variables.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lightning_queue.core.settings import Settings

READY = " ready."


def worker_env(settings: Settings, agent: str | None, pythonpath: Sequence[str] = ()) -> dict[str, str]:
    """This process's environment with every setting (and only those) as ``LQ_*``."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("LQ_")}
    for name, value in settings.model_dump(mode="json").items():
        if value is not None:
            # Mappings (LQ_CELERY, LQ_LLM_PRICES) are read back as JSON.
            env[f"LQ_{name.upper()}"] = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    if agent is not None:
        env["LQ_AGENT"] = agent
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [*pythonpath, env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class WorkerProcess:
    """One ``celery worker`` (its main process and pool children), logging to a file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    @property
    def ready(self) -> bool:
        return READY in self.log()

    @property
    def hostname(self) -> str:
        """The node name Celery expanded (``w1-x@host``): what attempts record as ``worker_id``."""
        for line in self.log().splitlines():
            if line.endswith(READY):
                return line.rsplit(READY, 1)[0].split()[-1]
        raise RuntimeError(f"worker {self.name} has not logged that it is ready")


def wait_for_log(workers: Sequence[WorkerProcess], text: str, timeout: float = 20.0) -> WorkerProcess:
    """The first of ``workers`` whose log contains ``text``; raises after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for worker in workers:
            if text in worker.log():
                return worker
        time.sleep(0.1)
    raise TimeoutError(f"no worker logged {text!r} within {timeout} s")


@dataclass
class LocalFleet:
    """Start ``count`` workers for ``agent`` (``module:attr``) against ``settings``.

    ``app`` is the Celery app the workers load (``lightning_queue.app``, or a
    module of yours that calls ``create_app``); ``pool`` and ``concurrency`` are Celery's
    ``--pool`` and ``--concurrency``. Use as a context manager, or
    call :meth:`start`/:meth:`add` and :meth:`close`.
    """

    settings: Settings
    agent: str | None
    count: int = 2
    concurrency: int = 1
    pool: str | None = None  # Celery's --pool (prefork when None)
    pythonpath: Sequence[str] = ()
    app: str = "lightning_queue.app"
    cwd: str | None = None
    logdir: str | None = None
    workers: list[WorkerProcess] = field(default_factory=list)
    _tmp: tempfile.TemporaryDirectory[str] | None = None

    def start(self, timeout: float = 60.0) -> LocalFleet:
        self.add(self.count, timeout)
        return self

    def add(self, count: int = 1, timeout: float = 60.0) -> list[WorkerProcess]:
        """Start ``count`` more workers and wait until they are ready."""
        if self.logdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="lq-fleet-")
            self.logdir = self._tmp.name
        env = worker_env(self.settings, self.agent, self.pythonpath)
        started = []
        for _ in range(count):
            index = len(self.workers) + 1
            name = f"w{index}-{self.settings.key_prefix}"
            log_path = Path(self.logdir) / f"worker-{index}.log"
            argv = [sys.executable, "-m", "celery", "-A", self.app, "worker",
                    "--hostname", f"{name}@%h", "--concurrency", str(self.concurrency), "-Q", self.settings.queue,
                    "--without-mingle", "--without-gossip",
                    # INFO at least: readiness is read from the "ready." line of the log.
                    "--loglevel", "INFO"]
            if self.pool:
                argv += ["--pool", self.pool]
            with open(log_path, "wb") as log:
                process = subprocess.Popen(argv, env=env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True)
            worker = WorkerProcess(name, process, log_path)
            self.workers.append(worker)
            started.append(worker)
        self._wait_ready(started, timeout)
        return started

    def _wait_ready(self, workers: list[WorkerProcess], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for worker in workers:
            while not worker.ready:
                if not worker.alive:
                    raise RuntimeError(
                        f"worker {worker.name} exited with {worker.process.returncode} at start-up:\n"
                        f"{worker.log()[-4000:]}"
                    )
                if time.monotonic() > deadline:
                    raise TimeoutError(f"worker {worker.name} not ready after {timeout} s:\n{worker.log()[-4000:]}")
                time.sleep(0.1)

    def wait_for_log(self, text: str, timeout: float = 20.0) -> WorkerProcess:
        return wait_for_log(self.workers, text, timeout)

    def stop(self, timeout: float = 15.0) -> None:
        """Warm shutdown (SIGTERM: running rollouts finish), then SIGKILL what is left, including
        a worker whose start was interrupted (Ctrl-C, SIGTERM) before it was recorded."""
        for worker in self.workers:
            if worker.alive:
                worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            try:
                worker.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:  # the pool children too: they share the worker's process group
                os.killpg(worker.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            worker.process.wait()
        self._kill_unrecorded()

    def _kill_unrecorded(self) -> None:
        """SIGKILL the process group of every child of this process that is a worker of this
        fleet (its ``--hostname w<n>-<prefix>@``) but not in :attr:`workers`: an interrupt that
        arrived while ``Popen`` started it left it unrecorded."""
        import psutil

        recorded = {w.process.pid for w in self.workers}
        tag = f"-{self.settings.key_prefix}@"
        for child in psutil.Process().children():
            try:
                if child.pid in recorded or not any(tag in arg for arg in child.cmdline()):
                    continue
                os.killpg(child.pid, signal.SIGKILL)
                child.wait(10)
            except (psutil.Error, ProcessLookupError):
                continue

    def logs(self) -> str:
        return "\n".join(f"----- {w.name} -----\n{w.log()}" for w in self.workers)

    def close(self, timeout: float = 15.0) -> None:
        """:meth:`stop` (``timeout``: how long warm shutdown may take), then remove the temporary log directory."""
        self.stop(timeout)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LocalFleet:
        return self.start() if not self.workers else self

    def __exit__(self, *exc: object) -> None:
        self.close()
