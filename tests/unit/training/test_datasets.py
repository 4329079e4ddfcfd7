"""Datasets: stable input ids, JSONL loading, deterministic splits, batches going round."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_queue import InvalidDatasetError
from lightning_queue.training import Dataset, Example, input_id


def test_ids_come_from_the_id_field_else_from_the_content() -> None:
    data = Dataset.of([{"id": 7, "q": "a"}, {"q": "b"}, "plain text", {"q": "b"}])

    assert data.ids[0] == "7"
    assert data.ids[1].startswith("in-") and data.ids[1] == input_id({"q": "b"})
    # The same content gets the same id in any process, whatever the key order...
    assert input_id({"b": 1, "a": 2}) == input_id({"a": 2, "b": 1})
    # ...and repeated content is numbered in order.
    assert data.ids[3] == f"{data.ids[1]}-2"
    assert data.inputs == [{"id": 7, "q": "a"}, {"q": "b"}, "plain text", {"q": "b"}]
    assert Dataset.of([{"id": 7}], id_field=None).ids[0].startswith("in-")
    assert Dataset.of(data) is data
    assert Dataset.of([Example("x", 1)]).ids == ["x"]


def test_a_repeated_id_or_an_input_that_is_not_json_is_refused() -> None:
    with pytest.raises(InvalidDatasetError, match=r"input id 'a' is given twice \(positions 0 and 2\)"):
        Dataset.of([{"id": "a"}, {"id": "b"}, {"id": "a"}])
    with pytest.raises(InvalidDatasetError, match="not JSON"):
        Dataset.of([{"when": object()}])
    with pytest.raises(InvalidDatasetError, match="got a str"):
        Dataset.of("one input")


def test_jsonl_names_the_line_that_does_not_parse(tmp_path: Path) -> None:
    good = tmp_path / "calc.jsonl"
    good.write_text('{"id": "a", "question": "1+1"}\n\n{"id": "b", "question": "2+2"}\n')
    data = Dataset.from_jsonl(good)
    assert (data.name, data.ids, data[1].input["question"]) == ("calc", ["a", "b"], "2+2")

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a"}\n{"id": \n')
    with pytest.raises(InvalidDatasetError, match=r"bad.jsonl:2 is not JSON"):
        Dataset.from_jsonl(bad)


def test_a_split_is_the_same_every_time_and_changes_only_with_the_seed() -> None:
    data = Dataset.of([{"id": f"q{i}"} for i in range(20)], name="calc")

    train, val = data.split(0.25)
    again_train, again_val = Dataset.of([{"id": f"q{i}"} for i in range(20)], name="calc").split(0.25)
    _, other_val = data.split(0.25, seed="another")

    assert (len(train), len(val)) == (15, 5)
    assert (train.ids, val.ids) == (again_train.ids, again_val.ids)
    assert set(train.ids) | set(val.ids) == set(data.ids) and not set(train.ids) & set(val.ids)
    assert val.ids != other_val.ids
    assert train.ids == sorted(train.ids, key=data.ids.index)  # each part keeps the data's order
    assert (train.name, val.name) == ("calc-train", "calc-val")
    # Each side keeps at least one input.
    assert [len(part) for part in Dataset.of([1, 2]).split(0.01)] == [1, 1]
    with pytest.raises(InvalidDatasetError, match="at least 2"):
        Dataset.of([1]).split()
    with pytest.raises(InvalidDatasetError, match="between 0 and 1"):
        data.split(1.0)


def test_batches_go_round_the_dataset() -> None:
    data = Dataset.of([{"id": str(i)} for i in range(5)])

    assert data.batch(0, 2).ids == ["0", "1"]
    assert data.batch(2, 2).ids == ["4", "0"]
    assert data.batch(7, 3).ids == ["1", "2", "3"]
    assert data.batch(0, 9).ids == ["0", "1", "2", "3", "4"]  # never an input twice in one batch
    assert data[1:3].ids == ["1", "2"]
    assert len(Dataset.of([]).batch(3, 2)) == 0
