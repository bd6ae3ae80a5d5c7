"""Methods compared seed by seed: each run against the baseline run of the same seed.

Two runs of one seed share the data order and the initial weights, so their difference is
less noisy than either score; the mean difference over seeds and its standard error say
whether a margin is more than seed noise. ``dssn demo`` and ``dssn compare`` report it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from dssn.viz.tables import markdown, score

BASELINE = "supervised"


@dataclass(frozen=True)
class PairedDifference:
    """``a - b`` paired run by run (the same seed)."""

    differences: list[float]
    mean: float
    std_error: float | None
    """Sample standard deviation of the differences (n - 1) over sqrt(n); None below two pairs."""


def paired_difference(a: Sequence[float], b: Sequence[float]) -> PairedDifference:
    """The differences ``a[i] - b[i]``, their mean and its standard error."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_difference needs two equally long, non-empty lists, got {len(a)} and {len(b)}")
    differences = [x - y for x, y in zip(a, b)]
    n = len(differences)
    std_error = statistics.stdev(differences) / math.sqrt(n) if n > 1 else None
    return PairedDifference(differences, statistics.fmean(differences), std_error)


def signed(value: float, digits: int = 2) -> str:
    """A difference in points with its sign: ``+1.25``, ``-0.40``."""
    return f"{value:+.{digits}f}"


def paired_by_seed(rows: Sequence[dict], baseline: str = BASELINE) -> dict[str, dict]:
    """Per method other than ``baseline``: its mIoU minus the baseline's, seed by seed (the seeds
    both ran), their mean and its standard error. ``rows``: ``{"method", "seed", "miou"}`` each,
    at most one per method and seed. {} without the baseline."""
    miou = {(r["method"], r["seed"]): r["miou"] for r in rows}
    baseline_seeds = [r["seed"] for r in rows if r["method"] == baseline]
    paired = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        seeds = [seed for seed in baseline_seeds if (method, seed) in miou]
        if method == baseline or not seeds:
            continue
        d = paired_difference([miou[method, seed] for seed in seeds], [miou[baseline, seed] for seed in seeds])
        paired[method] = {"baseline": baseline, "seeds": seeds, "differences": d.differences, "mean": d.mean,
                          "std_error": d.std_error}
    return paired


def paired_table(paired: dict[str, dict], network: str = "student") -> str:
    """Markdown: one row per method, the difference of each seed, the mean and its standard error."""
    seeds = list(dict.fromkeys(seed for p in paired.values() for seed in p["seeds"]))
    rows = []
    for method, p in paired.items():
        by_seed = dict(zip(p["seeds"], p["differences"]))
        rows.append([f"{method} - {p['baseline']}", *(signed(by_seed[s]) if s in by_seed else "-" for s in seeds),
                     signed(p["mean"]), score(p["std_error"], 2)])
    return markdown([f"{network} mIoU", *(f"seed {s}" for s in seeds), "mean", "standard error"], rows)


def paired_lines(paired: dict[str, dict], network: str = "student") -> list[str]:
    """One sentence per method: the mean difference and its standard error."""
    lines = []
    for method, p in paired.items():
        n = len(p["seeds"])
        spread = (f"standard error {p['std_error']:.2f}" if p["std_error"] is not None
                  else "no standard error from one seed (dssn demo --seeds 0 1 2 runs three)")
        lines.append(f"{method} minus {p['baseline']}, {network} mIoU paired by seed over {n} "
                     f"seed{'s' * (n > 1)}: mean {signed(p['mean'])} points, {spread}")
    return lines
