"""``lightning-queue resources``: snapshots and pointers, each command's output and exit code."""

from __future__ import annotations

import json
from pathlib import Path

from lightning_queue import LightningClient, PromptTemplate
from lightning_queue.core.models import default_actor
from tests.unit.cli.expect import Invoke, one_line_error, rows, words

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
    assert rows(result.stdout) == [["latest", "rs-a", "2", ""], ["prod", "rs-a", "2", ""]]


def test_history_defaults_to_latest(invoke: Invoke, two: LightningClient) -> None:
    result = invoke("resources", "history")
    assert result.exit_code == 0
    assert all(header in result.stdout for header in ("from", "to", "when", "by", "op", "reason"))
    assert [(f, t, by, op) for f, t, _, by, op, _ in rows(result.stdout)] == [
        ("rs-a", "rs-b", default_actor(), "add_resources"), ("(unset)", "rs-a", default_actor(), "add_resources")
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




# --------------------------------------------------------------------------- add, list, latest


def test_add_from_an_argument_or_a_file(invoke: Invoke, client: LightningClient, tmp_path: Path) -> None:
    result = invoke("resources", "add", PROMPT_JSON, "--id", "rs-mine")
    assert result.exit_code == 0 and result.stdout.startswith("rs-mine version 1\n")
    assert json.loads(result.stdout.split("\n", 1)[1])["resources"]["prompt"]["template"] == "c {x}"
    file = tmp_path / "resources.json"
    file.write_text(PROMPT_JSON)
    result = invoke("resources", "add", "--file", str(file))
    assert result.exit_code == 0
    generated = result.stdout.split()[0]
    assert client.get_latest_resources().resources_id == generated  # type: ignore[union-attr]
    one_line_error(invoke("resources", "add", PROMPT_JSON, "--file", str(file)), "either", "not both")
    one_line_error(invoke("resources", "add"), "either")


def test_latest(invoke: Invoke, client: LightningClient) -> None:
    one_line_error(invoke("resources", "latest"), "no snapshot has been stored yet")
    client.add_resources({"prompt": PromptTemplate(template="x {x}")}, "rs-x")
    result = invoke("resources", "latest")
    assert result.exit_code == 0 and result.stdout.startswith("rs-x version 1\n")


def test_list_shows_versions_and_pointers(invoke: Invoke, two: LightningClient) -> None:
    two.update_resources("rs-a", {"prompt": PromptTemplate(template="a2 {x}")})  # latest and prod name rs-a
    result = invoke("resources", "list", columns=120)
    assert result.exit_code == 0
    assert [(r[0], r[1], r[3], r[4]) for r in rows(result.stdout)] == [
        ("rs-a", "2", "prompt: prompt_template", "latest, prod"), ("rs-b", "1", "prompt: prompt_template", "")]
    assert [r[0] for r in rows(invoke("resources", "list", "--limit", "1", "--offset", "1").stdout)] == ["rs-b"]


def test_list_at_80_columns_prints_ids_that_can_be_fed_back(invoke: Invoke, client: LightningClient) -> None:
    resources = {"prompt": PromptTemplate(template="{x}")}
    ids = [client.add_resources(resources).resources_id for _ in range(3)]
    ids.append(client.add_resources(resources, "prompt-step-by-step-terse-8dfcd8").resources_id)
    result = invoke("resources", "list")
    assert result.exit_code == 0 and "…" not in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    assert [r[0] for r in rows(result.stdout)] == ids[::-1]  # a table: each id whole in its row
    for resources_id in words(result.stdout) & set(ids):  # copied from the output into the next command
        shown = invoke("resources", "get", resources_id)
        assert shown.exit_code == 0 and shown.stdout.startswith(f"{resources_id} version 1")


def test_ids_too_long_for_a_table_row_are_listed_as_records(invoke: Invoke, client: LightningClient) -> None:
    long_id = "an-experiment-name-that-someone-chose-to-describe-it-fully-v2"
    client.add_resources({"prompt": PromptTemplate(template="{x}")}, long_id)
    result = invoke("resources", "list")
    assert result.exit_code == 0 and "…" not in result.stdout and "─" not in result.stdout
    lines = result.stdout.split("\n")
    assert lines[0].split() == ["resources_id", long_id] and lines[4].split()[:2] == ["pointers", "latest"]
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    assert invoke("resources", "get", lines[0].split()[1]).exit_code == 0


# --------------------------------------------------------------------------- metadata, versions, diff


def test_add_and_update_with_metadata_then_versions(invoke: Invoke, client: LightningClient) -> None:
    result = invoke("resources", "add", PROMPT_JSON, "--id", "rs-m", "-m", "first cut", "--author", "alice",
                    "--tag", "baseline", "-t", "exp:1")
    assert result.exit_code == 0 and result.stdout.startswith("rs-m version 1\n")
    shown = json.loads(result.stdout.split("\n", 1)[1])
    assert (shown["message"], shown["author"], shown["tags"]) == ("first cut", "alice", ["baseline", "exp:1"])
    result = invoke("resources", "update", "rs-m", PROMPT_JSON, "-m", "second cut")
    assert result.exit_code == 0
    shown = json.loads(result.stdout.split("\n", 1)[1])
    assert (shown["author"], shown["parent_id"], shown["parent_version"]) == (default_actor(), "rs-m", 1)

    result = invoke("resources", "versions", "rs-m", columns=160)
    assert result.exit_code == 0
    assert [(r[0], r[2], r[3], r[4], r[5]) for r in rows(result.stdout)] == [
        ("2", default_actor(), "rs-m@1", "", "second cut"), ("1", "alice", "", "baseline, exp:1", "first cut")]
    listed = invoke("resources", "list", columns=160)
    assert rows(listed.stdout)[0][5] == "second cut"
    got = invoke("resources", "get", "rs-m", "--version", "1")
    assert json.loads(got.stdout.split("\n", 1)[1])["message"] == "first cut"


def test_bad_metadata_and_parents_are_one_line_errors(invoke: Invoke, two: LightningClient) -> None:
    one_line_error(invoke("resources", "add", PROMPT_JSON, "--tag", "has space"), "invalid version metadata", "tags")
    one_line_error(invoke("resources", "update", "rs-a", PROMPT_JSON, "--parent", "rs-nope"), "'rs-nope'", "parent")
    assert two.get_resources_by_id("rs-a").version == 1


def test_diff_prints_each_resource_and_a_unified_diff_of_templates(invoke: Invoke, two: LightningClient) -> None:
    two.update_resources("rs-a", {"prompt": PromptTemplate(template="a {x}\nthink first")})
    result = invoke("resources", "diff", "rs-a@1", "rs-a@2")
    assert result.exit_code == 0
    assert result.stdout.splitlines() == [
        "rs-a@1 -> rs-a@2", "prompt", "  prompt.template: changed",
        "    --- rs-a@1 prompt.template", "    +++ rs-a@2 prompt.template", "    @@ -1 +1,2 @@",
        "    -a {x}", "    +a {x}", "    +think first",
    ]
    assert invoke("resources", "diff", "rs-a").stdout == result.stdout  # default: against the version before
    as_json = json.loads(invoke("resources", "diff", "prod@1", "rs-b", "--json").stdout)
    assert (as_json["left"], as_json["right"]) == ({"resources_id": "rs-a", "version": 1},
                                                   {"resources_id": "rs-b", "version": 1})
    assert [c["path"] for c in as_json["changes"]] == ["prompt.template"] and "segments" not in as_json["changes"][0]
    assert invoke("resources", "diff", "rs-a@2", "rs-a@2").stdout == "rs-a@2 -> rs-a@2\nno difference\n"
    one_line_error(invoke("resources", "diff", "rs-b"), "first version")


# --------------------------------------------------------------------------- protected pointers


def test_protect_then_moves_need_force_and_reason(invoke: Invoke, two: LightningClient) -> None:
    result = invoke("resources", "protect", "prod", "--reason", "live traffic", "--actor", "alice")
    assert result.exit_code == 0 and result.stdout == "prod: protected (live traffic)\n"
    assert rows(invoke("resources", "pointers", columns=120).stdout) == [
        ["latest", "rs-b", "1", ""], ["prod", "rs-a", "1", "yes: live traffic (alice)"]]

    one_line_error(invoke("resources", "pointer", "prod", "rs-b"), "'prod' is protected", "--force --reason")
    one_line_error(invoke("resources", "pointer", "prod", "rs-b", "--force"), "only with a reason")
    one_line_error(invoke("resources", "delete", "rs-a", "--force"), "'prod' is protected", "unprotect")
    assert two.get_pointer("prod") == "rs-a"

    result = invoke("resources", "pointer", "prod", "rs-b", "--force", "--reason", "hotfix", "--actor", "bob")
    assert result.exit_code == 0 and result.stdout == "prod: rs-a -> rs-b\n"
    one_line_error(invoke("resources", "rollback", "prod"), "'prod' is protected")
    history = invoke("resources", "history", "prod", columns=160)
    assert rows(history.stdout)[0][3:6] == ["bob", "set_pointer", "hotfix"]

    result = invoke("resources", "unprotect", "prod")
    assert result.exit_code == 0 and result.stdout == "prod: no longer protected\n"
    assert invoke("resources", "rollback", "prod", "--reason", "undo").exit_code == 0
    assert two.get_pointer("prod") == "rs-a" and two.pointer_history("prod", 1)[0].reason == "undo"
