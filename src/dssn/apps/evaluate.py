"""Scoring a saved network on a validation set: ``dssn eval``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from dssn.apps.inference import load_for_inference
from dssn.data import build_val_dataset
from dssn.engine.evaluate import evaluate
from dssn.engine.runtime import make_loader
from dssn.viz.tables import aligned, score


def evaluate_checkpoint(checkpoint: str, config: str | None = None,
                        overrides: list[str] | None = None) -> dict[str, dict]:
    """Score every network in a checkpoint on the configured validation split.

    A dssn checkpoint carries its own config (overrides apply on top); a released
    ``.pth`` (state dict, possibly under ``model`` and with ``module.`` prefixes)
    needs ``config`` to say what it is; a ``.safetensors`` export finds its config
    inside or beside it. Returns per network ``{"miou", "per_class"}`` in percent.
    """
    loaded = load_for_inference(checkpoint, config, overrides)
    cfg, device = loaded.cfg, loaded.device
    e = cfg.eval
    loader = make_loader(build_val_dataset(cfg), e.batch_size, False, 0, min(cfg.data.num_workers, 2), device,
                         drop_last=False)
    results = evaluate(loaded.models, loader, cfg.data.num_classes, device, e.mode,
                       e.crop_size or cfg.data.crop_size, e.stride_ratio, e.scales, e.flip)
    return {name: r.summary(loaded.class_names) for name, r in results.items()}


def iou_table(results: dict[str, dict]) -> str:
    """Per-class IoU (percent) with one column per network, then the mIoU row."""
    names = list(results)
    classes = list(next(iter(results.values()))["per_class"]) if results else []
    rows = [[c, *(score(results[n]["per_class"][c], 2) for n in names)] for c in classes]
    rows.append(["mIoU", *(score(results[n]["miou"], 2) for n in names)])
    return aligned(["class", *names], rows, min_width=8)


def write_scores(results: dict[str, dict], out_dir: str | Path) -> list[Path]:
    """``scores.json`` (everything) and ``per_class_iou.csv`` (class rows, one column per network,
    percent, empty where a class has no IoU; last row mIoU) in ``out_dir``."""
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out / "scores.json", out / "per_class_iou.csv"
    json_path.write_text(json.dumps(results, indent=2))
    names = list(results)
    classes = list(next(iter(results.values()))["per_class"]) if results else []
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", *names])
        for c in classes:
            writer.writerow([c, *("" if results[n]["per_class"][c] is None else f"{results[n]['per_class'][c]:.4f}"
                                  for n in names)])
        writer.writerow(["mIoU", *(f"{results[n]['miou']:.4f}" for n in names)])
    return [json_path, csv_path]
