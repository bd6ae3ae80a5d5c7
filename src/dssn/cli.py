"""Command line: one verb per user task. Parses, validates, hands a Config to ``dssn.apps``.

Each verb imports its task when it runs, so that a command loads only what it uses (all the
tasks together, with TensorBoard, matplotlib and their kin, add about two seconds of start-up).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dssn.config import load_config, method_config_class, preset_names
from dssn.constants import NETWORK_CHOICES
from dssn.errors import DssnError, TrainingPreempted
from dssn.registry import BACKBONES, DATASETS, METHODS, MODELS

OVERRIDES_HELP = ("config overrides as dotted key=value pairs, e.g. train.lr=0.01 method.name=fixmatch "
                  "data.root=/data/VOC2012 (values are read as YAML: 0.5, true, null, [6,12,18])")


def _add_config_arguments(p: argparse.ArgumentParser, config_help: str) -> None:
    """A config (preset or YAML) and ``key=value`` overrides, as every config-taking verb reads them."""
    p.add_argument("config", help=config_help)
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)


def _add_network_arguments(p: argparse.ArgumentParser) -> None:
    """Which network of a checkpoint, and the config a released .pth needs (predict, export)."""
    p.add_argument("--config", help="preset or YAML saying what network a released .pth holds")
    p.add_argument("--model", choices=list(NETWORK_CHOICES), default=NETWORK_CHOICES[0], help=_MODEL_HELP)


def method_keys_help() -> str:
    """Each method's ``method.*`` keys under its name (a key of another method is refused)."""
    parts = []
    for name in METHODS:
        keys = [k for k in method_config_class(name).model_fields if k != "name"]
        parts.append(f"{name}: {', '.join(keys) if keys else 'none'}")
    return "Each method reads its own method.* keys; " + "; ".join(parts) + "."


