"""What a user sees, checked the way a user reads it: one-line errors, table rows, ids copied from output."""

from __future__ import annotations

import re
from collections.abc import Callable

from typer.testing import Result

Invoke = Callable[..., Result]
Finish = Callable[..., None]


def one_line_error(result: Result, *fragments: str) -> str:
    """Exit 1, nothing on stdout, one line on stderr holding every fragment, no traceback."""
    assert result.exit_code == 1, (result.stdout, result.stderr, result.exception)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def rows(output: str) -> list[list[str]]:
    """The body rows of the first listing printed as a table, as cells.

    Columns start where the header's last line has a word after two spaces or more (headers
    are bottom-aligned, so every column has one there); a line whose first column is blank
    continues the row above (a cell wrapped), its pieces joined by spaces.
    """
    lines = output.splitlines()
    rule = next(i for i, line in enumerate(lines) if line.startswith("─"))
    starts = [m.start() for m in re.finditer(r"(?:^|(?<=  ))\S", lines[rule - 1])]
    body: list[list[str]] = []
    for line in lines[rule + 1:]:
        if not line.strip():
            break
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        if cells[0] or not body:
            body.append(cells)
        else:
            body[-1] = [f"{old} {new}".strip() for old, new in zip(body[-1], cells, strict=True)]
    return body


def row(output: str, first_cell: str) -> list[str]:
    """The table row whose first cell is ``first_cell``."""
    return next(r for r in rows(output) if r[0] == first_cell)


def words(output: str) -> set[str]:
    """Every whitespace-separated word of ``output``: what a double click can copy."""
    return set(output.split())
