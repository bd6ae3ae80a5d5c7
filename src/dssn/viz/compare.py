"""``dssn compare RUN...``: mIoU and per-class IoU across runs, and which classes each one wins.

Writes ``compare.md`` (table, winners in bold), ``compare.csv`` and ``compare.png``
(mIoU per run; per-class IoU grouped by class, a star over each class's winner);
for runs of a sweep (or with ``against``), also ``sweep.png``: mIoU against the
swept values.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dssn.data.colors import class_colours
from dssn.engine.rundir import RunData, RunFolderError, load_run
from dssn.viz.paired import paired_by_seed, paired_lines, paired_table
from dssn.viz.tables import markdown, score

TIE = 0.05
"""IoU points within which two runs share a class win."""
IGNORED_KEYS = ("run_dir", "name")


@dataclass
class RunScore:
    label: str
    path: Path
    method: str
    model: str
    miou: float
    per_class: dict[str, float | None]
    params: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    """``train.seed`` of the run."""


@dataclass
class Comparison:
    runs: list[RunScore]
    class_names: list[str]
    winners: dict[str, list[str]]
    """class -> labels of the runs with the best IoU (empty: no run has a score, or all tie)."""
    swept: list[str]
    files: dict[str, Path] = field(default_factory=dict)
    paired: dict[str, dict] = field(default_factory=dict)
    """Each method against supervised training seed by seed (``viz.paired.paired_by_seed``); {}
    unless the runs include supervised ones and at most one run per method and seed."""

    @property
    def wins(self) -> dict[str, list[str]]:
        """run label -> the classes it wins."""
        out: dict[str, list[str]] = {r.label: [] for r in self.runs}
        for cls, labels in self.winners.items():
            for label in labels:
                out[label].append(cls)
        return out

    def best(self) -> RunScore:
        return max(self.runs, key=lambda r: r.miou if math.isfinite(r.miou) else -1)


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = tuple(v) if isinstance(v, list) else v
    return out


def expand_runs(paths: list[str | Path]) -> tuple[list[Path], list[str]]:
    """Run folders from the arguments: a run folder as is; a sweep folder (``sweep.json``) or any
    folder of run folders (e.g. a demo's) expands into its runs. Also returns the swept keys."""
    runs: list[Path] = []
    swept: list[str] = []
    for p in map(Path, paths):
        if (p / "sweep.json").is_file():
            sweep = json.loads((p / "sweep.json").read_text())
            for key in sweep.get("axes", {}):
                if key not in swept:
                    swept.append(key)
            runs += [p / r["name"] for r in sweep.get("runs", []) if (p / r["name"]).is_dir()]
        elif (p / "config.yaml").is_file() or (p / "metrics.jsonl").is_file():
            runs.append(p)
        elif p.is_dir():
            inner = sorted(q for q in p.iterdir() if q.is_dir() and (q / "config.yaml").is_file())
            if not inner:
                raise RunFolderError(f"'{p}' is neither a run folder nor a folder of runs")
            runs += inner
        else:
            raise RunFolderError(f"run folder '{p}' does not exist")
    seen: set[Path] = set()
    unique = [r for r in runs if not (r.resolve() in seen or seen.add(r.resolve()))]
    return unique, swept


def _score(run: RunData, model: str) -> tuple[str, dict[str, Any] | None]:
    final = run.final()
    if not final:
        return model, None
    if model == "best":
        name = max(final, key=lambda k: final[k]["miou"])
        return name, final[name]
    if model in final:
        return model, final[model]
    return "student", final.get("student") or next(iter(final.values()))


def _labels(runs: list[RunData], params: list[dict[str, Any]], swept: list[str]) -> list[str]:
    if swept:
        return [" ".join(f"{k.split('.')[-1]}={p.get(k)}" for k in swept) for p in params]
    names = [r.name for r in runs]
    if len(set(names)) < len(names):
        names = [f"{r.path.parent.name}/{r.name}" for r in runs]
    return names


def find_winners(scores: list[RunScore], class_names: list[str], tie: float = TIE) -> dict[str, list[str]]:
    """Per class, the runs within ``tie`` points of the best IoU; nobody wins when every run ties."""
    winners: dict[str, list[str]] = {}
    for cls in class_names:
        values = [(r.label, r.per_class.get(cls)) for r in scores]
        present = [(label, v) for label, v in values if v is not None and math.isfinite(v)]
        if len(scores) < 2 or not present:
            winners[cls] = []
            continue
        top = max(v for _, v in present)
        best = [label for label, v in present if v >= top - tie]
        winners[cls] = [] if len(best) == len(scores) else best
    return winners


def load_scores(paths: list[str | Path], labels: list[str] | None = None, model: str = "student",
                against: list[str] | None = None) -> tuple[list[RunScore], list[str], list[str]]:
    run_paths, swept = expand_runs(paths)
    if against:
        swept = list(against)
    if not run_paths:
        raise RunFolderError("no runs to compare")
    runs = [load_run(p) for p in run_paths]
    flat = [flatten(r.config) for r in runs]
    params = [{k: f.get(k) for k in swept} for f in flat]
    if labels:
        if len(labels) != len(runs):
            raise RunFolderError(f"{len(labels)} labels for {len(runs)} runs")
    else:
        labels = _labels(runs, params, swept)
    scores = []
    class_names: list[str] = []
    for run, label, p, flat_cfg in zip(runs, labels, params, flat):
        used, s = _score(run, model)
        for n in run.class_names:
            if n not in class_names:
                class_names.append(n)
        scores.append(RunScore(label, run.path, run.method, used, s["miou"] if s else float("nan"),
                               dict(s["per_class"]) if s else {}, p, flat_cfg.get("train.seed")))
    return scores, class_names, swept


def pair_by_seed(scores: list[RunScore], swept: list[str]) -> dict[str, dict]:
    """The runs of a demo (several methods on shared seeds): each method against supervised, seed
    by seed. {} for a sweep, or where one method has two runs of one seed (which to pair?)."""
    keys = [(r.method, r.seed) for r in scores if r.seed is not None and math.isfinite(r.miou)]
    if swept or len(set(keys)) < len(keys):
        return {}
    return paired_by_seed([{"method": r.method, "seed": r.seed, "miou": r.miou} for r in scores
                           if r.seed is not None and math.isfinite(r.miou)])


def compare_runs(paths: list[str | Path], out_dir: str | Path | None = None, labels: list[str] | None = None,
                 model: str = "student", against: list[str] | None = None, quiet: bool = False,
                 tie: float = TIE) -> Comparison:
    """Compare runs; print the table (unless ``quiet``) and write the files into ``out_dir``.

    ``model``: ``student`` (default; every method has one), ``teacher`` (student where there
    is none) or ``best`` (the better of the two per run). ``against``: config keys to plot
    mIoU against (default: a sweep folder's axes).
    """
    scores, class_names, swept = load_scores(paths, labels, model, against)
    comparison = Comparison(scores, class_names, find_winners(scores, class_names, tie), swept,
                            paired=pair_by_seed(scores, swept))
    first = load_run(scores[0].path)
    palette = first.palette
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        comparison.files["md"] = _write_markdown(comparison, out / "compare.md")
        comparison.files["csv"] = _write_csv(comparison, out / "compare.csv")
        comparison.files["png"] = _plot(comparison, palette, out / "compare.png")
        if swept:
            comparison.files["sweep_png"] = _plot_sweep(comparison, out / "sweep.png")
    if not quiet:
        print(format_table(comparison))
        for path in comparison.files.values():
            print(f"written: {path}")
    return comparison


# ---- text ---------------------------------------------------------------------------------------

def format_table(c: Comparison) -> str:
    """Console table; ``*`` marks each class's winner."""
    names = c.class_names
    width = max(8, *(len(r.label) for r in c.runs)) + 1
    col = max(6, *(len(n) for n in names)) + 1
    head = f"{'run':<{width}}{'mIoU':>7}  " + "".join(f"{n[:col - 1]:>{col}}" for n in names) + "  wins"
    lines = [head, "-" * len(head)]
    wins = c.wins
    for r in c.runs:
        cells = []
        for n in names:
            mark = "*" if r.label in c.winners.get(n, []) else " "
            cells.append(f"{score(r.per_class.get(n)) + mark:>{col}}")
        lines.append(f"{r.label:<{width}}{score(r.miou, 2):>7}  " + "".join(cells) + f"  {len(wins[r.label])}")
    lines.append("* best IoU for the class (within %.2g points); " % TIE + f"scores: {c.runs[0].model} networks")
    best = c.best()
    if c.swept:
        lines.append(f"best: {best.label} (mIoU {best.miou:.2f})")
    lines += paired_lines(c.paired, c.runs[0].model)
    return "\n".join(lines)


def markdown_table(c: Comparison) -> str:
    names = c.class_names
    head = ["run", "method", "mIoU", *names, "classes won"]
    rows = []
    best = c.best().label if len(c.runs) > 1 else None
    for r in c.runs:
        miou = score(r.miou, 2)
        cells = [r.label, r.method, f"**{miou}**" if r.label == best else miou]
        for n in names:
            v = score(r.per_class.get(n))
            cells.append(f"**{v}**" if r.label in c.winners.get(n, []) else v)
        cells.append(", ".join(c.wins[r.label]) or "-")
        rows.append(cells)
    return markdown(head, rows)


def _write_markdown(c: Comparison, path: Path) -> Path:
    lines = ["# Run comparison", "",
             f"Scores of the {c.runs[0].model} networks at the end of training (IoU in %). "
             "Bold: the best mIoU, and each class's winner (ties within "
             f"{TIE:g} points share it; no winner when every run ties).", "", markdown_table(c), ""]
    for label, classes in c.wins.items():
        won = f"{len(classes)} class(es): {', '.join(classes)}" if classes else "no class"
        lines.append(f"- **{label}** wins {won}")
    if c.swept:
        best = c.best()
        lines += ["", f"Swept: {', '.join(c.swept)}. Best: **{best.label}** (mIoU {best.miou:.2f}).",
                  "", "![mIoU against the swept values](sweep.png)"]
    if c.paired:
        lines += ["", "## Paired by seed", "",
                  f"Each method's {c.runs[0].model} mIoU minus supervised training's of the same seed; the "
                  "standard error is the differences' sample standard deviation over the square root of "
                  "their number.", "", paired_table(c.paired, c.runs[0].model), "",
                  *(f"- {line}" for line in paired_lines(c.paired, c.runs[0].model))]
    lines += ["", "![comparison](compare.png)", ""]
    path.write_text("\n".join(lines))
    return path


def _write_csv(c: Comparison, path: Path) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "path", "method", "model", *c.swept, "miou", *c.class_names, "classes_won"])
        wins = c.wins
        for r in c.runs:
            w.writerow([r.label, str(r.path), r.method, r.model, *(r.params.get(k) for k in c.swept),
                        "" if not math.isfinite(r.miou) else f"{r.miou:.4f}",
                        *("" if r.per_class.get(n) is None else f"{r.per_class[n]:.4f}" for n in c.class_names),
                        ";".join(wins[r.label])])
    return path