def _cmd_train(args: argparse.Namespace) -> int:
    from dssn.apps.train import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg)
    if not result.main_process:
        return 0
    for name, summary in result.final.items():
        print(f"{name}: mIoU {summary['miou']:.2f}")
    print(f"run folder: {result.run_dir}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from dssn.engine.plan import PlanError, plan_batches
    from dssn.method import METHODS as METHOD_CLASSES

    cfg = load_config(args.config, args.overrides)
    uses_unlabeled = METHOD_CLASSES[cfg.method.name].uses_unlabeled
    failed = False
    for world in args.processes:
        try:
            plan = plan_batches(cfg.train, world, uses_unlabeled)
        except PlanError as err:
            print(f"{world:>3}: cannot: {err}")
            failed = True
            continue
        print(f"{world:>3}: {plan.line(args.unit)}")
        if plan.lr_note():
            print(f"     {plan.lr_note()}")
    return 2 if failed else 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from dssn.apps.evaluate import evaluate_checkpoint, iou_table, write_scores

    results = evaluate_checkpoint(args.checkpoint, args.config, args.overrides)
    print(iou_table(results))
    for name, summary in results.items():
        print(f"{name}: mIoU {summary['miou']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"written: {args.json}")
    if args.out:
        for path in write_scores(results, args.out):
            print(f"written: {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from dssn.apps.demo import run_demo

    run_demo(out_dir=Path(args.out), seeds=args.seeds, iters=args.iters,
             data_root=Path(args.data) if args.data else None, methods=args.methods, overrides=args.overrides,
             task=args.task)
    return 0


# ---- data commands: prepare, splits, check-data --------------------------------------


def _cmd_prepare(args: argparse.Namespace) -> int:
    from dssn.data.prepare import PrepareOptions

    root = Path(args.root).expanduser()
    if not root.is_dir():
        raise DssnError(f"dataset root '{root}' does not exist")
    options = PrepareOptions(args.out, tuple(args.splits), args.overwrite, progress=not args.quiet)
    for line in DATASETS[args.dataset].prepare(root, options):
        print(line)
    return 0


def _relative_to(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def _cmd_splits(args: argparse.Namespace) -> int:
    from dssn.data.layouts import load_folder_meta, scan_pool
    from dssn.data.splits import amount_name, make_splits, parse_amount, write_splits

    root = Path(args.root).expanduser()
    meta = None
    if DATASETS[args.dataset].reads_meta:
        meta_path = Path(args.meta).expanduser() if args.meta else root / "dataset.yaml"
        meta = load_folder_meta(meta_path)
    labeled = parse_amount(args.labeled)
    val = "official" if args.val is None else parse_amount(args.val)
    plan = make_splits(scan_pool(args.dataset, root, meta), labeled, val, args.seed)
    out = Path(args.out).expanduser() if args.out else root / "splits" / amount_name(labeled)
    paths = write_splits(plan, out, args.overwrite)
    val_from = "drawn from the labeled images" if plan.val_from == "drawn" else f"official, {plan.val_from}"
    print(f"labeled {len(plan.labeled)}, unlabeled {len(plan.unlabeled)}, val {len(plan.val)} ({val_from}); "
          f"seed {args.seed}")
    for path in paths:
        print(f"written: {path}")
    keys = ("data.labeled_split", "data.unlabeled_split", "data.val_split")
    overrides = " ".join(f"{k}={_relative_to(p, root)}" for k, p in zip(keys, paths))
    extra = f" data.num_classes={len(meta.classes)}" if meta is not None else ""
    print(f"train with:\n  dssn train {args.dataset} data.root={root}{extra} {overrides}")
    return 0


def _cmd_check_data(args: argparse.Namespace) -> int:
    from dssn.data.check import check_fast, check_full, format_problems, plot_class_frequency, summary_text

    cfg = load_config(args.config, args.overrides)
    if args.fast:
        splits, problems = check_fast(cfg)
        for role, split in splits:
            print(f"{role:<10} {len(split.entries):>8}  {split.source}")
    else:
        report = check_full(cfg, workers=args.workers, progress=not args.quiet)
        problems = report.problems
        print(summary_text(report))
        if args.plot != "none" and report.pixel_counts:
            print(f"plot: {plot_class_frequency(report, Path(args.plot))}")
    if not problems:
        print("\nno problems found")
        return 0
    print(f"\n{len(problems)} problem(s):\n{format_problems(problems)}")
    return 1


def _add_data_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="make class-index masks from raw Cityscapes, COCO or ADE20K annotations",
                       description="cityscapes: write *_gtFine_labelTrainIds.png (19 train ids, 255 ignore) next to "
                                   "every gtFine/**/*_gtFine_labelIds.png, with the official label table. "
                                   "coco: write ROOT/masks/<image>.png (81 classes: 0 background, COCO "
                                   "categories in increasing id order -> 1..80) from "
                                   "ROOT/annotations/instances_<split>.json; needs pycocotools "
                                   "(pip install 'dssn[coco]'). ade20k: write ROOT/annotations_mapped/<split>/"
                                   "<name>.png (class ids 0..149, 255 = 'other') from the official "
                                   "ROOT/annotations/<split>/<name>.png (0 = other, 1..150); optional, since "
                                   "training maps the official masks as it loads them (data.ade20k_masks=mapped "
                                   "reads mapped ones). Resumable: existing outputs are skipped, never "
                                   "overwritten unless --overwrite.")
    p.add_argument("dataset", choices=[n for n in DATASETS if DATASETS[n].prepare is not None],
                   help="which dataset's annotations to convert")
    p.add_argument("root", help="the dataset root (Cityscapes: holds gtFine/; COCO: holds annotations/; ADE20K: "
                                "ADEChallengeData2016, holds images/ and annotations/)")
    p.add_argument("--overwrite", action="store_true", help="rewrite masks that already exist (default: skip them)")
    p.add_argument("--splits", nargs="+", default=["train2017", "val2017"],
                   help="coco only: the annotation splits to convert (default train2017 val2017)")
    p.add_argument("--out", help="coco and ade20k: output folder under ROOT (default masks for coco, "
                                 "annotations_mapped for ade20k)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("splits", help="make labeled/unlabeled/val split files from a dataset folder",
                       description="Write labeled.txt, unlabeled.txt and val.txt in the authors' format "
                                   "('image mask' per line, relative to ROOT). Reproducible for a given --seed. "
                                   "The validation set is the layout's official one (PASCAL "
                                   "ImageSets/Segmentation/val.txt, Cityscapes leftImg8bit/val, COCO val2017, "
                                   "ADE20K images/validation, the val_images folder of a folder dataset) unless --val draws it from the "
                                   "images with masks; validation images never enter the training splits. "
                                   "Images without a mask are always unlabeled. Existing split files are never "
                                   "overwritten unless --overwrite.")
    p.add_argument("dataset", choices=[n for n in DATASETS if DATASETS[n].splits_command],
                   help="the dataset's layout")
    p.add_argument("root", help="the dataset root")
    p.add_argument("--labeled", required=True, metavar="AMOUNT",
                   help="labeled images: a count (732), a fraction of the images with masks (1/16, 0.125, "
                        "12.5%%) or 'all'")
    p.add_argument("--val", metavar="AMOUNT", default=None,
                   help="draw this many validation images (count, fraction or %%) from the images with masks "
                        "instead of using the official validation set")
    p.add_argument("--seed", type=int, default=0, help="seed of the random draw (default 0)")
    p.add_argument("--out", help="folder for the three files (default ROOT/splits/<amount>, e.g. splits/1_16)")
    p.add_argument("--meta", help="folder datasets: their dataset.yaml (default ROOT/dataset.yaml)")
    p.add_argument("--overwrite", action="store_true", help="replace split files that already exist")
    p.set_defaults(func=_cmd_splits)

    p = sub.add_parser("check-data", help="check that every listed image and mask exists, decodes and agrees",
                       description="Check the data a config points at: split files parse, every listed file "
                                   "exists and decodes, image and mask sizes agree, mask values are known classes "
                                   "or 255. Prints the counts, the pixel frequency of each class (also drawn as "
                                   "a bar plot PNG) and every problem with its split file and line. Exit code 1 "
                                   "when problems are found. `dssn train` runs the --fast part itself.")
    _add_config_arguments(p, "preset name or path to a YAML config (as for train)")
    p.add_argument("--fast", action="store_true",
                   help="only what train checks: files exist and lines parse, nothing is decoded")
    p.add_argument("--plot", default="check-data.png",
                   help="where to write the class frequency bar plot (default check-data.png; 'none' for no plot)")
    p.add_argument("--workers", type=int, default=1, help="processes decoding files in parallel (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_check_data)


# ---- using a trained network: predict, export ----------------------------------------


def _cmd_predict(args: argparse.Namespace) -> int:
    from dssn.apps.predict import predict_files

    summary = predict_files(args.checkpoint, args.inputs, args.out, config=args.config, overrides=args.set,
                            model=args.model, batch_size=args.batch_size, overwrite=args.overwrite,
                            skip_existing=args.skip_existing, progress=not args.quiet)
    skipped = f", {summary.skipped} skipped (outputs exist)" if summary.skipped else ""
    print(f"{summary.written} image(s) segmented with the {summary.network} ({summary.network_reason}){skipped}: "
          f"{summary.out_dir / 'masks'}, {summary.out_dir / 'overlays'}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from dssn.apps.export import export_checkpoint

    size = tuple(args.size) if args.size else None
    result = export_checkpoint(args.checkpoint, args.format, args.out, config=args.config, overrides=args.set,
                               model=args.model, overwrite=args.overwrite, image_size=size, opset=args.opset,
                               check=not args.no_check)
    for path in result.paths:
        print(f"written: {path}")
    if result.max_abs_diff is not None:
        print(f"onnxruntime matches PyTorch: max |difference| {result.max_abs_diff:.2e}")
    print(f"network: {result.network} ({result.network_reason})")
    return 0


_CHECKPOINT_HELP = ("a dssn checkpoint (last.pt, best.pt), a released .pth (state dict, possibly under 'model' "
                    "with 'module.' prefixes; needs --config) or a .safetensors file from dssn export")
_MODEL_HELP = ("which network: auto (default) takes the one that scored the best mIoU on the checkpoint's last "
               "evaluation (the teacher on a tie or without scores); student or teacher force one; released "
               ".pth files hold one network, 'model'")
_SET_HELP = ("a config override key=value, repeatable: --set eval.mode=sliding --set eval.scales=[0.75,1,1.25] "
             "--set eval.flip=true --set train.device=cpu (on top of the checkpoint's config or --config)")


def _add_inference_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="segment images, folders or globs with a trained network",
                       description="Write OUT/masks/NAME.png (class indices, palette PNG with the dataset's "
                                   "colours, at the image's original size) and OUT/overlays/NAME.jpg (the image "
                                   "and the coloured mask blended in, side by side) for every input image. "
                                   "Class names and palette come from the checkpoint, so no dataset is needed. "
                                   "Inference follows the config's eval section (mode whole or sliding, "
                                   "scales, flip). Existing outputs are never replaced unless --overwrite.")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders (searched recursively; sub-folders are kept in OUT) or glob "
                        "patterns (quote them: 'photos/*.jpg')")
    p.add_argument("--checkpoint", required=True, help=_CHECKPOINT_HELP)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    _add_network_arguments(p)
    p.add_argument("--batch-size", type=int, default=4, help="images per forward pass (same-size images are "
                                                             "batched together; default 4)")
    p.add_argument("--overwrite", action="store_true", help="replace outputs that already exist")
    p.add_argument("--skip-existing", action="store_true",
                   help="leave out images whose outputs already exist (to finish an interrupted run)")
    p.add_argument("--set", action="append", default=[], metavar="key=value", help=_SET_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("export", help="export a trained network to ONNX or safetensors",
                       description="onnx: image [N,3,H,W] (ImageNet-normalised RGB) -> logits [N,C,H,W] with "
                                   "dynamic batch and size, class names and palette in the metadata; checked "
                                   "against PyTorch with onnxruntime (max difference 1e-4). safetensors: the "
                                   "weights only (nothing to unpickle) with the config, class names and palette "
                                   "in the metadata, and the config as YAML beside it (OUT with suffix .yaml); "
                                   "dssn eval / predict read it back. Needs pip install 'dssn[export]'.")
    p.add_argument("--checkpoint", required=True, help=_CHECKPOINT_HELP)
    p.add_argument("--format", required=True, choices=["onnx", "safetensors"], help="output format")
    p.add_argument("--out", required=True, metavar="PATH", help="output file (e.g. model.onnx, model.safetensors)")
    _add_network_arguments(p)
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                   help="onnx: image size used for tracing (default data.crop_size); any size works afterwards")
    p.add_argument("--opset", type=int, default=17, help="onnx: opset version (default 17)")
    p.add_argument("--no-check", action="store_true", help="onnx: skip the onnxruntime comparison")
    p.add_argument("--set", action="append", default=[], metavar="key=value", help=_SET_HELP)
    p.set_defaults(func=_cmd_export)


# ---- run folders: report, compare, sweep ----------------------------------------------------


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
    from dssn.apps.sweep import run_sweep

    results = run_sweep(args.config, args.overrides, out=args.out, dry_run=args.dry_run, compare=not args.no_compare)
    return 1 if any(r.status == "failed" for r in results) else 0


def _add_run_folder_parsers(sub: argparse._SubParsersAction, overrides_help: str) -> None:
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
                                   "folder of run folders (e.g. a demo's) expands into the runs it holds. Runs "
                                   "of several methods on shared seeds are also paired with supervised training "
                                   "seed by seed: the mean difference and its standard error.")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dssn", description="Semi-supervised semantic segmentation with DSSN (ACM MM 2023).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model from a preset or YAML config",
                       description="Train one run. CONFIG is a preset name "
                                   f"({', '.join(preset_names())}) or a YAML file (which may name a preset "
                                   "as 'base: NAME'). Outputs go to run_dir (default runs/NAME-METHOD-TIME): "
                                   "config.yaml, metrics.jsonl, tb/ (TensorBoard), last.pt, best.pt and "
                                   "checkpoints/. Pointed at an existing run folder (run_dir=PATH) it resumes "
                                   "that run from its newest checkpoint, if the config matches (else it lists "
                                   "the differing keys; train.resume=force resumes anyway). To resume: "
                                   "dssn train RUN/config.yaml run_dir=RUN. Several GPUs or machines: "
                                   "torchrun --nproc_per_node=N -m dssn train ..., or srun dssn train ... "
                                   "under SLURM. A preset fixes the paper's global batch "
                                   "(train.global_batch + train.global_batch_unlabeled); each run splits it over "
                                   "its processes and prints the plan (4 + 4 per GPU x 2 GPUs x accumulate 1 = "
                                   "8 + 8); train.max_batch_per_gpu=N accumulates instead of taking more per GPU; "
                                   "train.batch_size=N sets the per-GPU batch by hand (train.lr_scaling="
                                   "none|linear|sqrt). SIGTERM/SIGUSR1 stop after the current step with a "
                                   "checkpoint and exit status 75 (train.requeue=true: scontrol requeue under "
                                   "SLURM); the same command resumes. Speed and memory: train.precision=auto|fp32|bf16|fp16 (auto, the "
                                   "default: bf16 on GPUs with native bf16 and on CPUs with AMX or AVX-512 "
                                   "BF16, else fp32; the log says which), train.accumulate=K, "
                                   "train.channels_last, train.compile=true, model.checkpoint_backbone=true. "
                                   "The EMA teacher's batch norm: method.teacher_bn=released (the default, as "
                                   "the authors' script runs it: batch statistics in the first epoch, running "
                                   "statistics after), batch or running (either for the whole run). Methods: "
                                   f"method.name={'|'.join(METHODS.names())}; networks: "
                                   f"model.name={'|'.join(MODELS.names())}; encoders: "
                                   f"model.backbone={'|'.join(BACKBONES.names())}. " + method_keys_help())
    _add_config_arguments(p, "preset name or path to a YAML config")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("plan", help="show how a config's global batch is split over N processes",
                       description="Print the batch plan a run of CONFIG would use on each number of processes "
                                   "(GPUs): per-process batch x processes x accumulation = the global batch, "
                                   "as 'dssn train' prints it at start; exit status 2 if one cannot be split. "
                                   "Trains nothing.")
    _add_config_arguments(p, "preset name or path to a YAML config")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4, 8], metavar="N",
                   help="numbers of processes to plan for (default 1 2 4 8)")
    p.add_argument("--unit", choices=["GPU", "process"], default="GPU", help="what to call a process")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("eval", help="evaluate a checkpoint on a validation split",
                       description="Evaluate every network in a checkpoint (student and teacher) and print "
                                   "mIoU and per-class IoU (docs/method.md §7). A dssn checkpoint carries its config; "
                                   "override data.root, data.val_split or eval.* to evaluate elsewhere: "
                                   "eval.mode=whole|center_crop|sliding, eval.crop_size=N, "
                                   "eval.scales=[0.75,1.0,1.25] and eval.flip=true (multi-scale / flip "
                                   "averaging). Released .pth files (state dict, under 'model', 'module.' "
                                   "prefixes) need --config to say what network they hold.")
    p.add_argument("checkpoint", help="a dssn checkpoint (last.pt / best.pt), a released .pth (needs --config) "
                                      "or a .safetensors file from dssn export")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    p.add_argument("--config", help="preset or YAML, required for checkpoints that carry no config")
    p.add_argument("--json", help="also write the scores to this JSON file")
    p.add_argument("--out", metavar="DIR", help="write DIR/scores.json and DIR/per_class_iou.csv")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("demo", help="supervised vs DSSN on a built-in task, in minutes on a CPU",
                       description="Builds the task's dataset if absent (--task: glyphs, signs told apart by a "
                                   "hand-drawn digit, from a small pretrained encoder; or synthetic, shapes "
                                   "told apart by texture, from scratch), "
                                   "trains 'supervised' and 'dssn' on the same 1/16 labeled split with the same "
                                   "iteration budget and learning rate, evaluates both and prints a table "
                                   "(also written to OUT/results.md and .json). Each method's student is also "
                                   "compared with supervised seed by seed: the differences, their mean and its "
                                   "standard error (sample standard deviation / sqrt(seeds)).")
    p.add_argument("--out", default="runs/demo", help="folder for the demo's runs and table (default runs/demo)")
    p.add_argument("--task", default="glyphs", choices=[n for n in DATASETS if DATASETS[n].resolve_root],
                   help="the built-in task: its preset and generated dataset (default glyphs)")
    p.add_argument("--data", default=None,
                   help="where the task's dataset is cached (default data/TASK)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="training seeds; one row per method and seed, and the differences to supervised paired "
                        "by seed (e.g. --seeds 0 1 2)")
    p.add_argument("--iters", type=int, default=None, help="iterations per run (default: the task preset's)")
    p.add_argument("--methods", nargs="+", default=["supervised", "dssn"],
                   choices=METHODS.names(), help="methods to compare")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP + "; applied to every run")
    p.set_defaults(func=_cmd_demo)
    _add_data_parsers(sub)
    _add_inference_parsers(sub)
    _add_run_folder_parsers(sub, OVERRIDES_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides written after an option (dssn eval CKPT --config X key=value)
        if isinstance(getattr(args, "overrides", None), list) and all("=" in e and not e.startswith("-")
                                                                         for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except TrainingPreempted as err:  # a clean stop, not a failure: its own exit status (docs/training.md)
        print(err, file=sys.stderr)
        return err.exit_status
    except (DssnError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
