"""The example algorithms in ``algorithms/`` run by the Trainer (on the inline fleet)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from algorithms.prompt_search import PromptSearch
from lightning_queue import LightningClient, Trainer
from lightning_queue.ops.demo import agent as demo_agent
from lightning_queue.ops.demo.agent import agent
from lightning_queue.ops.demo.datasets import arithmetic
from tests.unit.training.conftest import InlineFleet


def test_the_trainer_runs_the_prompt_search(
    fake_client: LightningClient, fleet: InlineFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(demo_agent, "time", SimpleNamespace(sleep=lambda seconds: None))  # its simulated latency
    fleet.agent = agent

    report = Trainer(PromptSearch(), client=fake_client, run_name="search").fit(
        agent, arithmetic("train"), arithmetic("val"))

    assert report.promoted.name == "step-by-step-terse"
    assert fake_client.get_pointer("latest") == report.promoted.resources_id
    assert report.validation_summary.mean_reward == 1.0
    assert len(fleet.ran) == 4 * len(arithmetic("train")) + len(arithmetic("val"))
