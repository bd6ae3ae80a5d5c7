"""The ``report``, ``compare`` and ``sweep`` verbs of the command line (issue 6)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _cmd_report(args: argparse.Namespace) -> int:
    from dssn.viz.report import write_report

    for run in args.runs:
        out = args.out if len(args.runs) == 1 else None
        print(f"written: {write_report(run, out)}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from dssn.viz.compare import compare_runs

    against = [k for item in args.against for k in item.split(",") if k] if args.against else None
    out = Path(args.out) if args.out else _default_compare_out(args.runs)
    compare_runs(args.runs, out, labels=args.labels, model=args.model, against=against)
    return 0


def _default_compare_out(runs: list[str]) -> Path:
    """One folder argument (a sweep or demo folder): write there; several runs: the current folder."""
    if len(runs) == 1 and Path(runs[0]).is_dir() and not (Path(runs[0]) / "config.yaml").is_file():
        return Path(runs[0])
    return Path(".")


def _cmd_sweep(args: argparse.Namespace) -> int:
    from dssn.sweep import run_sweep

    results = run_sweep(args.config, args.overrides, out=args.out, dry_run=args.dry_run, compare=not args.no_compare)
    return 1 if any(r.status == "failed" for r in results) else 0


def add_parsers(sub: argparse._SubParsersAction, overrides_help: str) -> None:
    p = sub.add_parser("report", help="write a run's HTML report (plots, per-class tables, warnings, timing)",
                       description="Write a self-contained HTML page about a run folder (plots embedded as PNG): "
                                   "config, loss and learning-rate curves, mIoU curves, per-class IoU of student "
                                   "and teacher, selected-pixel fraction per class over time, CPLG's thresholds, "
                                   "CPLG against a fixed 0.95 threshold per class, the health checks and their "
                                   "warnings, example predictions and pseudo labels, and timing. Training writes "
                                   "it at the end (train.report=true); this rebuilds it, also mid-run.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder(s) (holding config.yaml and metrics.jsonl)")
    p.add_argument("--out", help="output HTML file (default RUN/report.html; only with a single RUN)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("compare", help="compare runs: mIoU and per-class IoU table and plot, class winners",
                       description="Compare finished (or running) runs: a table of mIoU and per-class IoU with "
                                   "each class's winner marked (printed, and written as compare.md and "
                                   "compare.csv), and compare.png (mIoU per run; per-class IoU grouped by class, "
                                   "a star over each winner). A sweep folder (from `dssn sweep`) expands into "
                                   "its runs and adds sweep.png, mIoU against the swept values; any other "
                                   "folder of run folders (e.g. a demo's) expands into the runs it holds.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders, sweep folders or folders of runs")
    p.add_argument("--out", help="folder for compare.md/.csv/.png (default: the folder given, when a single "
                                 "sweep or demo folder is given; else the current folder)")
    p.add_argument("--labels", nargs="+", help="a name per run for the table and plots (default: folder names, or "
                                               "the swept values)")
    p.add_argument("--model", choices=["student", "teacher", "best"], default="student",
                   help="which network's scores to compare: student (default, every method has one), teacher "
                        "(falls back to the student), or best (the better of the two, per run)")
    p.add_argument("--against", nargs="+", metavar="KEY",
                   help="config keys to plot mIoU against (sweep.png), e.g. method.tau_low "
                        "(default: a sweep folder's axes)")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("sweep", help="train a grid of config overrides one after another (resumable)",
                       description="Train one run per combination of the given values, one after another, each "
                                   "a normal run folder OUT/<key>-<value>_... (e.g. tau_low-0.9_ratio-0.96), and "
                                   "then compare them (compare.md/.csv/.png and sweep.png, mIoU against the "
                                   "swept values). key=v1,v2,... is an axis of the grid; key=value without a "
                                   "comma (or a YAML list like model.dilations=[6,12,18]) applies to every run. "
                                   "Every grid point's config is checked before anything trains. Resumable: run "
                                   "the same command again and finished runs are skipped, an interrupted one "
                                   "resumes from its last checkpoint; a failed run does not stop the others.")
    p.add_argument("config", help="preset name or path to a YAML config (as for train)")
    p.add_argument("overrides", nargs="+", metavar="key=v1,v2,...",
                   help="axes of the grid and fixed overrides, e.g. method.tau_low=0.85,0.9,0.95 "
                        "method.ratio=0.9,0.96 train.iters=300. " + overrides_help)
    p.add_argument("--out", help="sweep folder (default runs/sweep-<name>-<method>); give the same folder to "
                                 "resume or extend a sweep")
    p.add_argument("--dry-run", action="store_true", help="list the grid and which runs are finished; train nothing")
    p.add_argument("--no-compare", action="store_true", help="do not run the comparison at the end")
    p.set_defaults(func=_cmd_sweep)

