"""``lightning-queue rollouts trace|triplets``, ``resources usage``, ``experiments usage``: a traced
attempt (run by the runner on fakeredis) shown as a user sees it, at 80 columns."""

from __future__ import annotations

import json

from lightning_queue import LLM, LightningClient
from tests.unit.cli.expect import Invoke, one_line_error
from tests.unit.test_runner import FakeTask, run
from tests.unit.test_tracing import traced_agent


def test_trace_shows_the_tree_with_tokens_and_the_usage_tables(invoke: Invoke, client: LightningClient,
                                                              llm: LLM) -> None:
    client.add_resources({"llm": llm}, "rs-t")
    queued = client.enqueue_rollout("q", resources_id="rs-t", metadata={"experiment": "exp", "variant": "b"})
    run(FakeTask(client, traced_agent), queued.rollout_id)

    shown = invoke("rollouts", "trace", queued.rollout_id)
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()
    assert lines[0] == f"rollout {queued.rollout_id}"
    root = next(line for line in lines if "lq.attempt" in line)
    assert "rs-t v1" in root and "succeeded" in root
    assert "experiment exp  variant b  reward 1.0" in shown.stdout  # the root's label, wrapped at 80 columns
    plan = next(line for line in lines if " plan " in f" {line} ")
    call = next(line for line in lines if "chat tiny" in line)
    assert call.index("chat") > plan.index("plan") > root.index("lq.attempt")  # nested, indented deeper
    assert "tokens 10 in / 4 out" in call
    assert any("accuracy = 1.0 (primary)" in line for line in lines)
    usage_row = next(line for line in lines if line.split()[:2] == ["1", "succeeded"])
    assert usage_row.split()[2:] == ["2", "20", "8", "0.000000", "2", "0"]  # no price table: 2 unpriced calls

    triplets = [json.loads(line) for line in invoke("rollouts", "triplets", queued.rollout_id).stdout.splitlines()]
    assert [t["prompt"][0]["content"] for t in triplets] == ["turn 0", "turn 1"]

    by_version = invoke("resources", "usage", "rs-t").stdout
    assert ["1", "1", "2", "20", "8"] == next(line.split() for line in by_version.splitlines()
                                               if line.split()[:1] == ["1"])[:5]
    by_variant = invoke("experiments", "usage", "exp").stdout
    assert next(line.split() for line in by_variant.splitlines() if line.split()[:1] == ["b"])[:5] == [
        "b", "1", "2", "20", "8"]


def test_trace_of_an_unknown_rollout_or_attempt_is_a_one_line_error(invoke: Invoke, client: LightningClient) -> None:
    one_line_error(invoke("rollouts", "trace", "ro-nope"), "'ro-nope'", "expired")
    queued = client.enqueue_rollout("q")
    one_line_error(invoke("rollouts", "trace", queued.rollout_id, "--attempt", "at-x"), "no attempt 'at-x'")
