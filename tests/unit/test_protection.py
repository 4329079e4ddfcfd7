"""Protected pointers: refused inside the moving scripts unless forced with a reason; who and why recorded."""

from __future__ import annotations

import json
from collections.abc import Callable

import fakeredis
import pytest

from lightning_queue import (
    Experiment,
    Experiments,
    LightningClient,
    PointerError,
    PromptTemplate,
    ProtectedPointerError,
    Variant,
)
from lightning_queue.core.models import default_actor
from lightning_queue.storage.registry import SnapshotRegistry


def state(fake_redis: fakeredis.FakeRedis) -> dict[bytes, bytes | None]:
    """Every key and its value: to check that a refused operation wrote nothing."""
    return {key: fake_redis.dump(key) for key in fake_redis.keys("*")}


@pytest.fixture
def prod(fake_client: LightningClient) -> LightningClient:
    """rs-a, rs-b (latest); prod -> rs-b, previously rs-a; prod protected."""
    for rid in ("rs-a", "rs-b"):
        fake_client.add_resources({"prompt": PromptTemplate(template=f"{rid} {{x}}")}, rid)
    fake_client.set_pointer("prod", "rs-a")
    fake_client.set_pointer("prod", "rs-b")
    fake_client.protect_pointer("prod", "serves customers", actor="alice")
    return fake_client


def test_protect_records_why_and_who(prod: LightningClient) -> None:
    protection = prod.protections()["prod"]
    assert (protection.pointer, protection.reason, protection.by) == ("prod", "serves customers", "alice")
    assert protection.time > 1e9
    assert prod.unprotect_pointer("prod") == protection
    assert prod.protections() == {} and prod.unprotect_pointer("prod") is None


@pytest.mark.parametrize("move", [
    pytest.param(lambda c: c.set_pointer("prod", "rs-a"), id="set_pointer"),
    pytest.param(lambda c: c.set_pointer("prod", "rs-a", expected="rs-b"), id="compare-and-set"),
    pytest.param(lambda c: c.rollback("prod"), id="rollback"),
    pytest.param(lambda c: c.registry.set_pointer("prod", "rs-a", force=False, reason="a reason alone"),
                 id="reason-without-force"),
])
def test_a_protected_pointer_refuses_every_move_and_writes_nothing(
    prod: LightningClient, fake_redis: fakeredis.FakeRedis, move: Callable[[LightningClient], object]
) -> None:
    before = state(fake_redis)
    with pytest.raises(ProtectedPointerError, match=r"'prod' is protected \(serves customers, by alice\).*--force"):
        move(prod)
    assert state(fake_redis) == before


def test_the_check_is_in_the_script_not_a_read_before_it(
    prod: LightningClient, fake_redis: fakeredis.FakeRedis
) -> None:
    """The Lua script refuses the move whatever the caller read before: call it as a caller that
    saw the pointer unprotected would (it has no protection argument to skip)."""
    registry, k = prod.registry, prod.keys
    reply = registry._set_pointer(
        keys=[k.pointers, k.seq, k.snapshot_events, k.pointer_protection],
        args=["prod", "rs-a", "1.0", "mallory", 100, k.pointer_history_prefix, k.snapshot_prefix, "", "0",
              "set_pointer", ""],
    )
    assert reply[0] == b"protected" and json.loads(reply[1])["reason"] == "serves customers"
    assert prod.get_pointer("prod") == "rs-b"


def test_protection_taken_between_a_read_and_a_move_wins(fake_client: LightningClient) -> None:
    """A concurrent protect lands after the mover read the pointer: its move is refused."""
    for rid in ("rs-a", "rs-b"):
        fake_client.add_resources({"prompt": PromptTemplate(template=rid)}, rid)
    fake_client.set_pointer("prod", "rs-a")
    seen = fake_client.get_pointer("prod")  # the mover reads...
    other = LightningClient(fake_client.settings, redis_client=fake_client.redis)
    other.protect_pointer("prod", "freeze for the release")  # ...someone protects...
    with pytest.raises(ProtectedPointerError):  # ...and the compare-and-set on what it read is refused
        fake_client.set_pointer("prod", "rs-b", expected=seen)
    assert fake_client.get_pointer("prod") == "rs-a"


