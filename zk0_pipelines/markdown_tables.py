"""Markdown tables (``tabulate``, GitHub format) for model cards, validation reports and Dagster metadata.

Cells are text: ``|`` is escaped and newlines become spaces so a value cannot break the table; floats are
written with 6 significant digits (``nan`` as is), None as an empty cell.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def cell(value: Any) -> str:
    """``value`` as the text of one table cell."""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    if value is None:
        return ""
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Mapping[str, Any]], empty: str = "_no rows_") -> str:
    """A table of ``rows`` (columns in first-seen order; missing cells left empty); ``empty`` if none."""
    from tabulate import tabulate

    if not rows:
        return empty
    columns = list(dict.fromkeys(key for row in rows for key in row))
    body = [[cell(row.get(column)) for column in columns] for row in rows]
    return tabulate(body, headers=[cell(c) for c in columns], tablefmt="github", disable_numparse=True)
