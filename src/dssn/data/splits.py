"""``dssn splits``: labeled / unlabeled / val split files drawn from a dataset folder.

Reproducible: the candidates are sorted by path before a seeded shuffle, and the
validation and labeled draws use separate streams (so choosing the labeled set does
not depend on how the validation set was chosen). A validation image is never put
in a training split: with ``val`` given it is drawn first and removed from the pool;
without it the layout's official validation set is used and its images are removed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from dssn.data.datasets import DataError, write_split
from dssn.data.layouts import Pair, Pool

Amount = int | Fraction | None
"""A number of images, a fraction of the candidates, or None for all of them."""

SPLIT_FILES = ("labeled.txt", "unlabeled.txt", "val.txt")


def split_name(fraction: float) -> str:
    """Folder name for a labelled fraction: 1/16 -> ``"1_16"``, 1 -> ``"full"``."""
    if not 0 < fraction <= 1:
        raise ValueError(f"labeled fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return "full"
    exact = Fraction(fraction).limit_denominator(10_000)
    return f"{exact.numerator}_{exact.denominator}"


def parse_amount(text: str) -> Amount:
    """``"732"`` -> 732 images; ``"1/16"``, ``"0.0625"`` or ``"6.25%"`` -> a fraction; ``"all"`` -> None."""
    raw = text.strip().lower()
    if raw == "all":
        return None
    try:
        if raw.endswith("%"):
            value = Fraction(raw[:-1]) / 100
        elif raw.isdigit():
            return int(raw)
        else:
            value = Fraction(raw)
    except (ValueError, ZeroDivisionError):
        raise DataError(f"'{text}' is not an amount: give a count (732), a fraction (1/16, 0.25), "
                        "a percentage (10%) or 'all'") from None
    if not 0 < value <= 1:
        raise DataError(f"'{text}': a fraction must be in (0, 1]")
    return value


def amount_name(amount: Amount) -> str:
    """Folder name in the authors' style: 732 -> ``732``, 1/16 -> ``1_16``, all -> ``full``."""
    if amount is None:
        return "full"
    return str(amount) if isinstance(amount, int) else split_name(float(amount))


def _count(amount: Amount, available: int, what: str) -> int:
    if amount is None:
        return available
    n = amount if isinstance(amount, int) else max(1, round(amount * available))
    if not 1 <= n <= available:
        raise DataError(f"asked for {n} {what} but only {available} candidate images with masks are left")
    return n


def _shuffled(pairs: list[Pair], seed: int, stream: str) -> list[Pair]:
    out = sorted(pairs)
    random.Random(f"dssn-splits:{seed}:{stream}").shuffle(out)
    return out


@dataclass
class SplitPlan:
    labeled: list[Pair]
    unlabeled: list[Pair]
    val: list[Pair]
    val_from: str

    def as_files(self) -> dict[str, list[Pair]]:
        return dict(zip(SPLIT_FILES, (self.labeled, self.unlabeled, self.val)))


def make_splits(pool: Pool, labeled: Amount, val: Amount | str = "official", seed: int = 0) -> SplitPlan:
    """Draw the splits. ``val`` (a count or fraction of the images with masks) carves the
    validation set out of the training pool; ``"official"`` takes the layout's official
    validation set instead. The labeled count or fraction applies to
    the images with masks that are left; every other training image is unlabeled."""
    candidates = [p for p in pool.train if p[1] is not None]
    image_only = [p for p in pool.train if p[1] is None]
    if val == "official":
        if not pool.val:
            raise DataError("this dataset has no official validation set: give --val N or FRACTION to draw one "
                            "from the labeled images")
        val_pairs, val_from = sorted(pool.val), pool.val_source
    else:
        drawn = _shuffled(candidates, seed, "val")
        val_pairs, val_from = sorted(drawn[: _count(val, len(candidates), "validation images")]), "drawn"
    val_images = {image for image, _ in val_pairs}
    candidates = [p for p in candidates if p[0] not in val_images]
    image_only = [p for p in image_only if p[0] not in val_images]
    drawn = _shuffled(candidates, seed, "labeled")
    n = _count(labeled, len(candidates), "labeled images")
    return SplitPlan(sorted(drawn[:n]), sorted(drawn[n:] + image_only), val_pairs, val_from)


def write_splits(plan: SplitPlan, out_dir: Path, overwrite: bool = False) -> list[Path]:
    """Write ``labeled.txt``, ``unlabeled.txt``, ``val.txt``; existing files only with ``overwrite``."""
    paths = [out_dir / name for name in SPLIT_FILES]
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise DataError(f"split file(s) already exist: {', '.join(existing)}; nothing was written. "
                        "Choose another --out folder, or pass --overwrite to replace them")
    for path, pairs in zip(paths, plan.as_files().values()):
        write_split(path, pairs)
    return paths
