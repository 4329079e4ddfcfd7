"""Diffs between two versions (of one snapshot or of two): per resource, per field, templates as unified diffs."""

from __future__ import annotations

import pytest

from lightning_queue import LLM, LightningClient, PromptTemplate, ResourcesNotFoundError, SnapshotDiff
from lightning_queue.core.diff import MASK, diff_resources, unified_diff


@pytest.fixture
def versions(fake_client: LightningClient) -> LightningClient:
    """rs-a at versions 1 and 2 (prompt rewritten, model and key changed, a resource added), and rs-b."""
    llm = LLM(endpoint="http://llm/v1", model="small", api_key="sk-old-secret")
    fake_client.add_resources({"llm": llm, "prompt": PromptTemplate(template="Solve:\n{question}\nBe brief.")},
                              "rs-a")
    fake_client.update_resources("rs-a", {
        "llm": LLM(endpoint="http://llm/v1", model="large", api_key="sk-new-secret"),
        "prompt": PromptTemplate(template="Solve step by step:\n{question}\nBe brief."),
        "critic": PromptTemplate(template="Grade {answer}"),
    })
    fake_client.add_resources({"prompt": PromptTemplate(template="Other {question}")}, "rs-b")
    return fake_client


def test_per_resource_per_field(versions: LightningClient) -> None:
    diff = versions.diff("rs-a@1", "rs-a@2")
    assert isinstance(diff, SnapshotDiff)
    assert (str(diff.left), str(diff.right)) == ("rs-a@1", "rs-a@2")
    assert {(c.path, c.kind) for c in diff.changes} == {
        ("llm.model", "changed"), ("llm.api_key", "changed"), ("prompt.template", "changed"),
        ("critic.template", "added"), ("critic.resource_type", "added"), ("critic.engine", "added"),
    }
    assert sorted(diff.by_resource()) == ["critic", "llm", "prompt"]
    model = next(c for c in diff.changes if c.path == "llm.model")
    assert (model.old, model.new) == ("small", "large")


def test_templates_get_a_unified_diff(versions: LightningClient) -> None:
    change = next(c for c in versions.diff("rs-a@1", "rs-a@2").changes if c.path == "prompt.template")
    assert change.unified == (
        "--- rs-a@1 prompt.template\n+++ rs-a@2 prompt.template\n@@ -1,3 +1,3 @@\n"
        "-Solve:\n+Solve step by step:\n {question}\n Be brief.\n"
    )
    assert any(s.op == "insert" and "step" in s.text for s in change.segments or [])  # the dashboard's word diff


def test_secrets_are_compared_but_never_shown(versions: LightningClient) -> None:
    diff = versions.diff("rs-a@1", "rs-a@2")
    key = next(c for c in diff.changes if c.path == "llm.api_key")
    assert key.secret and key.old == MASK and key.new == MASK and key.unified is None and key.segments is None
    dumped = diff.model_dump_json()
    assert "sk-old-secret" not in dumped and "sk-new-secret" not in dumped


def test_refs_default_to_the_previous_version_and_follow_pointers(versions: LightningClient) -> None:
    assert versions.diff("rs-a") == versions.diff("rs-a@1", "rs-a@2")
    assert versions.diff("rs-a@2") == versions.diff("rs-a@1", "rs-a")
    versions.set_pointer("prod", "rs-a")
    assert versions.diff("prod@1", "prod") == versions.diff("rs-a@1", "rs-a@2")
    across = versions.diff("rs-a@1", "rs-b")  # two different snapshots
    assert (str(across.left), str(across.right)) == ("rs-a@1", "rs-b@1")
    assert {c.path for c in across.changes} >= {"llm.model", "prompt.template"}
    assert versions.diff("rs-a@2", "rs-a@2").changes == []


def test_bad_refs(versions: LightningClient) -> None:
    with pytest.raises(ResourcesNotFoundError, match="first version"):
        versions.diff("rs-b")
    with pytest.raises(ResourcesNotFoundError, match="version 9 is not stored"):
        versions.diff("rs-a@9", "rs-a")
    with pytest.raises(ResourcesNotFoundError):
        versions.diff("rs-a@zero")


def test_unified_diff_of_texts_without_final_newlines() -> None:
    assert unified_diff("a", "b", "x", "y") == "--- x\n+++ y\n@@ -1 +1 @@\n-a\n+b\n"
    assert diff_resources({}, {}) == []
