"""Tables of result rows: as plain text for the terminal (``format_table``, ``text``) and as Markdown for
docs/benchmarks.md (``markdown``).

Rows are flat dicts; a table's columns are the rows' keys in first-seen order, less those no row has a value in
(an empty column says nothing). A column NAME with columns NAME_p10 and NAME_p90 beside it is a ratio
(``benchmarks.timing.Ratio.columns``) and shows as one cell, ``1.52x (1.41-1.60)``, marked ``~`` when the
spread straddles 1.0. Floats show 4 significant digits; a missing value in a column others fill shows ``-``.
A suite groups its rows into ``Table``s, one per comparison, with its function ``tables(rows)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence

from benchmarks.timing import format_ratio

RATIO_LEGEND = ("ratios: median over paired rounds (p10-p90 of the per-round ratios); "
                "~: the spread straddles 1.0, no clear difference")


@dataclass
class Table:
    """One comparison's rows under a title, with an optional note (what the figures are, how measured)."""

    title: str
    rows: List[dict]
    note: str = ""


def cells(rows: Sequence[dict]):
    """(columns, one list of cell strings per row, whether a ratio column is among them)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    ratios = {column for column in columns if f"{column}_p10" in columns and f"{column}_p90" in columns}
    columns = [c for c in columns if not any(c in (f"{r}_p10", f"{r}_p90") for r in ratios)]
    columns = [c for c in columns if any(row.get(c) is not None for row in rows)]

    def cell(row, column):
        value = row.get(column)
        if value is None:
            return "-"
        if column in ratios and row.get(f"{column}_p10") is not None and row.get(f"{column}_p90") is not None:
            return format_ratio(value, row[f"{column}_p10"], row[f"{column}_p90"])
        if isinstance(value, float):
            return "nan" if math.isnan(value) else f"{value:.4g}"
        return str(value)

    return columns, [[cell(row, column) for column in columns] for row in rows], bool(ratios & set(columns))


def format_table(rows: Sequence[dict]) -> str:
    """Rows as an aligned plain-text table, with the ratio legend under it when a ratio column shows."""
    if not rows:
        return "(no rows)"
    columns, body, has_ratios = cells(rows)
    widths = [max(len(column), *(len(r[i]) for r in body)) for i, column in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in body]
    if has_ratios:
        lines.append(RATIO_LEGEND)
    return "\n".join(lines)


def markdown_table(rows: Sequence[dict]) -> str:
    """Rows as a Markdown table, with the ratio legend under it when a ratio column shows."""
    if not rows:
        return "(no rows)"
    columns, body, has_ratios = cells(rows)
    escape = lambda text: text.replace("|", "\\|")
    lines = ["| " + " | ".join(map(escape, columns)) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(map(escape, r)) + " |" for r in body]
    if has_ratios:
        lines += ["", RATIO_LEGEND[0].upper() + RATIO_LEGEND[1:] + "."]
    return "\n".join(lines)


def text(table: Table) -> str:
    """The table for a terminal: its title, the rows, its note."""
    return "\n".join(part for part in (f"-- {table.title}", format_table(table.rows), table.note) if part)


def markdown(table: Table, level: int = 3) -> str:
    """The table for docs/benchmarks.md: a heading, the note, the rows."""
    parts = [f"{'#' * level} {table.title}", table.note, markdown_table(table.rows)]
    return "\n\n".join(part for part in parts if part)