# ---- plots --------------------------------------------------------------------------------------

def _run_colours(n: int) -> list:

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _colour_ticks(ax, names: list[str], colours: list) -> None:
    """Class names on the x axis, each on a swatch of its palette colour."""
    for label, colour in zip(ax.get_xticklabels(), colours):
        lum = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        label.set_bbox({"facecolor": colour, "edgecolor": "0.3", "linewidth": 0.5, "pad": 1.5})
        label.set_color("white" if lum < 0.5 else "black")


def _plot(c: Comparison, palette: list[int], path: Path) -> Path:

    names, runs = c.class_names, c.runs
    n_runs = len(runs)
    colours = _run_colours(n_runs)
    fig = Figure(figsize=(max(8.0, 0.5 * len(names) * max(1, n_runs) / 2 + 4), 7.2))
    FigureCanvasAgg(fig)
    ax_m, ax_c = fig.subplots(2, 1, gridspec_kw={"height_ratios": [1, 2.2]})
    y = np.arange(n_runs)
    mious = [r.miou if math.isfinite(r.miou) else 0 for r in runs]
    ax_m.barh(y, mious, color=colours, edgecolor="0.2", linewidth=0.5)
    for i, r in enumerate(runs):
        ax_m.annotate(score(r.miou, 2), (mious[i], i), xytext=(3, 0), textcoords="offset points", va="center",
                      fontsize=8, fontweight="bold" if r is c.best() and n_runs > 1 else "normal")
    ax_m.set_yticks(y, [r.label for r in runs], fontsize=8)
    ax_m.invert_yaxis()
    ax_m.set_xlabel(f"mIoU (%), {runs[0].model}")
    ax_m.set_xlim(0, max(max(mious) * 1.15, 1))
    ax_m.set_title("mIoU per run", fontsize=10)
    ax_m.grid(axis="x", alpha=0.3)

    x = np.arange(len(names))
    width = 0.8 / max(1, n_runs)
    for k, r in enumerate(runs):
        values = [r.per_class.get(n) for n in names]
        xs = x + (k - (n_runs - 1) / 2) * width
        ax_c.bar(xs, [0 if v is None else v for v in values], width, color=colours[k], edgecolor="0.2",
                 linewidth=0.4, label=r.label)
        for xi, n, v in zip(xs, names, values):
            if r.label in c.winners.get(n, []) and v is not None:
                ax_c.plot(xi, v + 3, marker="*", ms=9, color=colours[k], markeredgecolor="black",
                          markeredgewidth=0.6, linestyle="none")
    ax_c.set_xticks(x, names, fontsize=8, rotation=45 if len(names) > 6 else 0,
                    ha="right" if len(names) > 6 else "center")
    _colour_ticks(ax_c, names, class_colours(palette, len(names)))
    ax_c.set_ylabel("IoU (%)")
    ax_c.set_ylim(0, 112)
    ax_c.set_title("per-class IoU (star: the class's winner; class names on their palette colour)", fontsize=10)
    ax_c.legend(fontsize=8, frameon=False, ncol=min(n_runs, 4), loc="upper right")
    ax_c.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _axis_values(values: list[Any]) -> tuple[list[float], list[str] | None]:
    """Numeric positions for a swept key's values (categories get 0, 1, 2 ... and tick labels)."""
    try:
        return [float(v) for v in values], None
    except (TypeError, ValueError):
        cats = list(dict.fromkeys(str(v) for v in values))
        return [float(cats.index(str(v))) for v in values], cats


