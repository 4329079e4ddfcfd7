"""A local fleet: real ``celery worker`` processes on this machine, for the demo and tests.

Production fleets are started by hand or by a process manager on each machine
(see ``deploy/``); this module only starts, waits for and stops workers the
same way, as subprocesses.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .settings import Settings


@dataclass
class WorkerProcess:
    name: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


@dataclass
class LocalFleet:
    """Start ``count`` workers for ``agent`` (``module:attr``) against ``settings``.

    Each worker is a separate ``python -m celery -A lightning_queue.app worker``
    process, exactly what a user runs on a machine. Use as a context manager.
    """

    settings: Settings
    agent: str
    count: int = 2
    concurrency: int = 1
    pythonpath: Sequence[str] = ()
    extra_env: dict[str, str] = field(default_factory=dict)
    workers: list[WorkerProcess] = field(default_factory=list)
    _logdir: tempfile.TemporaryDirectory | None = None

    def start(self, timeout: float = 60.0) -> LocalFleet:
        self._logdir = tempfile.TemporaryDirectory(prefix="lq-fleet-")
        env = dict(os.environ)
        env.update(
            LQ_REDIS_URL=self.settings.redis_url,
            LQ_KEY_PREFIX=self.settings.key_prefix,
            LQ_QUEUE=self.settings.queue,
            LQ_AGENT=self.agent,
            LQ_VISIBILITY_TIMEOUT=str(self.settings.visibility_timeout),
            LQ_HARD_TIMEOUT_GRACE_SECONDS=str(self.settings.hard_timeout_grace_seconds),
            **self.extra_env,
        )
        env["PYTHONPATH"] = os.pathsep.join([*self.pythonpath, env.get("PYTHONPATH", "")]).strip(os.pathsep)
        for i in range(self.count):
            name = f"{self.settings.key_prefix}-w{i + 1}@%h"
            log_path = Path(self._logdir.name) / f"worker{i + 1}.log"
            argv = [sys.executable, "-m", "celery", "-A", "lightning_queue.app", "worker",
                    "--hostname", name, "--concurrency", str(self.concurrency), "-Q", self.settings.queue,
                    "--without-mingle", "--without-gossip",
                    # INFO at least: readiness is read from the "ready." line of the log.
                    "--loglevel", "INFO"]
            with open(log_path, "wb") as log:
                process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True)
            self.workers.append(WorkerProcess(name, process, log_path))
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        """Block until every worker logged that it is ready; raise with its log if one died."""
        deadline = time.monotonic() + timeout
        pending = list(self.workers)
        while pending:
            for worker in list(pending):
                if " ready." in worker.log():
                    pending.remove(worker)
                elif not worker.alive:
                    self.stop()
                    raise RuntimeError(f"worker {worker.name} exited at start-up:\n{worker.log()[-4000:]}")
            if pending and time.monotonic() > deadline:
                logs = "\n".join(w.log()[-2000:] for w in pending)
                self.stop()
                raise TimeoutError(f"{len(pending)} worker(s) not ready after {timeout} s:\n{logs}")
            time.sleep(0.1)

    def stop(self, timeout: float = 15.0) -> None:
        """Warm shutdown (SIGTERM: finish the current rollout), then SIGKILL stragglers."""
        for worker in self.workers:
            if worker.alive:
                os.killpg(worker.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            try:
                worker.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(worker.process.pid, signal.SIGKILL)
                worker.process.wait()

    def logs(self) -> str:
        return "\n".join(f"----- {w.name} -----\n{w.log()}" for w in self.workers)

    def close(self) -> None:
        self.stop()
        if self._logdir is not None:
            self._logdir.cleanup()
            self._logdir = None

    def __enter__(self) -> LocalFleet:
        return self.start() if not self.workers else self

    def __exit__(self, *exc: object) -> None:
        self.close()
