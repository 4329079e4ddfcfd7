"""``lightning-queue server`` refuses to listen beyond loopback without credentials, in one line."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from lightning_queue.ops import cli


def test_the_server_refuses_to_listen_beyond_loopback_without_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LQ_SERVER_PASSWORD", "LQ_SERVER_TOKEN", "LQ_SERVER_HOST"):
        monkeypatch.delenv(name, raising=False)
    # An unreachable Redis: the refusal comes first, before any connection is tried.
    result = CliRunner().invoke(cli.app, ["--redis-url", "redis://127.0.0.1:1/0", "server", "--host", "0.0.0.0"])
    assert result.exit_code == 1
    assert "beyond loopback" in result.output and "LQ_SERVER_PASSWORD" in result.output
    assert "Traceback" not in result.output
