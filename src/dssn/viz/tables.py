"""Score tables as text: Markdown for files, aligned columns for the console."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


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


@dataclass(frozen=True)
class PairedDifference:
    """``a - b`` paired run by run (the same seed): what a comparison over seeds rests on."""

    differences: list[float]
    mean: float
    std_error: float | None
    """Sample standard deviation of the differences (n - 1) over sqrt(n); None below two pairs."""


def paired_difference(a: Sequence[float], b: Sequence[float]) -> PairedDifference:
    """The differences ``a[i] - b[i]``, their mean and its standard error. Pairing removes what
    the two runs of a seed share (data order, initial weights) from the spread."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_difference needs two equally long, non-empty lists, got {len(a)} and {len(b)}")
    differences = [x - y for x, y in zip(a, b)]
    n = len(differences)
    std_error = statistics.stdev(differences) / math.sqrt(n) if n > 1 else None
    return PairedDifference(differences, statistics.fmean(differences), std_error)


def signed(value: float, digits: int = 2) -> str:
    """A difference in points with its sign: ``+1.25``, ``-0.40``."""
    return f"{value:+.{digits}f}"
