"""Listings: a table while every cell fits whole, records when not; never a cut id."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from lightning_queue.ops.cli.output import Listing
from tests.unit.cli.expect import rows

LONG = "prompt-step-by-step-terse-8dfcd8"


def _render(listing: Listing, width: int) -> str:
    out = io.StringIO()
    Console(file=out, width=width).print(listing)
    return out.getvalue()


def _listing() -> Listing:
    listing = Listing("rollout_id", "status", "resources_id", "error", wrap=["error"])
    listing.add_row("ro-f85682b6b4d20977", "succeeded", "rs-14e19012caf32219", "")
    listing.add_row("ro-4c7463298decb42d", "failed", LONG, "ValueError: the agent raised a long message")
    return listing


def test_a_listing_that_fits_is_a_table_with_whole_cells() -> None:
    text = _render(_listing(), 120)
    assert rows(text) == [["ro-f85682b6b4d20977", "succeeded", "rs-14e19012caf32219", ""],
                          ["ro-4c7463298decb42d", "failed", LONG, "ValueError: the agent raised a long message"]]
    assert "│" not in text  # no borders: `awk '{print $1}'` reads a row


def test_wrap_columns_wrap_at_spaces_to_keep_the_others_whole() -> None:
    text = _render(_listing(), 80)
    assert max(len(line) for line in text.splitlines()) <= 80
    body = rows(text)
    assert [r[:3] for r in body] == [["ro-f85682b6b4d20977", "succeeded", "rs-14e19012caf32219"],
                                     ["ro-4c7463298decb42d", "failed", LONG]]
    assert body[1][3] == "ValueError: the agent raised a long message"  # wrapped over lines, joined back


def test_a_listing_too_wide_for_the_terminal_becomes_records() -> None:
    listing = _listing()
    assert listing.minimum_width() > 60
    text = _render(listing, 60)
    assert "─" not in text and "…" not in text
    records = [block.splitlines() for block in text.strip("\n").split("\n\n")]
    assert [line.split()[:2] for line in records[1][:3]] == [
        ["rollout_id", "ro-4c7463298decb42d"], ["status", "failed"], ["resources_id", LONG]]
    assert max(len(line) for line in text.splitlines()) <= 60


def test_markup_is_measured_as_shown() -> None:
    listing = Listing("worker", "state")
    listing.add_row("w1@host", "[bold red]STALLED[/]")
    assert listing.minimum_width() == len("w1@host") + 2 + len("STALLED")
    assert rows(_render(listing, 80)) == [["w1@host", "STALLED"]]


def test_a_row_must_have_a_cell_per_column() -> None:
    with pytest.raises(ValueError, match="1 cells for 2 columns"):
        Listing("a", "b").add_row("x")
