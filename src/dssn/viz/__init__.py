"""Seeing what training does: image panels, report plots, the HTML report, run comparisons.

Everything draws with matplotlib's Agg backend on ``Figure`` objects (no pyplot
global state, no display needed). Segmentation maps and per-class curves use the
dataset's own palette, so a class has one colour everywhere.
"""

from dssn.viz.compare import Comparison, compare_runs
from dssn.viz.report import write_report

__all__ = ["Comparison", "compare_runs", "write_report"]
