"""``dssn report RUN``: one self-contained HTML page (plots embedded as base64 PNG) about a run.

Sections (each an ``<h2 id=...>``): summary, warnings, config, losses, miou,
per-class-iou, selection, cplg-vs-fixed, health, predictions, timing.
Written at the end of training when ``train.report`` is true; the command
rebuilds it at any time, also for a run still in progress.
"""

from __future__ import annotations

import base64
import html
import math
from datetime import datetime
from pathlib import Path

import yaml

from dssn.config import DiagConfig
from dssn.engine.panels import Panels
from dssn.engine.rundir import REPORT_NAME, RunData, load_run
from dssn.viz import plots

SECTIONS = ("summary", "warnings", "config", "losses", "miou", "per-class-iou", "selection", "cplg-vs-fixed",
            "health", "predictions", "timing")

CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1180px;
       color: #222; padding: 0 16px; }
h1 { font-size: 24px; margin-bottom: 4px; } h2 { font-size: 19px; border-bottom: 1px solid #ddd;
       padding-bottom: 4px; margin-top: 30px; }
.sub { color: #666; font-size: 13px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; } th { background: #f4f4f4; }
td.l, th.l { text-align: left; }
img { max-width: 100%; display: block; margin: 8px 0; }
pre { background: #f7f7f7; padding: 10px; font-size: 12px; max-height: 420px; overflow: auto; }
.warn { background: #fff4e5; border-left: 4px solid #f0a020; padding: 6px 10px; margin: 6px 0; }
.ok { background: #eef8ee; border-left: 4px solid #4a4; padding: 6px 10px; }
.swatch { display: inline-block; width: 11px; height: 11px; border: 1px solid #555; margin-right: 5px;
          vertical-align: -1px; }
p.note { font-size: 13px; color: #444; max-width: 900px; }
"""


def _img(fig_or_bytes, alt: str) -> str:
    data = fig_or_bytes if isinstance(fig_or_bytes, bytes) else plots.png_bytes(fig_or_bytes)
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _f(v, digits: int = 2, scale: float = 1.0) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v * scale:.{digits}f}"


def _swatch(palette: list[int], c: int) -> str:
    r, g, b = (palette[3 * c: 3 * c + 3] + [0, 0, 0])[:3]
    return f'<span class="swatch" style="background: rgb({r},{g},{b})"></span>'


def _summary(run: RunData) -> str:
    final, res = run.final(), run.result or {}
    cfg = run.config
    rows = [("run folder", html.escape(str(run.path.resolve()))), ("method", html.escape(run.method)),
            ("dataset", html.escape(f"{cfg.get('data', {}).get('dataset', '?')} "
                                    f"({cfg.get('data', {}).get('labeled_split', '')})")),
            ("status", "finished" if run.finished else
             ("in progress or interrupted" if not res else f"stopped at {res.get('iters')}/{res.get('total_iters')}"))]
    steps = [r["step"] for r in run.kind("train")]
    if steps:
        rows.append(("iterations logged", f"{steps[-1]} / {run.info.get('total_iters', '?')}"))
    for model, s in final.items():
        rows.append((f"final mIoU ({model})", f"<b>{s['miou']:.2f}</b>"))
    if res.get("best_miou") is not None:
        rows.append(("best mIoU (any model, any evaluation)", f"{res['best_miou']:.2f}"))
    body = "".join(f'<tr><th class="l">{k}</th><td class="l">{v}</td></tr>' for k, v in rows)
    return f"<table>{body}</table>"


def _warnings(run: RunData) -> str:
    warns = run.kind("warning")
    if not warns:
        grace = run.info.get("grace_step")
        after = f" (rules apply from iteration {grace})" if grace else ""
        return f'<div class="ok">No sign of failure was detected{after}.</div>'
    by_rule: dict[str, list[dict]] = {}
    for w in warns:
        by_rule.setdefault(w["rule"], []).append(w)
    out = []
    for rule, items in by_rule.items():
        steps = [w["step"] for w in items]
        out.append(f'<div class="warn"><b>{html.escape(rule)}</b>: {html.escape(items[-1]["message"])} '
                   f'<span class="sub">({len(items)} log step(s), iterations {steps[0]}..{steps[-1]})</span></div>')
    return "".join(out)


def _per_class_table(run: RunData) -> str:
    names, palette, final = run.class_names, run.palette, run.final()
    diag = [r for r in run.kind("diag") if "counts" in r]
    counts = diag[-1]["counts"] if diag else None
    sel = [r for r in run.kind("diag") if "selected_cum" in r]
    head = ["class", *(f"IoU {m}" for m in final)]
    if sel:
        head.append("selected over training (%)")
    if counts:
        thr = run.info.get("fixed_threshold", 0.95)
        head += ["pseudo-labelled px", "CPLG px", f"fixed {thr:g} px", "CPLG / fixed"]
    rows = []
    for c, name in enumerate(names):
        cells = [f'<td class="l">{_swatch(palette, c)}{html.escape(name)}</td>']
        cells += [f"<td>{_f(final[m]['per_class'].get(name), 1)}</td>" for m in final]
        if sel:
            cells.append(f"<td>{_f(sel[-1]['selected_cum'].get(name), 1, 100)}</td>")
        if counts:
            p, k, f = (counts[x].get(name) or 0 for x in ("pseudo", "cplg", "fixed"))
            ratio = "-" if not k else ("inf" if not f else f"{k / f:.2f}")
            cells += [f"<td>{int(p):,}</td>", f"<td>{int(k):,}</td>", f"<td>{int(f):,}</td>", f"<td>{ratio}</td>"]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    header = "".join(f'<th class="{"l" if i == 0 else ""}">{html.escape(h)}</th>' for i, h in enumerate(head))
    return f"<table><tr>{header}</tr>{''.join(rows)}</table>"


def _timing(run: RunData) -> str:
    res, info = run.result or {}, run.info
    train = run.kind("train")
    img_s = [r["img_s"] for r in train if r.get("img_s")]
    timing = run.kind("timing")
    ipe = info.get("iters_per_epoch")
    if res:
        train_s, eval_s, wall = res.get("train_time"), res.get("eval_time"), res.get("wall_time")
        mean_img_s, epoch_s = res.get("images_per_s"), res.get("time_per_epoch")
    else:
        train_s = timing[-1]["train_s"] if timing else None
        eval_s = sum(t["eval_s"] for t in timing) if timing else None
        wall = None
        mean_img_s = timing[-1]["img_s"] if timing else (sum(img_s) / len(img_s) if img_s else None)
        last = timing[-1]["step"] if timing else None
        epoch_s = train_s / last * ipe if (train_s and last and ipe) else None
    evals = len(timing) or len(run.kind("eval"))
    rows = [
        ("images / s (training, evaluation excluded)", _f(mean_img_s, 2)),
        ("images per iteration (labeled + unlabeled)", str(info.get("images_per_step", "-"))),
        ("time per epoch (training only)", plots.fmt_seconds(epoch_s)),
        ("iterations per epoch", str(ipe or "-")),
        ("training time", plots.fmt_seconds(train_s)),
        ("evaluation time (all evaluations)", f"{plots.fmt_seconds(eval_s)} over {evals} evaluation(s)"),
        ("wall time", plots.fmt_seconds(wall)),
    ]
    body = "".join(f'<tr><th class="l">{k}</th><td>{v}</td></tr>' for k, v in rows)
    return f"<table>{body}</table>" + _img(plots.throughput_figure(run), "throughput")


def _predictions(run: RunData) -> str:

    path = run.path / "panels" / "latest.npz"
    if not path.is_file():
        return '<p class="note">No image panels were saved (diag.panels=0, or no evaluation yet).</p>'
    panels = Panels.load(path)
    note = ('<p class="note">The first validation images with their ground truth and each network\'s '
            "prediction at the last evaluation" + ("; on the right, unlabeled weak views with the pseudo label "
                                                  "the method trains on, the pixels its selection rejects "
                                                  "faded to grey" if panels.unl_image is not None else "")
            + ". Colours are the dataset's palette.</p>")
    return note + _img(plots.panels_figure(panels, run.class_names, run.palette), "example predictions")


def _rules_note(run: RunData) -> str:

    d = {**DiagConfig().model_dump(), **{k: v for k, v in run.config.get("diag", {}).items()
                                          if k in DiagConfig.model_fields}}
    return ('<p class="note">Rules (thresholds are <code>diag.*</code> config keys; checked at every log step '
            f"from iteration {run.info.get('grace_step', '?')}, reported once a rule has held at "
            f"{d['patience']} consecutive log steps): the alignment term is above "
            f"{100 * d['max_align_share']:g}% of the weighted loss (dominating) or below "
            f"{100 * d['min_align_share']:g}% (vanishing); random pixel pairs are more than "
            f"{d['max_random_similarity']:g} similar (collapse: every pixel gets the same output); the teacher's "
            f"selected fraction fell below {d['collapse_ratio']:g} of its best (collapsing) or is below "
            f"{100 * d['min_selected']:g}% half-way through training (starved); the teacher-student parameter "
            f"distance is above {100 * d['max_teacher_distance']:g}% or the teacher's mIoU is "
            f"{d['max_teacher_gap']:g} points below the student's at an evaluation (teacher diverging); of the "
            "pixels whose truth is not a network's most-predicted class, under "
            f"{100 * d['min_prediction_spread']:g}% get another class at an evaluation (single class).</p>")


def build_html(run: RunData) -> str:
    title = f"dssn run report: {html.escape(run.name)}"
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title><style>{CSS}</style>"
             f"</head><body><h1>{title}</h1>",
             f'<div class="sub">{html.escape(run.method)} &middot; generated {datetime.now():%Y-%m-%d %H:%M} '
             f"&middot; {html.escape(str(run.path))}</div>"]

    def section(sid: str, heading: str, body: str) -> None:
        parts.append(f'<h2 id="{sid}">{heading}</h2>{body}')

    section("summary", "Summary", _summary(run))
    section("warnings", "Health warnings", _warnings(run) + _rules_note(run))
    config_text = yaml.safe_dump(run.config, sort_keys=False, default_flow_style=None)
    section("config", "Config", f"<pre>{html.escape(config_text)}</pre>")
    section("losses", "Losses and learning rates", _img(plots.loss_and_lr_figure(run), "loss curves"))
    section("miou", "Validation mIoU", _img(plots.miou_figure(run), "mIoU curves"))
    section("per-class-iou", "Per-class IoU", _img(plots.per_class_iou_figure(run), "per-class IoU")
            + _per_class_table(run))
    section("selection", "Pseudo-label selection over time",
            '<p class="note">Share of the pixels the teacher labels as each class that the selection keeps '
            "(CutMix-ed view 1, valid pixels), and CPLG's per-class thresholds r&middot;max P averaged over the "
            "images where the class is active (max P &gt; tau_low).</p>"
            + _img(plots.selection_figure(run), "selection"))
    fig = plots.cplg_vs_fixed_figure(run)
    section("cplg-vs-fixed", "CPLG against a fixed threshold",
            '<p class="note">On the same teacher predictions at every log step, how many pixels of each class '
            "CPLG selects and how many a fixed confidence threshold would. A fixed threshold starves the "
            "classes the network is less sure of (the long tail); CPLG keeps the top pixels of every class it "
            "sees confidently.</p>" + (_img(fig, "CPLG vs fixed") if fig is not None else
                                        '<p class="note">No pseudo labels in this run.</p>'))
    section("health", "Health checks",
            '<p class="note">Gaussian similarity exp(-||z - z\'||&sup2; / 2C) of per-pixel standardised logits: '
            "1 for identical pixels, about 0.37 for unrelated ones. Positive pairs are the same pixel in the two "
            "strong views (image level) or the two perturbed feature streams (feature level).</p>"
            + _img(plots.health_figure(run), "health checks"))
    section("predictions", "Example predictions", _predictions(run))
    section("timing", "Timing", _timing(run))
    parts.append("</body></html>")
    return "".join(parts)


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the run's HTML report (default ``RUN/report.html``); returns its path."""
    run = load_run(run_dir)
    path = Path(out) if out else run.path / REPORT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(build_html(run))
    tmp.replace(path)
    return path
