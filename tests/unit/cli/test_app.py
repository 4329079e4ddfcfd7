"""The whole command as a user meets it: help, global options, one-line errors said once,
secrets masked (and nothing else), and a start that loads only what the command needs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lightning_queue.ops.cli import app
from lightning_queue.ops.embedded import free_port
from tests.unit.cli.expect import Invoke, one_line_error

COMMANDS = ("worker", "workers", "status", "exporter", "resources", "rollouts", "experiments", "demo")


def _unreachable(password: str | None = None) -> str:
    auth = f":{password}@" if password else ""
    return f"redis://{auth}127.0.0.1:{free_port()}/0"


@pytest.fixture
def fast_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    """No retrying through the backoff: an unreachable Redis fails at once."""
    monkeypatch.setenv("LQ_REDIS_RETRY_SECONDS", "0")


def test_help_lists_every_command_and_touches_neither_settings_nor_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LQ_VISIBILITY_TIMEOUT", "-3")  # invalid: reading the settings would fail
    result = CliRunner().invoke(app, ["--redis-url", _unreachable(), "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    listed = {line.split()[1] for line in result.stdout.splitlines() if line.startswith("│ ") and line.split()[1:]}
    assert set(COMMANDS) <= listed
    for group in ("resources", "rollouts", "experiments"):
        assert CliRunner().invoke(app, [group, "list" if group != "experiments" else "status", "--help"]).exit_code == 0


@pytest.mark.parametrize("args", [("resources", "list"), ("rollouts", "list"), ("workers",), ("experiments", "status"),
                                  ("status", "--once", "--no-ping"), ("resources", "gc", "--dry-run")])
def test_no_redis_is_said_once_in_one_line(args: tuple[str, ...], fast_failure: None) -> None:
    url = _unreachable()
    result = CliRunner().invoke(app, ["--redis-url", url, *args])
    line = one_line_error(result, f"cannot reach Redis at {url}", "LQ_REDIS_URL")
    assert line.count("cannot reach Redis") == 1


def test_the_password_is_masked_and_nothing_else(fast_failure: None) -> None:
    url = _unreachable(password="s3cret-pw")
    line = one_line_error(CliRunner().invoke(app, ["--redis-url", url, "resources", "list"]))
    assert "s3cret-pw" not in line and f"redis://:**@127.0.0.1:{url.rsplit(':', 1)[1]}" in line
    user_only = url.replace(":s3cret-pw@", "reader@")  # a user name is not a secret: shown as written
    line = one_line_error(CliRunner().invoke(app, ["--redis-url", user_only, "rollouts", "list"]))
    assert f"cannot reach Redis at {user_only}:" in line


def test_a_bad_setting_is_named_by_the_command_that_reads_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LQ_GC_KEEP", "none")
    one_line_error(CliRunner().invoke(app, ["resources", "list"]), "invalid Settings (from LQ_* variables", "gc_keep")


def test_a_user_error_inside_any_group_is_one_line(invoke: Invoke) -> None:
    one_line_error(invoke("resources", "get", "rs-nope"), "'rs-nope'")
    one_line_error(invoke("rollouts", "status", "ro-nope"), "'ro-nope'")
    one_line_error(invoke("experiments", "status", "ghost"), "'ghost'")


# --------------------------------------------------------------------------- the real entry points


def _run(*argv: str, code: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LQ_")}
    environ.update(COLUMNS="80", LQ_REDIS_RETRY_SECONDS="0", **(env or {}))
    command = [sys.executable, "-c", code, *argv] if code else list(argv)
    return subprocess.run(command, capture_output=True, text=True, env=environ, timeout=60, check=False)


HEAVY = ("celery", "kombu", "lightning_queue.client", "lightning_queue.worker", "lightning_queue.broker.publisher",
         "scipy", "numpy", "matplotlib", "prometheus_client")
LOADED = """
import sys
from lightning_queue.ops.cli import main
sys.argv[0] = "lightning-queue"
try:
    main()
finally:
    print("loaded:", *sorted(m for m in __HEAVY__ if m in sys.modules), file=sys.stderr)
"""


def _loaded(*args: str, heavy: tuple[str, ...] = HEAVY) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    done = _run(*args, code=LOADED.replace("__HEAVY__", repr(heavy)), env={"LQ_REDIS_URL": _unreachable()})
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("loaded:"), done.stderr
    return done, set(last.split()[1:])


def test_help_loads_no_heavy_module() -> None:
    done, loaded = _loaded("--help", heavy=(*HEAVY, "redis", "pydantic", "lightning_queue.core.settings"))
    assert done.returncode == 0 and "resources" in done.stdout
    assert loaded == set()


def test_resources_list_loads_neither_celery_nor_the_client() -> None:
    done, loaded = _loaded("resources", "list")  # fails on the unreachable Redis, having loaded what it needs
    assert done.returncode == 1 and "cannot reach Redis" in done.stderr
    assert loaded == set()


def test_the_installed_commands_start(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "lightning-queue"
    for argv in ([str(script), "--help"], [sys.executable, "-m", "lightning_queue", "rollouts", "--help"]):
        done = _run(*argv)
        assert done.returncode == 0, done.stderr
        assert max(len(line) for line in done.stdout.splitlines()) <= 80
    assert "Usage: lightning-queue rollouts" in " ".join(done.stdout.split())


def test_no_redis_from_the_installed_command_is_one_line(tmp_path: Path) -> None:
    url = _unreachable(password="s3cret-pw")
    done = _run(str(Path(sys.executable).parent / "lightning-queue"), "--redis-url", url, "rollouts", "list")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.count("cannot reach Redis") == 1, done.stderr
    assert "s3cret-pw" not in done.stderr and "Traceback" not in done.stderr
