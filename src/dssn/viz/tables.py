"""Score tables as text: Markdown for files, aligned columns for the console."""

from __future__ import annotations

import math
from collections.abc import Sequence


def score(value: float | None, digits: int = 1) -> str:
    """A score in percent, ``-`` where there is none (a class absent from the set)."""
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def markdown(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def aligned(head: Sequence[str], rows: Sequence[Sequence[str]], min_width: int = 8) -> str:
    """The first column left-aligned, the others right-aligned, each as wide as its widest cell."""
    table = [list(head), *map(list, rows)]
    widths = [max(min_width, *(len(r[i]) for r in table)) for i in range(len(head))]
    return "\n".join("  ".join(f"{cell:<{w}}" if i == 0 else f"{cell:>{w}}" for i, (cell, w) in
                               enumerate(zip(row, widths))) for row in table)

