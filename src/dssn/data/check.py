"""``dssn check-data``: find every problem in a dataset before training does.

Two depths:

- fast (``check_fast``, run by ``dssn train`` before anything else): the root and split
  files exist, every line parses, every listed file exists, labeled and val lines name a
  mask, and no validation image is listed for training. Stat calls only.
- full (``check_full``): also decodes every listed image and mask, checks that image and
  mask sizes agree and that mask values are known classes or 255, and counts the pixels
  of each class.

Every problem is a ``Problem`` naming the split file and line, in the same words the
dataset uses when it meets a bad file during training.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dssn.config import Config
from dssn.constants import IGNORE
from dssn.data import ROLES, class_names_for, data_root, decoder_for, split_sources
from dssn.data.datasets import (
    DataError,
    MaskDecoder,
    Problem,
    Split,
    SplitEntry,
    load_pair,
    missing_message,
    parse_split,
)

#: Roles whose masks training reads; unlabeled masks, if listed, are never opened.
MASKED_ROLES = ("labeled", "val")
#: Problems shown in the error that stops ``dssn train``.
TRAIN_PROBLEM_LIMIT = 20


@dataclass
class SplitSummary:
    role: str
    source: str
    images: int
    masks: int


@dataclass
class DataReport:
    dataset: str
    root: Path
    class_names: list[str]
    splits: list[SplitSummary] = field(default_factory=list)
    pixel_counts: dict[str, np.ndarray] = field(default_factory=dict)
    """Per role with masks: pixels of each value 0..255 (classes, and 255 = ignore)."""
    problems: list[Problem] = field(default_factory=list)

    def class_share(self, role: str) -> np.ndarray:
        """Share of each class among the non-ignored pixels of ``role``."""
        counts = self.pixel_counts[role][: len(self.class_names)].astype(np.float64)
        return counts / counts.sum() if counts.sum() else counts

    def ignore_share(self, role: str) -> float:
        counts = self.pixel_counts[role]
        return float(counts[IGNORE] / counts.sum()) if counts.sum() else 0.0


def format_problems(problems: list[Problem], limit: int | None = None) -> str:
    shown = problems if limit is None else problems[:limit]
    lines = [f"  {p}" for p in shown]
    if len(problems) > len(shown):
        lines.append(f"  ... and {len(problems) - len(shown)} more")
    return "\n".join(lines)


# --------------------------------------------------------------------------- fast


def _read_splits(cfg: Config, root: Path) -> tuple[list[tuple[str, Split]], list[Problem]]:
    """Each configured split, parsed leniently: bad lines and missing files become problems."""
    splits, problems = [], []
    keys = dict(ROLES)
    for role, source in split_sources(cfg, root).items():
        if source is None:
            continue
        if isinstance(source, Split):
            splits.append((role, source))
        elif not source.is_file():
            problems.append(Problem(str(source), None, f"split file not found (data.{keys[role]}; "
                                                       "relative paths are under data.root)"))
        else:
            split, bad_lines = parse_split(source)
            splits.append((role, split))
            problems += bad_lines
    return splits, problems


def _entry_exists(root: Path, split: Split, entry: SplitEntry, needs_mask: bool) -> list[Problem]:
    found = []
    if not (root / entry.image).is_file():
        found.append(Problem(split.source, entry.line_no, missing_message("image", entry.image, root / entry.image)))
    if needs_mask and entry.mask is None:
        found.append(Problem(split.source, entry.line_no,
                             f"image {entry.image}: no mask path (labeled and val lines are 'image_path mask_path')"))
    elif needs_mask and not (root / entry.mask).is_file():
        found.append(Problem(split.source, entry.line_no, missing_message("mask", entry.mask, root / entry.mask)))
    return found


def _val_in_training(splits: list[tuple[str, Split]]) -> list[Problem]:
    val = {e.image for role, s in splits if role == "val" for e in s.entries}
    return [Problem(s.source, e.line_no, f"image {e.image} is also in the validation split: a validation "
                                         "image must never be used for training")
            for role, s in splits if role != "val" for e in s.entries if e.image in val]


def _scan(cfg: Config) -> tuple[Path, list[tuple[str, Split]], list[Problem], list[tuple[str, Split, SplitEntry]]]:
    """Root, splits, problems found without decoding, and the entries whose files all exist."""
    root = data_root(cfg)
    splits, problems = _read_splits(cfg, root)
    present = []
    for role, split in splits:
        for entry in split.entries:
            missing = _entry_exists(root, split, entry, role in MASKED_ROLES)
            problems += missing
            if not missing:
                present.append((role, split, entry))
    return root, splits, problems + _val_in_training(splits), present


def check_fast(cfg: Config) -> tuple[list[tuple[str, Split]], list[Problem]]:
    """The splits and every problem found without decoding a file.

    A missing root or an invalid ``dataset.yaml`` stops at once with ``DataError``.
    """
    _, splits, problems, _ = _scan(cfg)
    return splits, problems


def check_before_training(cfg: Config) -> None:
    """The fast check, as ``dssn train`` runs it: ``DataError`` listing the problems."""
    class_names_for(cfg)  # num_classes agrees with the class list
    _, problems = check_fast(cfg)
    if problems:
        raise DataError(f"the data check found {len(problems)} problem(s); nothing was trained:\n"
                        f"{format_problems(problems, TRAIN_PROBLEM_LIMIT)}\n"
                        "Fix them (run `dssn check-data` with the same config and overrides for the full check, "
                        "which also decodes every file).")


# --------------------------------------------------------------------------- full


def _decode_entry(job: tuple[Path, str, SplitEntry, bool, MaskDecoder]) -> tuple[list[Problem], np.ndarray | None]:
    root, source, entry, needs_mask, decoder = job
    try:
        _, mask = load_pair(root, entry.image, entry.mask if needs_mask else None, decoder)
    except DataError as err:
        return [Problem(source, entry.line_no, str(err))], None
    if mask is None:
        return [], None
    return [], np.bincount(np.asarray(mask).ravel(), minlength=256)


def _map(jobs: list, workers: int, progress: bool) -> Iterator[tuple[list[Problem], np.ndarray | None]]:
    bar = dict(total=len(jobs), desc="decoding", unit="file", disable=not progress)
    if workers <= 1:
        yield from tqdm(map(_decode_entry, jobs), **bar)
        return
    with ProcessPoolExecutor(workers) as pool:
        yield from tqdm(pool.map(_decode_entry, jobs, chunksize=16), **bar)


def check_full(cfg: Config, workers: int = 1, progress: bool = False) -> DataReport:
    """Everything ``check_fast`` does, then decode every listed file that exists."""
    class_names = class_names_for(cfg)
    decoder = decoder_for(cfg)
    root, splits, problems, present = _scan(cfg)
    report = DataReport(cfg.data.dataset, root, class_names, problems=problems)
    for role, split in splits:
        report.splits.append(SplitSummary(role, split.source, len(split.entries),
                                          sum(e.mask is not None for e in split.entries)))
        if role in MASKED_ROLES:
            report.pixel_counts[role] = np.zeros(256, dtype=np.int64)
    jobs = [(root, split.source, entry, role in MASKED_ROLES, decoder) for role, split, entry in present]
    roles = [role for role, _, _ in present]
    for role, (problems, counts) in zip(roles, _map(jobs, workers, progress)):
        report.problems += problems
        if counts is not None:
            report.pixel_counts[role] += counts
    return report


# --------------------------------------------------------------------------- output


def _looks_binary(report: DataReport, role: str) -> bool:
    """Only class 0 and 255 occur: the signature of 0/255 masks read without a value map."""
    counts = report.pixel_counts[role]
    return bool(counts[IGNORE] > 0 and counts[0] > 0 and counts[1:len(report.class_names)].sum() == 0)


def summary_text(report: DataReport) -> str:
    """Counts per split and the pixel frequency of each class, as printed by check-data."""
    lines = [f"dataset '{report.dataset}' at {report.root} ({len(report.class_names)} classes)", "",
             f"{'split':<10} {'images':>8} {'masks':>8}  source"]
    for s in report.splits:
        lines.append(f"{s.role:<10} {s.images:>8} {s.masks if s.role in MASKED_ROLES else '-':>8}  {s.source}")
    roles = list(report.pixel_counts)
    if roles:
        lines += ["", "pixel frequency of each class (% of non-ignored pixels):",
                  f"  {'class':<20}" + "".join(f"{r:>12}" for r in roles)]
        shares = {r: report.class_share(r) for r in roles}
        for i, name in enumerate(report.class_names):
            lines.append(f"  {i:>3} {name:<16}" + "".join(f"{100 * shares[r][i]:>11.3f}%" for r in roles))
        lines.append(f"  {'ignore (255)':<20}" + "".join(f"{100 * report.ignore_share(r):>11.3f}%" for r in roles)
                     + "  (% of all pixels)")
        if any(_looks_binary(report, r) for r in roles):
            lines.append("  note: every labelled pixel is 0 or 255 (ignore). If your masks are binary 0/255, declare "
                         "'values: {0: 0, 255: 1}' in the folder dataset's dataset.yaml.")
    return "\n".join(lines)


def plot_class_frequency(report: DataReport, path: Path) -> Path:
    """Bar plot of the class shares of each masked split, written as a PNG (Agg, no display)."""
    # Imported here: matplotlib is slow to load and every training run imports this module.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    roles = list(report.pixel_counts)
    n = len(report.class_names)
    fig = Figure(figsize=(max(6.0, 0.35 * n + 2), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(roles))
    x = np.arange(n)
    for k, role in enumerate(roles):
        ax.bar(x + (k - (len(roles) - 1) / 2) * width, 100 * report.class_share(role), width, label=role)
    ax.set_xticks(x, report.class_names, rotation=90 if n > 8 else 0, fontsize=8)
    ax.set_ylabel("% of non-ignored pixels")
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_ylim(0, 150)
    ax.set_title(f"class pixel frequency: {report.dataset} ({report.root.name})")
    if roles:
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
