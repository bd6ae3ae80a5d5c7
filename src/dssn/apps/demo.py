"""``dssn demo``: supervised against DSSN on the built-in dataset, same labels, same budget."""

from __future__ import annotations

import json
import platform
from datetime import datetime
from pathlib import Path

import torch

from dssn.apps.train import train
from dssn.config import load_config
from dssn.data.synthetic import resolve_synthetic
from dssn.errors import TrainingError
from dssn.files import atomic_write_text
from dssn.viz.compare import compare_runs
from dssn.viz.tables import markdown, paired_difference, score, signed

BASELINE = "supervised"


def _table(rows: list[dict], class_names: list[str]) -> str:
    head = ["method", "mIoU", "teacher mIoU", *class_names, "wall time (s)", "seed"]
    return markdown(head, [[r["method"], score(r["miou"], 2), score(r["teacher_miou"], 2),
                            *(score(v) for v in r["per_class"].values()), f"{r['wall_time']:.0f}", str(r["seed"])]
                           for r in rows])


def paired_by_seed(rows: list[dict], baseline: str = BASELINE) -> dict[str, dict]:
    """Per method other than ``baseline``: its student's mIoU minus the baseline's, seed by seed
    (the seeds both ran), their mean and its standard error; {} without the baseline."""
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


def _paired_table(paired: dict[str, dict]) -> str:
    seeds = list(dict.fromkeys(seed for p in paired.values() for seed in p["seeds"]))
    rows = []
    for method, p in paired.items():
        by_seed = dict(zip(p["seeds"], p["differences"]))
        rows.append([f"{method} - {p['baseline']}", *(signed(by_seed[s]) if s in by_seed else "-" for s in seeds),
                     signed(p["mean"]), score(p["std_error"], 2)])
    return markdown(["student mIoU", *(f"seed {s}" for s in seeds), "mean", "standard error"], rows)


def _paired_lines(paired: dict[str, dict]) -> list[str]:
    lines = []
    for method, p in paired.items():
        n = len(p["seeds"])
        spread = (f"standard error {p['std_error']:.2f}" if p["std_error"] is not None
                  else "no standard error from one seed: add --seeds 0 1 2")
        lines.append(f"{method} minus {p['baseline']}, student mIoU paired by seed over {n} seed{'s' * (n > 1)}: "
                     f"mean {signed(p['mean'])} points, {spread}")
    return lines


def run_demo(out_dir: Path | None = None, seeds: list[int] = (0,), iters: int | None = None,
             data_root: Path = Path("data/synthetic"), methods: list[str] = ("supervised", "dssn"),
             overrides: list[str] = ()) -> list[dict]:
    """Train each method on the same 1/16 split for each seed; print and save the table.

    Every method trains at the preset's learning rate, as the authors' supervised
    baseline does (on the built-in dataset it is also supervised training's best
    measured rate; docs/findings.md). The mIoU column is the student's final score
    for every method, so each row is the same network trained for the same number of
    iterations; DSSN's EMA teacher is shown beside it. With the supervised baseline among
    ``methods``, every other method's student is also compared with it seed by seed
    (:func:`paired_by_seed`), in the table and in ``results.json`` (``{"runs", "paired"}``).
    """
    out_dir = out_dir or Path("runs") / f"demo-{datetime.now():%Y%m%d-%H%M%S}"
    if out_dir.exists() and any(out_dir.iterdir()):
        raise TrainingError(f"demo folder '{out_dir}' exists and is not empty; pass --out NEW_FOLDER")
    data_root = resolve_synthetic(data_root, progress=True)
    print(f"dataset: {data_root}")
    rows = []
    for seed in seeds:
        for method in methods:
            extra = [f"train.iters={iters}"] if iters else []
            cfg = load_config("synthetic", [f"method.name={method}", f"train.seed={seed}", f"data.root={data_root}",
                                            f"run_dir={out_dir / f'{method}-seed{seed}'}", *extra, *overrides])
            print(f"\n== {method}, seed {seed}: {cfg.train.iters} iterations on {cfg.data.labeled_split} ==")
            result = train(cfg)
            student = result.final["student"]
            teacher = result.final.get("teacher")
            rows.append({"method": method, "seed": seed, "miou": student["miou"],
                         "teacher_miou": teacher["miou"] if teacher else None,
                         "per_class": student["per_class"], "wall_time": result.wall_time,
                         "iters": result.iters, "run_dir": str(result.run_dir)})
    class_names = list(rows[0]["per_class"])
    table = _table(rows, class_names)
    paired = paired_by_seed(rows)
    if paired:
        table += "\n\n" + _paired_table(paired) + "\n\n" + "\n".join(_paired_lines(paired))
    machine = f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    atomic_write_text(out_dir / "results.md", f"# dssn demo\n\n{machine}\n\n{table}\n")
    atomic_write_text(out_dir / "results.json", json.dumps({"runs": rows, "paired": paired}, indent=2))
    print("\n" + table)
    print(f"\nwritten: {out_dir / 'results.md'}")
    print()
    compare_runs([r["run_dir"] for r in rows], out_dir)  # per-class winners: compare.md/.csv/.png
    return rows
