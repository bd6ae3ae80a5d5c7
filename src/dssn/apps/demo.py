"""``dssn demo``: supervised against DSSN on a built-in task, same labels, same budget."""

from __future__ import annotations

import json
import platform
from datetime import datetime
from pathlib import Path

import torch

from dssn.apps.train import train
from dssn.config import load_config
from dssn.data.catalog import dataset_spec
from dssn.errors import TrainingError
from dssn.files import atomic_write_text
from dssn.registry import DATASETS
from dssn.viz.compare import compare_runs
from dssn.viz.paired import paired_by_seed, paired_lines, paired_table
from dssn.viz.tables import markdown, score


def _table(rows: list[dict], class_names: list[str]) -> str:
    head = ["method", "mIoU", "teacher mIoU", *class_names, "wall time (s)", "seed"]
    return markdown(head, [[r["method"], score(r["miou"], 2), score(r["teacher_miou"], 2),
                            *(score(v) for v in r["per_class"].values()), f"{r['wall_time']:.0f}", str(r["seed"])]
                           for r in rows])


def _write_results(out_dir: Path, task: str, rows: list[dict]) -> str:
    """Write ``results.md`` and ``results.json`` for the runs so far; return the table."""
    table = _table(rows, list(rows[0]["per_class"]))
    paired = paired_by_seed(rows)
    if paired:
        table += "\n\n" + paired_table(paired) + "\n\n" + "\n".join(paired_lines(paired))
    machine = (f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads")
    atomic_write_text(out_dir / "results.md", f"# dssn demo: {task}\n\n{machine}\n\n{table}\n")
    atomic_write_text(out_dir / "results.json", json.dumps({"task": task, "runs": rows, "paired": paired}, indent=2))
    return table


def demo_tasks() -> list[str]:
    """The built-in tasks ``dssn demo`` runs: each generated dataset (one with a
    ``resolve_root`` in the dataset registry) and the preset of the same name."""
    return [name for name in DATASETS if DATASETS[name].resolve_root is not None]


def run_demo(out_dir: Path | None = None, seeds: list[int] = (0,), iters: int | None = None,
             data_root: Path | None = None, methods: list[str] = ("supervised", "dssn"),
             overrides: list[str] = (), task: str = "glyphs") -> list[dict]:
    """Train each method on the same 1/16 split for each seed; print and save the table.

    ``task`` names a built-in task (:func:`demo_tasks`): the preset of that name and the dataset
    it generates under ``data_root`` (default ``data/<task>``): ``glyphs`` (the default: signs
    told apart by a digit, from a small pretrained encoder; docs/findings.md, finding 18) or
    ``synthetic`` (textures from scratch, where DSSN's margin is within seed noise).

    Every method trains at the preset's learning rate, as the authors' supervised
    baseline does (on the built-in dataset it is also supervised training's best
    measured rate; docs/findings.md). The mIoU column is the student's final score
    for every method, so each row is the same network trained for the same number of
    iterations; DSSN's EMA teacher is shown beside it. With the supervised baseline among
    ``methods``, every other method's student is also compared with it seed by seed
    (:func:`paired_by_seed`), in the table and in ``results.json`` (``{"runs", "paired"}``),
    both rewritten after every run so that a stopped demo keeps the runs that finished.
    """
    out_dir = out_dir or Path("runs") / f"demo-{datetime.now():%Y%m%d-%H%M%S}"
    if out_dir.exists() and any(out_dir.iterdir()):
        raise TrainingError(f"demo folder '{out_dir}' exists and is not empty; pass --out NEW_FOLDER")
    if task not in demo_tasks():
        raise TrainingError(f"unknown demo task '{task}': choose one of {', '.join(demo_tasks())}")
    data_root = dataset_spec(task).resolve_root(data_root or Path("data") / task, progress=True)
    print(f"dataset: {data_root}")
    rows = []
    for seed in seeds:
        for method in methods:
            extra = [f"train.iters={iters}"] if iters else []
            cfg = load_config(task, [f"method.name={method}", f"train.seed={seed}", f"data.root={data_root}",
                                            f"run_dir={out_dir / f'{method}-seed{seed}'}", *extra, *overrides])
            print(f"\n== {method}, seed {seed}: {cfg.train.iters} iterations on {cfg.data.labeled_split} ==")
            result = train(cfg)
            student = result.final["student"]
            teacher = result.final.get("teacher")
            rows.append({"method": method, "seed": seed, "miou": student["miou"],
                         "teacher_miou": teacher["miou"] if teacher else None,
                         "per_class": student["per_class"], "wall_time": result.wall_time,
                         "iters": result.iters, "run_dir": str(result.run_dir)})
            table = _write_results(out_dir, task, rows)  # after every run: a stopped demo keeps what finished
    print("\n" + table)
    print(f"\nwritten: {out_dir / 'results.md'}")
    print()
    compare_runs([r["run_dir"] for r in rows], out_dir)  # per-class winners: compare.md/.csv/.png
    return rows