def _plot_sweep(c: Comparison, path: Path) -> Path:
    """mIoU against the first swept key; one line per combination of the others."""

    key, rest = c.swept[0], c.swept[1:]
    fig = Figure(figsize=(7.5, 4.4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    groups: dict[tuple, list[RunScore]] = {}
    for r in c.runs:
        groups.setdefault(tuple(r.params.get(k) for k in rest), []).append(r)
    xs_all, cats = _axis_values([r.params.get(key) for r in c.runs])
    colours = _run_colours(len(groups))
    for (group, members), colour in zip(groups.items(), colours):
        pts = sorted(((_axis_values([m.params.get(key)])[0][0] if cats is None else
                       float(cats.index(str(m.params.get(key)))), m.miou) for m in members))
        label = " ".join(f"{k.split('.')[-1]}={v}" for k, v in zip(rest, group)) or "mIoU"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colour, label=label)
    best = c.best()
    bx = _axis_values([best.params.get(key)])[0][0] if cats is None else float(cats.index(str(best.params.get(key))))
    ax.plot(bx, best.miou, marker="*", ms=16, color="gold", markeredgecolor="black", linestyle="none",
            label=f"best: {best.label} ({best.miou:.2f})")
    if cats is not None:
        ax.set_xticks(range(len(cats)), cats)
    ax.set_xlabel(key)
    ax.set_ylabel(f"mIoU (%), {c.runs[0].model}")
    ax.set_title(f"sensitivity: mIoU against {', '.join(c.swept)}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
