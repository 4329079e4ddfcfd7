"""The queue benchmark's pure helpers (``benchmarks/bench_queue.py``), so the script cannot rot silently."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_queue.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_queue", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_command_calls_reads_parsed_and_raw_commandstats(bench: ModuleType) -> None:
    parsed = {"cmdstat_evalsha": {"calls": 3, "usec": 90, "usec_per_call": 30.0},
              "cmdstat_client|setname": {"calls": 1, "usec": 1, "usec_per_call": 1.0}}
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


def test_percentile_by_nearest_rank(bench: ModuleType) -> None:
    samples = list(range(1, 101))
    assert bench.percentile(samples, 0.5) == 50
    assert bench.percentile(samples, 0.99) == 99
    assert bench.percentile([7.0], 0.99) == 7.0


def test_format_table_aligns_columns(bench: ModuleType) -> None:
    table = bench.format_table([("a", "1 ms", "< 5 ms"), ("longer measure", "22 ms", "")])
    header, rule, first, second = table.splitlines()
    assert header.startswith("measure       ") and rule.startswith("-" * len("longer measure"))
    assert first.index("1 ms") == second.index("22 ms") == header.index("result")
    assert second.endswith("22 ms")  # no trailing blanks where the target is empty
