"""``lightning-queue rollouts``: submit (directly or through an experiment), list, wait, status, cancel."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from typer.testing import CliRunner

from lightning_queue import Experiments, LightningClient, Rollout
from lightning_queue.experiments.manager import parse_experiment
from lightning_queue.ops.cli import CliContext, app
from tests.unit.cli.expect import Finish, Invoke, one_line_error, row, rows, words


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




def test_submit_reads_json_lines_from_a_file(invoke: Invoke, two: LightningClient, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text('{"q": 1}\n\n"two"\n')
    result = invoke("rollouts", "submit", "--file", str(inputs), "-r", "rs-b", "--mode", "val")
    assert result.exit_code == 0, result.output
    submitted = result.stdout.split()
    assert [two.get_rollout(rid).input for rid in submitted] == [{"q": 1}, "two"]
    assert {two.get_rollout(rid).mode for rid in submitted} == {"val"}


def test_submit_needs_an_input(invoke: Invoke, two: LightningClient) -> None:
    one_line_error(invoke("rollouts", "submit"), "at least one input")


# --------------------------------------------------------------------------- through an experiment


@pytest.fixture
def running_ab(two: LightningClient) -> Experiments:
    """ab: control=rs-a, treatment=rs-b, assigned by input.user, running."""
    experiments = Experiments(two)
    experiments.create(parse_experiment({"name": "ab", "unit_key": "input.user", "variants": [
        {"name": "control", "resources_id": "rs-a"}, {"name": "treatment", "resources_id": "rs-b"}]}))
    experiments.start("ab")
    return experiments


def test_submit_through_an_experiment_assigns_variants(invoke: Invoke, two: LightningClient,
                                                       running_ab: Experiments) -> None:
    users = [json.dumps({"user": f"u{i}"}) for i in range(20)]
    result = invoke("rollouts", "submit", "--experiment", "ab", *users)
    assert result.exit_code == 0, result.output
    submitted = [two.get_rollout(rid) for rid in result.stdout.split()]
    assert len(submitted) == 20
    for rollout in submitted:  # pinned to its variant's snapshot, tagged, and counted by the experiment
        variant = rollout.metadata["variant"]
        assert rollout.metadata["experiment"] == "ab" and variant in ("control", "treatment")
        assert rollout.resources_id == {"control": "rs-a", "treatment": "rs-b"}[variant]
    counted = [rid for ids in running_ab.rollout_ids("ab").values() for rid in ids]
    assert sorted(counted) == sorted(r.rollout_id for r in submitted)
    # The same unit gets the same variant again.
    again = invoke("rollouts", "submit", "-e", "ab", users[0])
    assert two.get_rollout(again.stdout.strip()).metadata["variant"] == submitted[0].metadata["variant"]


def test_submit_through_an_experiment_refuses_what_it_cannot_do(invoke: Invoke, two: LightningClient,
                                                               running_ab: Experiments) -> None:
    one_line_error(invoke("rollouts", "submit", "-e", "ab", "-r", "rs-a", '{"user": "u1"}'),
                   "--experiment ab chooses each input's snapshot", "--resources-id")
    one_line_error(invoke("rollouts", "submit", "-e", "ab", "--follow", '{"user": "u1"}'), "--follow")
    one_line_error(invoke("rollouts", "submit", "-e", "ghost", '{"user": "u1"}'), "'ghost'")
    one_line_error(invoke("rollouts", "submit", "-e", "ab", '{"name": "no user"}'), "user")
    running_ab.stop("ab")
    one_line_error(invoke("rollouts", "submit", "-e", "ab", '{"user": "u1"}'), "start it")
    assert two.query_rollouts() == []


# --------------------------------------------------------------------------- waiting


def test_submit_wait_shows_the_results_and_exits_0_when_all_succeed(
    invoke: Invoke, two: LightningClient, instant_worker: None
) -> None:
    result = invoke("rollouts", "submit", "--wait", '{"q": 1}', '{"q": 2}')
    assert result.exit_code == 0, result.output
    submitted = result.stdout.split()[:2]
    assert [row(result.stdout, rid)[1] for rid in submitted] == ["succeeded", "succeeded"]


def test_submit_wait_exits_1_naming_the_rollouts_that_failed(
    invoke: Invoke, two: LightningClient, instant_worker: None
) -> None:
    result = invoke("rollouts", "submit", "-w", '{"q": 1}', '{"fail": 1}')
    assert result.exit_code == 1
    bad = result.stdout.split()[1]
    assert row(result.stdout, bad)[1] == "failed"
    assert f"{bad}  ToolError: the tool broke" in result.stdout  # errors below the table, with the id
    error = result.stderr.strip()
    assert error == f"error: 1 of 2 rollouts did not succeed: {bad} (failed)", error


def test_wait_exits_3_when_the_timeout_passes_first(invoke: Invoke, two: LightningClient, finish: Finish) -> None:
    done, stuck = (r.rollout_id for r in two.enqueue_rollouts(["a", "b"]))
    finish(done)
    result = invoke("rollouts", "wait", done, stuck, "--timeout", "0.2")
    assert result.exit_code == 3
    assert [r[0] for r in rows(result.stdout)] == [done]
    one_line = result.stderr.strip()
    assert one_line.startswith("error: 1 of 2 did not finish within 0.2 s") and one_line.endswith(f": {stuck}")


def test_wait_exits_1_when_one_failed_even_if_another_timed_out(
    invoke: Invoke, two: LightningClient, finish: Finish
) -> None:
    failed, cancelled, stuck = (r.rollout_id for r in two.enqueue_rollouts(["a", "b", "c"]))
    finish(failed, "failed")
    two.store.terminate(cancelled, "cancelled")
    result = invoke("rollouts", "wait", failed, cancelled, stuck, "--timeout", "0.1")
    assert result.exit_code == 1
    assert "2 of 3 rollouts did not succeed" in result.stderr and "did not finish within 0.1 s" in result.stderr
    assert invoke("rollouts", "wait", cancelled).exit_code == 1  # cancelled is not success either


def test_submit_wait_timeout_exits_3(invoke: Invoke, two: LightningClient) -> None:
    result = invoke("rollouts", "submit", "-w", "--wait-timeout", "0.1", "q")
    assert result.exit_code == 3, result.output
    assert "did not finish within 0.1 s" in result.stderr


def test_wait_exits_0_when_every_rollout_succeeded(invoke: Invoke, two: LightningClient, finish: Finish) -> None:
    ids = [r.rollout_id for r in two.enqueue_rollouts(["a", "b"])]
    for rid in ids:
        finish(rid, reward=0.5)
    result = invoke("rollouts", "wait", *ids)
    assert result.exit_code == 0 and result.stderr == ""
    assert [(r[0], r[1], r[5]) for r in rows(result.stdout)] == [(ids[0], "succeeded", "0.5"),
                                                                 (ids[1], "succeeded", "0.5")]


def test_wait_for_an_unknown_rollout_is_a_one_line_error(invoke: Invoke, client: LightningClient) -> None:
    one_line_error(invoke("rollouts", "wait", "ro-nope"), "'ro-nope'")


# --------------------------------------------------------------------------- list, status, cancel


def test_list_at_80_columns_prints_ids_that_can_be_fed_back(invoke: Invoke, two: LightningClient,
                                                            finish: Finish) -> None:
    two.add_resources({"prompt": {"resource_type": "prompt_template", "template": "{x}"}},
                      "prompt-step-by-step-terse-8dfcd8")
    enqueued = [r.rollout_id for r in two.enqueue_rollouts(["a", "b"], resources_id="rs-a")]
    enqueued += [r.rollout_id for r in two.enqueue_rollouts(["c"], resources_id="prompt-step-by-step-terse-8dfcd8")]
    finish(enqueued[0], "failed")
    for columns in (80, 200):
        result = invoke("rollouts", "list", columns=columns)
        assert result.exit_code == 0 and "…" not in result.stdout
        assert max(len(line) for line in result.stdout.splitlines()) <= columns
        shown = words(result.stdout)
        assert set(enqueued) <= shown and "prompt-step-by-step-terse-8dfcd8" in shown
    for rollout_id in enqueued:  # copied from the output into the next command
        status = invoke("rollouts", "status", rollout_id)
        assert status.exit_code == 0 and json.loads(_json_part(status.stdout))["rollout_id"] == rollout_id


def _json_part(output: str) -> str:
    """The JSON object ``rollouts status`` prints before its attempts table."""
    end = output.index("\n}\n") + 2
    return output[:end]


def test_list_filters(invoke: Invoke, two: LightningClient, finish: Finish) -> None:
    a, b = (r.rollout_id for r in two.enqueue_rollouts(["a", "b"], resources_id="rs-a"))
    c = two.enqueue_rollout("c", resources_id="rs-b", mode="val").rollout_id
    finish(a)
    assert [r[0] for r in rows(invoke("rollouts", "list", "--status", "succeeded").stdout)] == [a]
    assert [r[0] for r in rows(invoke("rollouts", "list", "-r", "rs-b").stdout)] == [c]
    assert [r[0] for r in rows(invoke("rollouts", "list", "--mode", "val").stdout)] == [c]
    assert [r[0] for r in rows(invoke("rollouts", "list", "--limit", "1", "--offset", "1").stdout)] == [b]


def test_list_filters_by_metadata_experiment_time_and_sorts(
    invoke: Invoke, two: LightningClient, finish: Finish
) -> None:
    a = two.enqueue_rollout("a", metadata={"user": "alice", "n": 3}).rollout_id
    b = two.enqueue_rollout("b", metadata={"user": "bob"}).rollout_id
    c = two.enqueue_rollout("c", metadata={"user": "alice"}).rollout_id
    finish(c)
    finish(a)

    def listed(*args: str) -> list[str]:
        return [r[0] for r in rows(invoke("rollouts", "list", *args).stdout)]

    assert listed("--meta", "user=alice") == [c, a]
    assert listed("--meta", "user=alice", "--meta", "n=3") == [a]
    assert listed("--oldest-first") == [a, b, c]
    assert listed("--by-end") == [a, c]  # finished ones, last finished first
    assert listed("--status", "queuing", "--status", "succeeded", "--limit", "2") == [c, b]
    assert listed("--older-than", "1h") == [] and listed("--newer-than", "1h") == [c, b, a]
    assert listed("--ended-within", "1d", "--oldest-first") == [a, c]
    one_line_error(invoke("rollouts", "list", "--older-than", "soon"), "'soon' is not a duration")
    one_line_error(invoke("rollouts", "list", "--meta", "user"), "not key=value")
    one_line_error(invoke("rollouts", "list", "--variant", "b"), "variant needs experiment")


def test_bulk_cancel_lists_first_and_cancels_with_yes(client: LightningClient, two: LightningClient) -> None:
    revoked: list[list[str]] = []
    celery = SimpleNamespace(control=SimpleNamespace(revoke=lambda task_id, **_: revoked.append(task_id)))
    with_celery = LightningClient(client.settings, redis_client=client.redis, celery=celery)  # type: ignore[arg-type]
    two_hours_ago = time.time() - 7200
    stale = [Rollout(input=i, enqueue_time=two_hours_ago + i) for i in range(2)]
    client.store.create_rollouts(stale)
    old = [r.rollout_id for r in stale]
    other = two.enqueue_rollout("c").rollout_id
    runner = CliRunner()

    def invoke(*args: str) -> Any:
        return runner.invoke(app, ["rollouts", "cancel", *args], obj=CliContext(client=with_celery))

    dry = invoke("--status", "queuing", "--older-than", "1h")
    assert dry.exit_code == 0, dry.output
    assert dry.stdout.split() == old[::-1] and "dry run: 2 unfinished rollouts match; add --yes" in dry.stderr
    assert {client.get_rollout(rid).status for rid in [*old, other]} == {"queuing"} and revoked == []
    done = invoke("--status", "queuing", "--older-than", "1h", "--yes")
    assert done.exit_code == 0 and done.stdout.split() == old[::-1]
    assert "cancelled 2, already finished 0, not found 0" in done.stderr
    assert [client.get_rollout(rid).status for rid in [*old, other]] == ["cancelled", "cancelled", "queuing"]
    one_line_error(invoke(), "give rollout ids, or a filter")
    one_line_error(invoke(other, "--status", "queuing"), "not both")
    one_line_error(invoke("--status", "succeeded", "--yes"), "nothing to cancel")


def test_finished_prints_from_a_cursor_file_and_resumes_after_it(
    invoke: Invoke, two: LightningClient, finish: Finish, tmp_path: Path
) -> None:
    a, b, c = (r.rollout_id for r in two.enqueue_rollouts(["a", "b", "c"]))
    finish(b)
    finish(a, "failed")
    saved = tmp_path / "cursor"
    first = invoke("rollouts", "finished", "--cursor-file", str(saved))
    assert first.exit_code == 0, first.output
    assert [line.split()[1:] for line in first.stdout.splitlines()] == [[b, "succeeded"], [a, "failed"]]
    assert saved.read_text().strip() == first.stdout.splitlines()[-1].split()[0]
    two.store.terminate(c, "cancelled")
    again = invoke("rollouts", "finished", "--cursor-file", str(saved), "--follow", "0.05")
    assert [line.split()[1:] for line in again.stdout.splitlines()] == [[c, "cancelled"]]
    assert invoke("rollouts", "finished", "--cursor-file", str(saved)).stdout == ""
    one_line_error(invoke("rollouts", "finished", "--after", "nope"), "invalid page cursor")


def test_status_shows_the_result_and_the_attempts(invoke: Invoke, two: LightningClient, finish: Finish) -> None:
    rid = two.enqueue_rollout({"q": 1}, resources_id="rs-b").rollout_id
    finish(rid, reward=0.75)
    result = invoke("rollouts", "status", rid)
    assert result.exit_code == 0, result.output
    shown = json.loads(_json_part(result.stdout))
    assert shown["status"] == "succeeded" and shown["result"]["reward"] == 0.75
    assert row(result.stdout, "1")[1:4] == ["succeeded", "sim@host", "rs-b"]


def test_cancel(client: LightningClient, two: LightningClient) -> None:
    revoked: list[str] = []
    celery = SimpleNamespace(control=SimpleNamespace(revoke=lambda task_id, **_: revoked.append(task_id)))
    with_celery = LightningClient(client.settings, redis_client=client.redis, celery=celery)  # type: ignore[arg-type]
    rid = two.enqueue_rollout("q").rollout_id
    result = CliRunner().invoke(app, ["rollouts", "cancel", rid], obj=CliContext(client=with_celery))
    assert result.exit_code == 0 and result.stdout == f"{rid}: cancelled\n"
    assert two.get_rollout(rid).status == "cancelled" and revoked == [rid]


def test_the_help_says_where_results_live(invoke: Invoke) -> None:
    for args in (("rollouts", "--help"), ("rollouts", "status", "--help")):
        result = invoke(*args, columns=200)
        assert result.exit_code == 0
        text = " ".join(result.stdout.split())
        assert "app.AsyncResult(id).get() raises NotImplementedError" in text, text
        assert "rollout store" in text and "lightning-queue rollouts status ID" in text
