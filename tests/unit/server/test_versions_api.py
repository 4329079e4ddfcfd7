"""The server's snapshot and pointer API shows version metadata, who moved a pointer and why, and
refuses to move a protected pointer unless forced with a reason."""

from __future__ import annotations

import base64

from fastapi.testclient import TestClient

from lightning_queue import LightningClient, PromptTemplate
from tests.unit.server.conftest import PASSWORD

BASIC = {"Authorization": "Basic " + base64.b64encode(f"admin:{PASSWORD}".encode()).decode()}


def test_versions_and_snapshots_carry_their_metadata(seeded: LightningClient, loopback: TestClient) -> None:
    seeded.update_resources("rs-b", {"prompt": PromptTemplate(template="b2 {question}")}, message="shorter",
                            author="alice", tags=["exp-7"])
    versions = loopback.get("/api/v1/snapshots/rs-b/versions").json()["versions"]
    v = versions[0]
    assert (v["version"], v["message"], v["author"], v["tags"], v["parent_id"], v["parent_version"]) == (
        2, "shorter", "alice", ["exp-7"], "rs-b", 1)
    shown = loopback.get("/api/v1/snapshots/rs-b").json()
    assert (shown["message"], shown["author"], shown["parent_version"]) == ("shorter", "alice", 1)
    diff = loopback.get("/api/v1/snapshots/rs-b/diff").json()
    change = next(c for c in diff["changes"] if c["path"] == "prompt.template")
    assert change["unified"].startswith("--- rs-b@1 prompt.template\n+++ rs-b@2 prompt.template\n")


def test_a_protected_pointer_needs_force_and_a_reason_through_the_api(
    seeded: LightningClient, loopback: TestClient
) -> None:
    seeded.protect_pointer("prod", "serves users")
    refused = loopback.put("/api/v1/pointers/prod", json={"target": "rs-b"}, headers=BASIC)
    assert refused.status_code == 409 and refused.json()["error"] == "ProtectedPointerError"
    no_reason = loopback.put("/api/v1/pointers/prod", json={"target": "rs-b", "force": True}, headers=BASIC)
    assert no_reason.status_code == 409 and "reason" in no_reason.json()["detail"]
    moved = loopback.put("/api/v1/pointers/prod", json={"target": "rs-b", "force": True, "reason": "hotfix"},
                         headers=BASIC)
    assert moved.status_code == 200
    last = loopback.get("/api/v1/pointers/prod/history").json()[0]
    assert (last["by"], last["op"], last["reason"]) == ("server:admin", "set_pointer", "hotfix")
