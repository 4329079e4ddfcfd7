"""The command line on fakeredis, invoked as a user invokes it (typer's CliRunner, 80 columns)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from typer.testing import CliRunner, Result

from lightning_queue import ErrorInfo, LightningClient, PromptTemplate, Rollout, RolloutResult
from lightning_queue.ops.cli import CliContext, app
from tests.unit.cli.expect import Finish, Invoke


@pytest.fixture
def client(fake_client: LightningClient, monkeypatch: pytest.MonkeyPatch) -> LightningClient:
    """The client every command uses; task messages go nowhere (no broker here)."""
    monkeypatch.setattr(fake_client, "publish", lambda rollouts, registry_seq=0: None)
    return fake_client


@pytest.fixture
def invoke(client: LightningClient) -> Invoke:
    """``invoke("rollouts", "list")`` runs ``lightning-queue rollouts list`` on a terminal of
    ``columns`` (80 unless told) and returns what it printed and its exit code."""
    runner = CliRunner()

    def invoke(*args: str, columns: int = 80) -> Result:
        return runner.invoke(app, list(args), obj=CliContext(client=client), env={"COLUMNS": str(columns)})

    return invoke


@pytest.fixture
def two(client: LightningClient) -> LightningClient:
    """rs-a and rs-b (latest); prod names rs-a."""
    client.add_resources({"prompt": PromptTemplate(template="a {x}")}, "rs-a")
    client.add_resources({"prompt": PromptTemplate(template="b {x}")}, "rs-b")
    client.set_pointer("prod", "rs-a")
    return client


@pytest.fixture
def finish(client: LightningClient) -> Finish:
    """``finish(rollout_id, "failed")``: a worker runs the rollout to that end, as a real one would."""

    def finish(rollout_id: str, status: str = "succeeded", reward: float = 1.0) -> None:
        store = client.store
        rollout = store.get_rollout(rollout_id)
        claim = store.claim(rollout, "sim@host")
        assert store.start_attempt(rollout_id, claim.sequence_id, rollout.resources_id or "", 1)
        if status == "succeeded":
            store.finish_attempt(rollout_id, claim.sequence_id, "succeeded", "succeeded",
                                 result=RolloutResult(reward=reward))
        else:
            store.finish_attempt(rollout_id, claim.sequence_id, "failed", "failed",
                                 error=ErrorInfo(type="ToolError", message="the tool broke"))

    return finish


@pytest.fixture
def instant_worker(client: LightningClient, finish: Finish, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rollouts run as soon as they are published: an input holding ``"fail"`` fails, any other
    succeeds with reward 1."""

    def publish(rollouts: Sequence[Rollout], registry_seq: int = 0) -> None:
        for rollout in rollouts:
            failing = isinstance(rollout.input, dict) and "fail" in rollout.input
            finish(rollout.rollout_id, "failed" if failing else "succeeded")

    monkeypatch.setattr(client, "publish", publish)
