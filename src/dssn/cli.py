"""Command line: one verb per user task. Parses, validates, hands a Config to the engine."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dssn.config import load_config, preset_names
from dssn.errors import DssnError

OVERRIDES_HELP = ("config overrides as dotted key=value pairs, e.g. train.lr=0.01 method.name=fixmatch "
                  "data.root=/data/VOC2012 (values are read as YAML: 0.5, true, null, [6,12,18])")


def _cmd_train(args: argparse.Namespace) -> int:
    from dssn.engine.trainer import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg)
    for name, summary in result.final.items():
        print(f"{name}: mIoU {summary['miou']:.2f}")
    print(f"run folder: {result.run_dir}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from dssn.engine.evaluate import evaluate_checkpoint

    results = evaluate_checkpoint(args.checkpoint, args.config, args.overrides)
    for name, summary in results.items():
        print(f"\n{name}: mIoU {summary['miou']:.2f}")
        for cls, iou in summary["per_class"].items():
            print(f"  {cls:<16} {'-' if iou is None else f'{iou:6.2f}'}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"\nwritten: {args.json}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from dssn.demo import run_demo

    run_demo(out_dir=Path(args.out), seeds=args.seeds, iters=args.iters, data_root=Path(args.data),
             methods=args.methods, overrides=args.overrides)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dssn", description="Semi-supervised semantic segmentation with DSSN (ACM MM 2023).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model from a preset or YAML config",
                       description="Train one run. CONFIG is a preset name "
                                   f"({', '.join(preset_names())}) or a YAML file (which may name a preset "
                                   "as 'base: NAME'). Outputs go to run_dir (default runs/NAME-METHOD-TIME): "
                                   "config.yaml, metrics.jsonl, tb/ (TensorBoard), last.pt and best.pt.")
    p.add_argument("config", help="preset name or path to a YAML config")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint on a validation split",
                       description="Evaluate every network in a checkpoint (student and teacher) and print "
                                   "mIoU and per-class IoU (SPEC 6). A dssn checkpoint carries its config; "
                                   "override data.root, data.val_split or eval.* to evaluate elsewhere.")
    p.add_argument("checkpoint", help="a dssn checkpoint (last.pt / best.pt) or a released .pth (needs --config)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    p.add_argument("--config", help="preset or YAML, required for checkpoints that carry no config")
    p.add_argument("--json", help="also write the scores to this JSON file")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("demo", help="supervised vs DSSN on the built-in dataset, in minutes on a CPU",
                       description="Builds the synthetic dataset if absent, trains 'supervised' and 'dssn' "
                                   "on the same 1/16 labeled split with the same iteration budget, evaluates "
                                   "both and prints a table (also written to OUT/results.md and .json).")
    p.add_argument("--out", default="runs/demo", help="folder for the demo's runs and table (default runs/demo)")
    p.add_argument("--data", default="data/synthetic", help="where the built-in dataset is cached (default data/synthetic)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds; one row per method and seed")
    p.add_argument("--iters", type=int, default=None, help="iterations per run (default: the synthetic preset's)")
    p.add_argument("--methods", nargs="+", default=["supervised", "dssn"],
                   choices=["supervised", "fixmatch", "dssn"], help="methods to compare")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP + "; applied to every run")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DssnError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
