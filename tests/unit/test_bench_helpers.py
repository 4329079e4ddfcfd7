"""The queue benchmark's pure helpers (``benchmarks/bench_queue.py``), so the script cannot rot silently."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_queue.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_queue", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_queue"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_command_calls_reads_parsed_and_raw_commandstats(bench: ModuleType) -> None:
    parsed = {"cmdstat_evalsha": {"calls": 3, "usec": 90, "usec_per_call": 30.0},
              "cmdstat_client|setname": {"calls": 1, "usec": 1, "usec_per_call": 1.0},
              "used_memory": 1000}  # INFO everything: other fields are ignored
    raw = ("# Commandstats\r\ncmdstat_evalsha:calls=3,usec=90,usec_per_call=30.00,rejected_calls=0,failed_calls=0\r\n"
           "cmdstat_client|setname:calls=1,usec=1,usec_per_call=1.00,rejected_calls=0,failed_calls=0\r\n")
    assert bench.command_calls(parsed) == bench.command_calls(raw) == {"evalsha": 3, "client|setname": 1}


def test_calls_delta_counts_new_calls_largest_first_without_its_own_lookups(bench: ModuleType) -> None:
    before = {"get": 10, "info": 4, "lpush": 2}
    after = {"get": 12, "info": 6, "lpush": 2, "evalsha": 9, "brpop": 2}
    assert list(bench.calls_delta(before, after).items()) == [("evalsha", 9), ("brpop", 2), ("get", 2)]


def test_split_per_item_shows_the_top_commands_and_sums_the_rest(bench: ModuleType) -> None:
    delta = {"evalsha": 30, "hget": 20, "get": 5, "set": 5}
    assert bench.split_per_item(delta, 10, top=2) == "evalsha 3.00, hget 2.00, other 1.00"
    assert bench.split_per_item({"get": 4}, 2) == "get 2.00"


def test_max_in_flight(bench: ModuleType) -> None:
    assert bench.max_in_flight([]) == 0
    assert bench.max_in_flight([(0, 1), (2, 3)]) == 1
    assert bench.max_in_flight([(0, 10), (1, 2), (1.5, 3), (2.5, 4)]) == 3
    assert bench.max_in_flight([(0, 1), (1, 2)]) == 1  # one ends as the next starts: not overlapping


def test_in_flight_is_per_process_and_the_mean_is_busy_time_over_elapsed(bench: ModuleType) -> None:
    runs = [(1, 0.0, 1.0), (1, 0.5, 1.5), (2, 0.0, 1.0), (2, 0.2, 1.2), (2, 0.4, 1.4)]
    peak, mean = bench.in_flight(runs, 2.0)
    assert peak == 3  # process 2; the two processes together never count as one
    assert mean == pytest.approx(2.5)
    assert bench.in_flight([], 1.0) == (0, 0.0)


def test_percentile_by_nearest_rank(bench: ModuleType) -> None:
    samples = list(range(1, 101))
    assert bench.percentile(samples, 0.5) == 50
    assert bench.percentile(samples, 0.99) == 99
    assert bench.percentile([7.0], 0.99) == 7.0


def test_key_pattern_names_key_types(bench: ModuleType) -> None:
    prefixes = ["lqbench-1a2b3c4d"]
    assert bench.key_pattern("lqbench-1a2b3c4d:rollout:ro-0123456789abcdef:attempt:2", prefixes) == \
        "{p}:rollout:ro-<id>:attempt:N"
    assert bench.key_pattern("lqbench-1a2b3c4d-bare:celery-task-meta-6f1c2b8e-1d2e-4f5a-9b8c-0a1b2c3d4e5f",
                             ["lqbench-1a2b3c4d-bare"]) == "{p}:celery-task-meta-<id>"
    assert bench.key_pattern("lqbench-1a2b3c4d:celery:lqbench-1a2b3c4d-lq-r12", prefixes) == "{p}:celery:{p}-lq-rN"


def test_memory_split_sums_growth_by_key_type(bench: ModuleType) -> None:
    before = {"p:rollouts": 100, "p:rollout:ro-0123456789abcdef": 400, "p:gone": 50}
    after = {"p:rollouts": 300, "p:rollout:ro-0123456789abcdef": 400, "p:rollout:ro-fedcba9876543210": 410,
             "p:rollout:ro-00000000000000ff": 390}
    assert bench.memory_split(before, after, ["p"]) == {"{p}:rollout:ro-<id>": 800, "{p}:rollouts": 200,
                                                        "{p}:gone": -50}


def test_report_prints_each_row_at_once_and_rewrites_the_json(bench: ModuleType, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "out.json"
    report = bench.Report(str(path))
    report.section = "e2e"
    report.row("end to end", "100/s", ">= 1.3x", rate=100.0)
    assert "end to end: 100/s   [target >= 1.3x]" in capsys.readouterr().out
    saved = json.loads(path.read_text())
    assert saved["rows"] == [{"section": "e2e", "measure": "end to end", "result": "100/s", "target": ">= 1.3x",
                              "values": {"rate": 100.0}}]
    assert saved["ok"] is True
    report.result("runs", {"lq": [1]})
    report.error("timed out: 3/5 finished")
    saved = json.loads(path.read_text())
    assert saved["results"] == {"e2e": {"runs": {"lq": [1]}}}
    assert saved["errors"] == [{"section": "e2e", "error": "timed out: 3/5 finished"}] and saved["ok"] is False


def test_meters_per_item_leaves_its_own_reading_out(bench: ModuleType) -> None:
    before = bench.Meters(1.0, 2.0, 3.0, 4.0, reads=100, commands={"get": 1}, sends=10)
    after = bench.Meters(1.5, 3.0, 3.1, 4.2, reads=111, commands={"get": 21, "info": 3}, sends=21)
    per = after.per_item(before, 10)
    assert per["cpu_us"] == pytest.approx({"worker_main": 50_000, "worker_pool": 100_000, "redis": 10_000,
                                           "caller": 20_000})
    assert per["reads"] == 1.0 and per["caller_round_trips"] == 1.0  # the closing INFO is not the window's
    assert per["commands"] == {"get": 2.0}


def test_format_table_aligns_columns(bench: ModuleType) -> None:
    table = bench.format_table([{"measure": "a", "result": "1 ms", "target": "< 5 ms"},
                                {"measure": "longer measure", "result": "22 ms", "target": ""}])
    header, rule, first, second = table.splitlines()
    assert header.startswith("measure       ") and rule.startswith("-" * len("longer measure"))
    assert first.index("1 ms") == second.index("22 ms") == header.index("result")
    assert second.endswith("22 ms")  # no trailing blanks where the target is empty


def test_format_table_takes_the_other_benchmarks_row_tuples(bench: ModuleType) -> None:
    assert bench.format_table([("a", "1 ms", "< 5 ms")]) == bench.format_table(
        [{"measure": "a", "result": "1 ms", "target": "< 5 ms"}])