def test_force_with_a_reason_moves_it_and_records_who_and_why(prod: LightningClient) -> None:
    with pytest.raises(PointerError, match="only with a reason"):
        prod.set_pointer("prod", "rs-a", force=True)
    with pytest.raises(PointerError, match="only with a reason"):
        prod.rollback("prod", force=True, reason="   ")

    assert prod.set_pointer("prod", "rs-a", force=True, reason="hotfix: rs-b leaks PII", actor="bob") == "rs-a"
    move = prod.pointer_history("prod", 1)[0]
    assert (move.from_id, move.to_id, move.by, move.op, move.reason) == (
        "rs-b", "rs-a", "bob", "set_pointer", "hotfix: rs-b leaks PII")

    back = prod.rollback("prod", force=True, reason="PII fixed upstream")
    assert (back.to_id, back.by, back.op, back.reason) == ("rs-b", default_actor(), "rollback", "PII fixed upstream")
    assert prod.pointer_history("prod", 1)[0] == back
    assert "prod" in prod.protections()  # a forced move keeps the protection


def test_other_pointers_and_latest_move_freely(prod: LightningClient) -> None:
    prod.set_pointer("canary", "rs-a")
    prod.add_resources({"prompt": PromptTemplate(template="c")}, "rs-c")
    assert prod.pointers() == {"latest": "rs-c", "prod": "rs-b", "canary": "rs-a"}
    with pytest.raises(PointerError, match="'latest' cannot be protected"):
        prod.protect_pointer("latest", "no")
    with pytest.raises(PointerError, match="no pointer 'nope'"):
        prod.protect_pointer("nope", "typo")
    with pytest.raises(PointerError, match="reason"):
        prod.protect_pointer("canary", "")


def test_a_snapshot_a_protected_pointer_names_cannot_be_deleted_even_forced(
    prod: LightningClient, fake_redis: fakeredis.FakeRedis
) -> None:
    before = state(fake_redis)
    with pytest.raises(ProtectedPointerError, match="unprotect"):
        prod.delete_resources("rs-b", force=True)
    assert state(fake_redis) == before
    prod.delete_resources("rs-a")  # named by no pointer now
    prod.unprotect_pointer("prod")
    report = prod.delete_resources("rs-b", force=True, actor="carol")
    assert sorted(report.moved_pointers) == ["latest", "prod"]
    unset = prod.pointer_history("prod", 1)[0]
    assert (unset.to_id, unset.by, unset.op, unset.reason) == (None, "carol", "delete", "snapshot rs-b deleted")


def test_promotion_of_a_protected_pointer_needs_force_and_records_it(
    prod: LightningClient, fake_redis: fakeredis.FakeRedis
) -> None:
    experiments = Experiments(prod)
    experiments.create(Experiment(name="ab", variants=[Variant(name="control", resources_id="rs-b"),
                                                       Variant(name="treatment", resources_id="rs-a")]))
    experiments.start("ab")
    before = state(fake_redis)
    with pytest.raises(ProtectedPointerError):
        experiments.promote("ab", "treatment", pointer="prod")
    assert state(fake_redis) == before  # neither moved nor stopped: one atomic step
    assert experiments.get("ab").status == "running"
    with pytest.raises(ProtectedPointerError):  # a canary's rollback moves pointers the same way
        experiments.rollback("ab", "prod", "guardrail: failure rate")

    done = experiments.promote("ab", "treatment", pointer="prod", force=True, reason="approved in review #12",
                               by="dana")
    assert (done.from_id, done.to_id) == ("rs-b", "rs-a") and experiments.get("ab").status == "stopped"
    move = prod.pointer_history("prod", 1)[0]
    assert (move.by, move.op) == ("dana", "promote ab")
    assert move.reason == "promoted 'treatment' to 'prod'; forced: approved in review #12"


def test_history_entries_of_earlier_releases_still_read_and_roll_back(
    registry: SnapshotRegistry, fake_redis: fakeredis.FakeRedis
) -> None:
    for rid in ("rs-a", "rs-b"):
        registry.add_resources({"prompt": PromptTemplate(template=rid)}, rid)
    key = registry.keys.pointer_history("prod")
    # as 0.1 wrote them: only from, to, time and by (which held the operation)
    fake_redis.hset(registry.keys.pointers, "prod", "rs-b")
    fake_redis.lpush(key, json.dumps({"from": False, "to": "rs-a", "time": 1.0, "by": "set_pointer"}))
    fake_redis.lpush(key, json.dumps({"from": "rs-a", "to": "rs-b", "time": 2.0, "by": "set_pointer"}))

    old = registry.pointer_history("prod")
    assert [(m.from_id, m.to_id, m.by, m.op, m.reason) for m in old] == [
        ("rs-a", "rs-b", "set_pointer", "", ""), (None, "rs-a", "set_pointer", "", "")]
    move = registry.rollback("prod", by="erin", reason="back to a")
    assert (move.to_id, move.by, move.op, move.reason) == ("rs-a", "erin", "rollback", "back to a")
    assert json.loads(fake_redis.lindex(key, 0)) == {  # type: ignore[arg-type]
        "from": "rs-b", "to": "rs-a", "time": pytest.approx(move.time), "by": "erin", "op": "rollback",
        "reason": "back to a"}
