"""The command line, on fakeredis: each command's output and exit code, and one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
from click.testing import Result
from typer.testing import CliRunner

from lightning_queue import LightningClient, PromptTemplate
from lightning_queue.ops import cli

Invoke = Callable[..., Result]


@pytest.fixture
def client(fake_client: LightningClient, monkeypatch: pytest.MonkeyPatch) -> LightningClient:
    """The client every command uses; task messages go nowhere (no broker here)."""
    monkeypatch.setattr(cli, "_client", lambda: fake_client)
    monkeypatch.setattr(fake_client, "publish", lambda rollouts, registry_seq=0: None)
    return fake_client


@pytest.fixture
def invoke(client: LightningClient) -> Invoke:
    runner = CliRunner()

    def invoke(*args: str) -> Result:
        return runner.invoke(cli.app, list(args))

    return invoke


@pytest.fixture
def two(client: LightningClient) -> LightningClient:
    """rs-a and rs-b (latest); prod names rs-a."""
    client.add_resources({"prompt": PromptTemplate(template="a {x}")}, "rs-a")
    client.add_resources({"prompt": PromptTemplate(template="b {x}")}, "rs-b")
    client.set_pointer("prod", "rs-a")
    return client


def one_line_error(result: Result, *fragments: str) -> None:
    """Exit 1, nothing on stdout, one line on stderr holding every fragment, no traceback."""
    assert result.exit_code == 1, (result.stdout, result.stderr, result.exception)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


PROMPT_JSON = json.dumps({"prompt": {"resource_type": "prompt_template", "template": "c {x}"}})


# --------------------------------------------------------------------------- pointers


def test_pointer_sets_and_prints_old_and_new(invoke: Invoke, two: LightningClient) -> None:
    result = invoke("resources", "pointer", "canary", "rs-b")
    assert result.exit_code == 0 and result.stdout == "canary: (unset) -> rs-b\n"
    result = invoke("resources", "pointer", "prod", "canary")  # another pointer's target is copied
    assert result.exit_code == 0 and result.stdout == "prod: rs-a -> rs-b\n"
    assert two.pointers() == {"latest": "rs-b", "prod": "rs-b", "canary": "rs-b"}


def test_pointer_to_an_unknown_id_is_a_one_line_error(invoke: Invoke, two: LightningClient) -> None:
    one_line_error(invoke("resources", "pointer", "prod", "rs-nope"), "'rs-nope'", "was not moved")
    assert two.get_pointer("prod") == "rs-a"
    one_line_error(invoke("resources", "pointer", "bad:name", "rs-a"), "invalid pointer name")


def test_pointers_table(invoke: Invoke, two: LightningClient) -> None:
    two.update_resources("rs-a", {"prompt": PromptTemplate(template="a2 {x}")})  # rs-a v2, latest too
    result = invoke("resources", "pointers")
    assert result.exit_code == 0
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("│")]
    assert [row[1:6:2] for row in rows] == [["latest", "rs-a", "2"], ["prod", "rs-a", "2"]]


def test_history_defaults_to_latest(invoke: Invoke, two: LightningClient) -> None:
    result = invoke("resources", "history")
    assert result.exit_code == 0
    assert all(header in result.stdout for header in ("from", "to", "when", "by"))
    rows = [line.split("│")[1:-1] for line in result.stdout.splitlines() if line.startswith("│")]
    assert [(f.strip(), t.strip(), by.strip()) for f, t, _, by in rows] == [
        ("rs-a", "rs-b", "add_resources"), ("(unset)", "rs-a", "add_resources")
    ]
    result = invoke("resources", "history", "prod", "--limit", "1")
    assert result.exit_code == 0 and "(unset)" in result.stdout and "set_pointer" in result.stdout


def test_history_of_an_unknown_pointer_is_a_one_line_error(invoke: Invoke, two: LightningClient) -> None:
    one_line_error(invoke("resources", "history", "nope"), "'nope' has never been moved")


def test_rollback(invoke: Invoke, two: LightningClient) -> None:
    two.set_pointer("prod", "rs-b")
    result = invoke("resources", "rollback", "prod")
    assert result.exit_code == 0 and result.stdout == "prod: rs-b -> rs-a\n"
    assert two.get_pointer("prod") == "rs-a"
    result = invoke("resources", "rollback")  # latest: undo the last add
    assert result.exit_code == 0 and result.stdout == "latest: rs-b -> rs-a\n"


def test_rollback_with_nothing_to_roll_back_to(invoke: Invoke, client: LightningClient) -> None:
    one_line_error(invoke("resources", "rollback", "prod"), "no earlier target")


# --------------------------------------------------------------------------- delete and gc


def test_delete_refused_while_in_use_then_forced(invoke: Invoke, two: LightningClient) -> None:
    queued = two.enqueue_rollout("q", resources_id="rs-a")

    one_line_error(invoke("resources", "delete", "rs-a"), "'rs-a' is in use", "pointers prod", "--force")
    assert "rs-a" in two.registry.list_ids()

    result = invoke("resources", "delete", "rs-a", "--force")
    assert result.exit_code == 0
    assert result.stdout.splitlines() == [
        "deleted rs-a", "  prod: unset", f"  1 queued/running rollouts failed: {queued.rollout_id}"
    ]
    assert two.get_rollout(queued.rollout_id).status == "failed"


def test_delete_of_latest_says_where_latest_went(invoke: Invoke, two: LightningClient) -> None:
    result = invoke("resources", "delete", "rs-b", "--force")
    assert result.exit_code == 0 and result.stdout.splitlines() == ["deleted rs-b", "  latest: rs-b -> rs-a"]


def test_delete_unknown_id(invoke: Invoke, two: LightningClient) -> None:
    one_line_error(invoke("resources", "delete", "rs-nope"), "'rs-nope'")


def test_gc_dry_run_then_for_real(invoke: Invoke, client: LightningClient) -> None:
    for i in range(4):
        client.add_resources({"prompt": PromptTemplate(template=f"{i} {{x}}")}, f"rs-{i}")
    client.set_pointer("prod", "rs-0")

    result = invoke("resources", "gc", "--keep", "1", "--dry-run")
    assert result.exit_code == 0
    assert "would delete 2 snapshot(s)" in result.stdout
    assert "pointer prod" in result.stdout and "newest" in result.stdout
    assert len(client.registry.list_ids()) == 4

    result = invoke("resources", "gc", "--keep", "1")
    assert result.exit_code == 0 and "deleted 2 snapshot(s)" in result.stdout
    assert client.registry.list_ids() == ["rs-3", "rs-0"]


def test_gc_keep_defaults_to_settings(invoke: Invoke, client: LightningClient) -> None:
    client.add_resources({"prompt": PromptTemplate(template="{x}")}, "rs-0")
    result = invoke("resources", "gc")
    assert result.exit_code == 0 and f"keep {client.settings.gc_keep}" in result.stdout


# --------------------------------------------------------------------------- get and update


def test_get_a_version(invoke: Invoke, two: LightningClient) -> None:
    two.update_resources("rs-a", {"prompt": PromptTemplate(template="a2 {x}")})
    current = invoke("resources", "get", "rs-a")
    assert current.exit_code == 0 and "rs-a version 2" in current.stdout and "a2 {x}" in current.stdout
    first = invoke("resources", "get", "rs-a", "--version", "1")
    assert first.exit_code == 0 and "rs-a version 1" in first.stdout and '"a {x}"' in first.stdout
    via_pointer = invoke("resources", "get", "prod")
    assert via_pointer.exit_code == 0 and "rs-a version 2" in via_pointer.stdout


def test_get_unknown_id_or_version(invoke: Invoke, two: LightningClient) -> None:
    one_line_error(invoke("resources", "get", "rs-nope"), "no resource snapshot", "'rs-nope'")
    one_line_error(invoke("resources", "get", "rs-a", "--version", "7"), "version 7 is not stored")


def test_update_with_expected_version(invoke: Invoke, two: LightningClient) -> None:
    result = invoke("resources", "update", "rs-a", PROMPT_JSON, "--expected-version", "1")
    assert result.exit_code == 0 and "rs-a version 2" in result.stdout
    one_line_error(invoke("resources", "update", "rs-a", PROMPT_JSON, "--expected-version", "1"),
                   "at version 2, not the expected 1")
    assert two.get_resources_by_id("rs-a").version == 2


def test_malformed_json_is_a_one_line_error(invoke: Invoke, two: LightningClient, tmp_path: Path) -> None:
    one_line_error(invoke("resources", "update", "rs-a", "{not json"), "not valid JSON", "single quotes")
    one_line_error(invoke("resources", "add", '{"prompt": 1'), "not valid JSON")
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text('{"q": 1}\n{oops\n')
    one_line_error(invoke("rollouts", "submit", "--file", str(inputs)), "line 2", "not valid JSON")
    assert two.query_rollouts() == []  # nothing enqueued
    assert two.get_resources_by_id("rs-a").version == 1


def test_invalid_resources_are_a_one_line_error(invoke: Invoke, two: LightningClient) -> None:
    one_line_error(invoke("resources", "add", '{"p": {"resource_type": "nope"}}'), "unknown resource_type 'nope'")


# --------------------------------------------------------------------------- rollouts submit


def test_submit_pins_by_default_and_follows_with_follow(invoke: Invoke, two: LightningClient) -> None:
    pinned = invoke("rollouts", "submit", "q1", "-r", "prod")
    following = invoke("rollouts", "submit", '{"q": 2}', "--resources-id", "prod", "--follow")
    latest = invoke("rollouts", "submit", "q3")
    assert pinned.exit_code == following.exit_code == latest.exit_code == 0

    r = two.get_rollout(pinned.stdout.strip())
    assert (r.input, r.resolve, r.resources_id, r.resources_version) == ("q1", "pinned", "rs-a", 1)
    r = two.get_rollout(following.stdout.strip())
    assert (r.input, r.resolve, r.resources_id, r.resources_version) == ({"q": 2}, "following", "prod", None)
    r = two.get_rollout(latest.stdout.strip())
    assert (r.resolve, r.resources_id) == ("following", None)


def test_submit_with_an_unknown_resources_id_enqueues_nothing(invoke: Invoke, two: LightningClient) -> None:
    one_line_error(invoke("rollouts", "submit", "q", "-r", "rs-nope"), "'rs-nope'", "nothing was enqueued")
    assert two.query_rollouts() == []


def test_unknown_rollout_is_a_one_line_error(invoke: Invoke, client: LightningClient) -> None:
    one_line_error(invoke("rollouts", "status", "ro-nope"), "'ro-nope'", "expired")


def test_workers_shows_each_process_cache_and_the_fleet_hit_ratio(client: LightningClient, invoke: Invoke) -> None:
    assert "no worker process has reported" in invoke("workers").output
    stats = {"hits": 9, "misses": 1, "hit_ratio": 0.9, "entries": 2, "bytes": 2_000_000, "evictions": 0,
             "mean_load_ms": 2.5}
    client.redis.set(client.keys.cache_stats("w1@h:11"), json.dumps(stats))
    client.redis.set(client.keys.cache_stats("w2@h:12"), json.dumps({**stats, "hits": 1, "misses": 9,
                                                                      "hit_ratio": 0.1}))
    result = invoke("workers")
    assert result.exit_code == 0, result.output
    assert "w1@h:11" in result.output and "90.0%" in result.output and "2.00" in result.output
    assert "fleet: 2 process(es), hit ratio 50.0%" in result.output


def test_workers_reports_a_stalled_worker_and_exits_1(client: LightningClient, invoke: Invoke) -> None:
    import time

    now = time.time()
    base = {"pid": 1, "concurrency": 1, "queues": ["q"], "queued": {"q": 4}, "updated": now}
    client.redis.set(client.keys.worker_health("stuck@h"), json.dumps(
        {**base, "hostname": "stuck@h", "active": 0, "consuming": [], "last_received": None,
         "backlog_since": now - 3600}))
    client.redis.set(client.keys.worker_health("busy@h"), json.dumps(
        {**base, "hostname": "busy@h", "active": 1, "consuming": ["q"], "last_received": now - 5,
         "backlog_since": now - 3600}))
    result = invoke("workers")
    assert result.exit_code == 1, result.output
    assert "STALLED" in result.output and "busy@h" in result.output
    assert "stalled: stuck@h: messages waited" in result.output and "no longer consumes q" in result.output
    assert "stalled: busy@h" not in result.output
    client.redis.delete(client.keys.worker_health("stuck@h"))
    assert invoke("workers").exit_code == 0
