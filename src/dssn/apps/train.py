"""``dssn train``: one run on the engine, then its HTML report."""

from __future__ import annotations

import sys

from dssn.config import Config
from dssn.engine.trainer import TrainResult
from dssn.engine.trainer import train as train_run
from dssn.viz.report import write_report


def train(cfg: Config) -> TrainResult:
    """Train the run ``cfg`` describes (or resume it); with ``train.report``, write ``report.html``
    into its folder when it ends. A run stopped early (``train.stop_after``) gets no report."""
    result = train_run(cfg)
    if cfg.train.report and result.main_process and result.final:
        try:
            print(f"report: {write_report(result.run_dir)}", file=sys.stderr)
        except Exception as err:  # the run itself is complete; `dssn report RUN` can retry
            print(f"warning: could not write the report ({type(err).__name__}: {err}); "
                  f"retry with `dssn report {result.run_dir}`", file=sys.stderr)
    return result
