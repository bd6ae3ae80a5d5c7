"""The report's plots, each a matplotlib ``Figure`` built from a ``RunData`` (Agg, no pyplot).

Per-class lines and bars take the class's palette colour; a thin dark edge keeps
black (PASCAL's background) and very light colours visible.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from dssn.constants import IGNORE
from dssn.data.colors import FADE, NOT_SELECTED_GREY, class_colours, palette_array
from dssn.engine.panels import Panels
from dssn.engine.rundir import RunData

NOT_LOSS = ("lr", "lr_head", "img_s", "selected_w", "selected_t")
OVERALL = "0.45"  # grey: "all classes" lines, never a class colour


def contrast(colour) -> str:
    """Black or white, whichever reads better on ``colour`` (RGB in [0, 1])."""
    return "white" if 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] < 0.5 else "black"


def new_figure(width: float, height: float, rows: int = 1, cols: int = 1):
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def png_bytes(fig: Figure, dpi: int = 90) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _series(records: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    if not pts:
        return np.array([]), np.array([])
    steps, values = zip(*pts)
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def _nested_series(records: list[dict[str, Any]], *keys: str) -> tuple[np.ndarray, np.ndarray]:
    steps, values = [], []
    for r in records:
        v: Any = r
        for k in keys:
            v = v.get(k) if isinstance(v, dict) else None
        steps.append(r["step"])
        values.append(np.nan if v is None else float(v))
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def _no_data(ax, text: str = "no data logged") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _plot_teacher_percent(ax, diag: list[dict[str, Any]], key: str, color: str, ylabel: str, title: str) -> None:
    """A teacher-vs-student diagnostic (a fraction) in percent over iterations, or a note when the
    method has no teacher."""
    steps, values = _series(diag, key)
    if values.size:
        ax.plot(steps, 100 * values, color=color)
    else:
        _no_data(ax, "no teacher in this method")
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)


def _class_legend(ax, n: int) -> None:
    ax.legend(fontsize=7, ncol=2 if n > 10 else 1, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)


def loss_terms(run: RunData) -> list[str]:
    train = run.kind("train")
    keys: list[str] = []
    for r in train:
        for k in r:
            if k not in ("kind", "step", "time", *NOT_LOSS) and k not in keys and isinstance(r[k], (int, float)):
                keys.append(k)
    return keys


def loss_and_lr_figure(run: RunData) -> Figure:
    train = run.kind("train")
    fig, axes = new_figure(11, 3.6, 1, 2)
    ax, ax_lr = axes[0]
    terms = loss_terms(run)
    plotted = False
    for k in terms:
        steps, values = _series(train, k)
        if values.size and np.any(values > 0):
            ax.plot(steps, values, label="total loss" if k == "loss" else f"L_{k}",
                    lw=2.0 if k == "loss" else 1.2, color="black" if k == "loss" else None)
            plotted = True
    if plotted:
        ax.set_yscale("log")
        ax.legend(fontsize=8, frameon=False)
    else:
        _no_data(ax)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (mean over log interval, log scale)")
    ax.set_title("loss terms (unweighted)")
    ax.grid(alpha=0.3)
    for key, label in (("lr", "backbone"), ("lr_head", "head (lr x lr_multi)")):
        steps, values = _series(train, key)
        if values.size:
            ax_lr.plot(steps, values, label=label)
    ax_lr.set_xlabel("iteration")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_title("learning rates (poly schedule)")
    ax_lr.grid(alpha=0.3)
    if train:
        ax_lr.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def miou_figure(run: RunData) -> Figure:
    evals = run.kind("eval")
    fig, axes = new_figure(6.5, 3.6)
    ax = axes[0][0]
    models = [k for k in (evals[-1] if evals else {}) if isinstance(evals[-1][k], dict) and "miou" in evals[-1][k]]
    for model in models:
        steps, values = _nested_series(evals, model, "miou")
        ax.plot(steps, values, marker="o", ms=4, label=model)
    if models:
        ax.legend(fontsize=8, frameon=False)
    else:
        _no_data(ax, "no evaluation yet")
    ax.set_xlabel("iteration")
    ax.set_ylabel("mIoU (%)")
    ax.set_title("validation mIoU")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def per_class_iou_figure(run: RunData) -> Figure:
    final = run.final()
    names = run.class_names
    colours = class_colours(run.palette, len(names))
    fig, axes = new_figure(max(6.5, 0.55 * len(names) + 2.5), 4.2)
    ax = axes[0][0]
    models = list(final)
    width = 0.8 / max(1, len(models))
    x = np.arange(len(names))
    hatches = ["", "//", "..", "xx"]
    handles: list = []
    for k, model in enumerate(models):
        per_class = final[model]["per_class"]
        values = [per_class.get(n) for n in names]
        heights = [0 if v is None else v for v in values]
        hatch = hatches[k % len(hatches)]
        bars = ax.bar(x + (k - (len(models) - 1) / 2) * width, heights, width, color=colours,
                      edgecolor="0.2", linewidth=0.6, hatch=hatch)
        for bar, colour in zip(bars, colours):
            if hatch and hasattr(bar, "set_hatchcolor"):  # matplotlib >= 3.10: hatch visible on dark classes
                bar.set_hatchcolor(contrast(colour))
        handles.append(Patch(facecolor="0.6", edgecolor="0.2", hatch=hatch,
                             label=f"{model} (mIoU {final[model]['miou']:.1f})"))
        for bar, v in zip(bars, values):
            ax.annotate("n/a" if v is None else f"{v:.0f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=6, xytext=(0, 1), textcoords="offset points")
    ax.set_xticks(x, names, rotation=45 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center",
                  fontsize=8)
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 105)
    ax.set_title("per-class IoU at the end of training (bars in class colours)", fontsize=10)
    if models:
        ax.legend(handles=handles, fontsize=8, frameon=False, loc="upper right")
    else:
        _no_data(ax, "no evaluation yet")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def selection_figure(run: RunData) -> Figure:
    """Selected fraction of each class's pseudo-labelled pixels over time, and CPLG's thresholds."""
    diag = [r for r in run.kind("diag") if "selected" in r]
    names = run.class_names
    colours = class_colours(run.palette, len(names))
    fig, axes = new_figure(12, 3.8, 1, 2)
    ax, ax_thr = axes[0]
    if diag:
        for name, colour in zip(names, colours):
            steps, values = _nested_series(diag, "selected", name)
            ax.plot(steps, 100 * values, color=colour, label=name, lw=1.3)
        steps, values = _series(run.kind("train"), "selected_t")
        if not values.size:  # fixmatch: no teacher, one selection
            steps, values = _series(run.kind("train"), "selected_w")
        if values.size:
            ax.plot(steps, 100 * values, color=OVERALL, ls="--", lw=2, label="all classes")
        _class_legend(ax, len(names))
        thr_records = [r for r in diag if "cplg_threshold" in r]
        for name, colour in zip(names, colours):
            steps, values = _nested_series(thr_records, "cplg_threshold", name)
            ax_thr.plot(steps, values, color=colour, label=name, marker=".", ms=3, lw=1.1)
        m = run.config.get("method", {})
        tau, ratio = m.get("tau_low", 0.92), m.get("ratio", 0.96)
        ax_thr.set_ylim(ratio * tau - 0.01, ratio + 0.01)  # an active class's threshold lies in (r*tau, r]
    else:
        _no_data(ax, "no pseudo labels (supervised run or diagnostics off)")
        _no_data(ax_thr, "no pseudo labels")
    ax.set_xlabel("iteration")
    ax.set_ylabel("% of pseudo-labelled pixels selected")
    ax.set_title("selected pixels per class (teacher pseudo labels)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax_thr.set_xlabel("iteration")
    ax_thr.set_ylabel("threshold r x max prob (mean over images)")
    ax_thr.set_title("CPLG class thresholds (gaps: class not active)")
    ax_thr.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def cplg_vs_fixed_figure(run: RunData) -> Figure | None:
    diag = [r for r in run.kind("diag") if "counts" in r]
    if not diag:
        return None
    counts = diag[-1]["counts"]
    names = run.class_names
    colours = class_colours(run.palette, len(names))
    thr = run.info.get("fixed_threshold", 0.95)
    pseudo = np.array([counts["pseudo"].get(n) or 0 for n in names], dtype=float)
    cplg = np.array([counts["cplg"].get(n) or 0 for n in names], dtype=float)
    fixed = np.array([counts["fixed"].get(n) or 0 for n in names], dtype=float)
    fig, axes = new_figure(max(7.0, 0.7 * len(names) + 2.5), 4.2)
    ax = axes[0][0]
    x = np.arange(len(names))
    w = 0.27
    ax.bar(x - w, pseudo, w, color="none", edgecolor=colours, linewidth=1.2, label="pseudo-labelled (all)")
    ax.bar(x, cplg, w, color=colours, edgecolor="0.2", linewidth=0.6, label="selected by CPLG")
    ax.bar(x + w, fixed, w, color=colours, edgecolor="0.2", linewidth=0.6, hatch="///", alpha=0.55,
           label=f"selected by max prob >= {thr:g}")
    for i in range(len(names)):
        if fixed[i] > 0:
            text = f"x{cplg[i] / fixed[i]:.2g}"
        else:
            text = "x inf" if cplg[i] > 0 else ""
        top = max(pseudo[i], cplg[i], fixed[i], 1)
        ax.annotate(text, (x[i], top), ha="center", va="bottom", fontsize=7, xytext=(0, 2),
                    textcoords="offset points")
    ax.set_yscale("symlog", linthresh=10)
    ax.set_xticks(x, names, rotation=45 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center",
                  fontsize=8)
    ax.set_ylabel("pixels, summed over log steps (log scale)")
    ax.set_title(f"CPLG vs a fixed {thr:g} threshold on the same teacher predictions, up to iteration "
                 f"{diag[-1]['step']} (numbers: CPLG / fixed)", fontsize=9)
    handles = [Patch(facecolor="none", edgecolor="0.3", label="pseudo-labelled (all valid pixels)"),
               Patch(facecolor="0.45", edgecolor="0.2", label="selected by CPLG"),
               Patch(facecolor="0.45", edgecolor="0.2", hatch="///", alpha=0.55,
                     label=f"selected by max prob >= {thr:g}")]
    ax.legend(handles=handles, fontsize=8, frameon=False, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def health_figure(run: RunData) -> Figure:
    diag = run.kind("diag")
    fig, axes = new_figure(12, 6.6, 2, 2)
    ax_sim, ax_dist = axes[0]
    ax_share, ax_agree = axes[1]
    sim = [r for r in diag if "similarity" in r]
    if sim:
        for level, label, colour in (("img", "image level (q1, q2)", "tab:blue"),
                                     ("feat", "feature level (f1, f2)", "tab:orange")):
            steps, pos = _nested_series(sim, "similarity", f"{level}_pos")
            if np.isfinite(pos).any():
                _, rand = _nested_series(sim, "similarity", f"{level}_rand")
                ax_sim.plot(steps, pos, color=colour, label=f"{label}: same pixel")
                ax_sim.plot(steps, rand, color=colour, ls=":", label=f"{label}: random pixels")
        ax_sim.legend(fontsize=7, frameon=False)
        ax_sim.set_ylim(0, 1.02)
    else:
        _no_data(ax_sim, "no alignment in this method")
    ax_sim.set_xlabel("iteration")
    ax_sim.set_ylabel("mean Gaussian similarity")
    ax_sim.set_title("positive vs random pixel pairs (healthy: solid above dotted)", fontsize=9)
    ax_sim.grid(alpha=0.3)

    _plot_teacher_percent(ax_dist, diag, "teacher_distance", "tab:purple", "||T - S|| / ||S|| (%)",
                          "teacher-student parameter distance")

    shares = [r for r in diag if r.get("share")]
    if shares:
        terms = list(shares[-1]["share"])
        steps = np.array([r["step"] for r in shares], dtype=float)
        stack = np.array([[100 * r["share"].get(t, 0.0) for r in shares] for t in terms])
        ax_share.stackplot(steps, stack, labels=[f"L_{t}" for t in terms], alpha=0.85)
        ax_share.legend(fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1.01, 0.5))
        ax_share.set_ylim(0, 100)
    else:
        _no_data(ax_share)
    ax_share.set_xlabel("iteration")
    ax_share.set_ylabel("% of the weighted total loss")
    ax_share.set_title("share of each loss term", fontsize=9)

    _plot_teacher_percent(ax_agree, diag, "agreement", "tab:green", "% of pixels with the same argmax",
                          "student / teacher agreement on the weak view")
    fig.tight_layout()
    return fig


def throughput_figure(run: RunData) -> Figure:
    fig, axes = new_figure(6.5, 3.4)
    ax = axes[0][0]
    steps, values = _series(run.kind("train"), "img_s")
    if values.size:
        ax.plot(steps, values, color="tab:blue")
        ax.axhline(float(np.median(values)), color=OVERALL, ls="--", lw=1, label=f"median {np.median(values):.3g}")
        ax.legend(fontsize=8, frameon=False)
        ax.set_ylim(0, max(values) * 1.15)
    else:
        _no_data(ax)
    ax.set_xlabel("iteration")
    ax.set_ylabel("training images / s")
    ax.set_title("throughput (labeled + unlabeled images, evaluation excluded)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def fmt_seconds(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def legend_handles(class_names: list[str], palette: list[int], extra: bool = True) -> list:
    table = palette_array(palette)
    handles = [Patch(facecolor=table[c] / 255, edgecolor="0.3", linewidth=0.5, label=name)
               for c, name in enumerate(class_names)]
    if extra:
        handles.append(Patch(facecolor=table[IGNORE] / 255, edgecolor="0.3", linewidth=0.5, label="ignore / padding"))
    return handles


def panels_figure(panels: Panels, class_names: list[str], palette: list[int]):
    """One labelled matplotlib ``Figure``: each row a validation image (image | ground truth | each
    model's prediction) and, to the right, an unlabeled weak view with its pseudo label (unselected
    pixels faded to grey); column titles on top, a legend of the class colours below."""
    val_rows, unl_rows = panels.val_tiles(palette), panels.unl_tiles(palette)
    # (grid column, title, rows of tiles, index in a row)
    columns = [(c, title, val_rows, c) for c, title in enumerate(panels.val_columns())]
    n_val = len(columns)
    if unl_rows:
        columns += [(n_val + 1 + c, title, unl_rows, c)
                    for c, title in enumerate(["unlabeled weak view", "pseudo label"])]
    n_rows = max(len(val_rows), len(unl_rows))
    tile, gap = 1.75, (0.35 if unl_rows else 0.0)
    n_entries = len(class_names) + 1 + (1 if unl_rows else 0)
    width = tile * len(columns) + gap + 0.5
    ncol_legend = max(1, min(n_entries, int(width / 1.3)))
    legend_h = 0.24 * -(-n_entries // ncol_legend) + 0.15
    top_h = 0.65
    height = tile * n_rows + top_h + legend_h
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    ratios = [1.0] * n_val + ([gap / tile, 1.0, 1.0] if unl_rows else [])
    spec = fig.add_gridspec(n_rows, len(ratios), width_ratios=ratios, left=0.4 / width, right=1 - 0.1 / width,
                            top=1 - top_h / height, bottom=legend_h / height, wspace=0.05, hspace=0.05)
    for r in range(n_rows):
        for k, (col, title, rows, idx) in enumerate(columns):
            ax = fig.add_subplot(spec[r, col])
            ax.set_xticks([])
            ax.set_yticks([])
            if r < len(rows):
                ax.imshow(rows[r][idx], interpolation="nearest")
            else:
                ax.axis("off")
            if r == 0:
                ax.set_title(title, fontsize=9)
            if k == 0 and r < len(panels.names):
                ax.set_ylabel(Path(panels.names[r]).stem, fontsize=8)
    handles = legend_handles(class_names, palette)
    if unl_rows:
        example = (1 - FADE) * palette_array(palette)[1] / 255 + FADE * NOT_SELECTED_GREY / 255
        handles.append(Patch(facecolor=example, edgecolor="0.3", linewidth=0.5,
                             label="not selected (class colour faded to grey)"))
    what = "validation predictions" + (" | teacher pseudo labels on unlabeled views" if unl_rows else "")
    fig.suptitle(f"{what}, iteration {panels.step}", fontsize=10, y=1 - 0.1 / height)
    fig.legend(handles=handles, loc="lower center", ncol=ncol_legend, fontsize=8, frameon=False)
    return fig
