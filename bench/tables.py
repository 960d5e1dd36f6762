"""The one table formatter of the benchmarks: rows of dicts -> a markdown table.

Every bench returns rows (`run(...) -> list[dict]`); `markdown_table` prints them as a GitHub
markdown table that also reads well in a terminal (columns padded, numbers right-aligned), and
`markdown_sections` splits rows on a key (a bench's "table" or "section") into one table each.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

Columns = Sequence[str] | Mapping[str, str]
"""Which keys to show, in order: a sequence of keys (the key is the header) or {key: header}."""


def cell(value) -> str:
    """A value as table text: None -> "", ints with thousands separators, floats with four
    significant digits (thousands and up: rounded to an integer with separators), "|" escaped so
    that it cannot end a cell."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: Sequence[Mapping], *, columns: Columns | None = None) -> str:
    """rows -> markdown table text (no trailing newline).

    `columns` defaults to every key in first-seen order, leaving out keys whose value is None or
    absent in every row. A column whose non-empty values are all numbers is right-aligned.
    """
    if columns is None:
        keys = [key for key in dict.fromkeys(key for row in rows for key in row)
                if any(row.get(key) is not None for row in rows)]
        columns = {key: key for key in keys}
    elif not isinstance(columns, Mapping):
        columns = {key: key for key in columns}
    headers = [cell(header) for header in columns.values()]
    body = [[cell(row.get(key)) for key in columns] for row in rows]
    numeric = [all(isinstance(row.get(key), (int, float)) for row in rows
                   if row.get(key) is not None) for key in columns]
    widths = [max(3, len(header), *(len(line[i]) for line in body))
              for i, header in enumerate(headers)]

    def line(texts: list[str]) -> str:
        padded = [text.rjust(width) if right else text.ljust(width)
                  for text, width, right in zip(texts, widths, numeric)]
        return "| " + " | ".join(padded) + " |"

    rule = ["-" * (width - 1) + ":" if right else "-" * width
            for width, right in zip(widths, numeric)]
    return "\n".join([line(headers), line(rule), *(line(texts) for texts in body)])


def markdown_sections(rows: Sequence[Mapping], *, by: str, level: int = 3) -> str:
    """One markdown table per distinct value of `row[by]` (first-seen order), each under a
    heading of that value; `by` itself is not a column."""
    parts = []
    for section in dict.fromkeys(row[by] for row in rows):
        part = [{key: value for key, value in row.items() if key != by}
                for row in rows if row[by] == section]
        parts.append(f"{'#' * level} {section}\n\n{markdown_table(part)}")
    return "\n\n".join(parts)
