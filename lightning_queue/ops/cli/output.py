"""How the commands print: results on stdout, errors on stderr, listings that never cut an id."""

from __future__ import annotations

import datetime
from collections.abc import Iterable

from rich import box
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.markup import escape
from rich.table import Table
from rich.text import Text

# Rich writes to whatever sys.stdout / sys.stderr is at print time and reads the width from
# the terminal or COLUMNS then, so these two carry no state of a run.
console = Console()
err = Console(stderr=True)


def fail(message: str) -> int:
    """Print ``error: message`` as one line on stderr; return the exit code (1)."""
    # soft_wrap: one line whatever the width, so scripts can grep it and terminals wrap it.
    # escape: messages quote user input, which may hold [brackets] rich would read as markup.
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)
    return 1


def when(timestamp: float) -> str:
    """A time as local ``YYYY-MM-DD HH:MM:SS``."""
    return datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


_GAP = 2  # spaces between two columns


class Listing:
    """Rows shown as a table whose cells are never cut, so any id can be copied into the next command.

    Cells are rich markup. A column keeps the width of its widest cell, except the columns
    named in ``wrap`` (free text), which wrap at spaces to make room. When even that does not
    fit the terminal, every row is shown as a record instead, one ``header  value`` line per
    column, so nothing is cut or folded into a narrow cell. Tables have no borders, only a
    rule under the header: the columns get the room borders would take, and
    ``awk '{print $1}'`` reads a row.
    """

    def __init__(self, *headers: str, wrap: Iterable[str] = (), title: str | None = None) -> None:
        self.headers = headers
        self.wrap = frozenset(wrap)
        self.title = title
        self.caption: str | None = None
        self.rows: list[tuple[str, ...]] = []

    def add_row(self, *cells: str) -> None:
        if len(cells) != len(self.headers):
            raise ValueError(f"{len(cells)} cells for {len(self.headers)} columns")
        self.rows.append(cells)

    def minimum_width(self) -> int:
        """The narrowest the table can be with no cell cut: its fixed columns whole, its
        ``wrap`` columns as wide as their longest word."""
        widths = []
        for index, header in enumerate(self.headers):
            cells = [Text.from_markup(header).plain, *(Text.from_markup(row[index]).plain for row in self.rows)]
            pieces = [word for cell in cells for word in cell.split()] if header in self.wrap else [
                line for cell in cells for line in cell.splitlines()]
            widths.append(max((cell_len(piece) for piece in pieces), default=0))
        return sum(widths) + _GAP * (len(widths) - 1)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if self.minimum_width() <= options.max_width:
            yield self._table()
        else:
            yield from self._records()

    def _table(self) -> Table:
        shown = Table(title=self.title, caption=self.caption, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        for header in self.headers:
            # "fold" only matters in a wrap column squeezed below its longest word; fixed
            # columns are never narrowed, since the whole table fits (see minimum_width).
            shown.add_column(header, no_wrap=header not in self.wrap, overflow="fold")
        for row in self.rows:
            shown.add_row(*row)
        return shown

    def _records(self) -> RenderResult:
        if self.title:
            yield Text(self.title, style="italic")
        for number, row in enumerate(self.rows):
            if number:
                yield ""
            record = Table.grid(padding=(0, _GAP))
            record.add_column(style="bold", no_wrap=True)
            record.add_column(overflow="fold")  # folds only a value wider than the terminal itself
            for header, cell in zip(self.headers, row, strict=True):
                record.add_row(header, cell)
            yield record
        if self.caption:
            yield Text(self.caption, style="dim")
