"""A harder demo task: signs told apart by their glyph, with room for unlabeled images to help.

Why it exists (issue 23; docs/findings.md, findings 15 to 17): on the earlier built-in
dataset (``dssn.apps.synthetic``) each class has a fixed local texture, so 1/16 of the
labels already teaches most of what all labels teach, and self-training has little to add.
Here every object is a *sign*: a plate (disc or rounded square, the same for every class)
tiled with small copies of one hand-drawn digit, and the whole plate is labelled with the
digit. Colours, plates and strokes are shared by all classes (loose strokes in the
background too), so the class is the digit's identity, learnt from examples, as in
few-label digit classification, where self-training is reported to close much of the gap
to full labels. Each sign draws its own hand from a continuous range (vertex jitter,
slant, rotation, width, size, stroke weight, spacing, colours), which the labeled split
covers thinly and the unlabeled pool densely.

Versions 1 to 3 drew one large digit per plate; from scratch, in the demo's budget, the
network did not learn them even from all labels (finding 15).

Class balance (tested): each sign's digit is drawn uniformly from the four classes, so
each class holds about 1/4 of the sign pixels in expectation.

The dataset is written in the PASCAL VOC layout (``JPEGImages``, palette-PNG
``SegmentationClass`` with 255 on a 1-pixel band just outside each plate, split files
``splits/<fraction>/{labeled,unlabeled}.txt``, ``splits/full/labeled.txt``,
``splits/val.txt``). ``data.dataset=glyphs`` (the ``glyphs`` preset, ``dssn demo --task glyphs``)
generates the default dataset under ``data.root`` or reads a folder ``make_glyphs``
returned. Every image comes from its own seed ``(seed, split, index)``, so files do not
depend on generation order.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

from dssn.apps.synthetic import publish_generated, read_generated_manifest, write_voc_files
from dssn.constants import IGNORE
from dssn.data.catalog import DatasetSpec
from dssn.data.splits import split_name
from dssn.data.layouts import voc_pool
from dssn.errors import DssnError
from dssn.registry import DATASETS

__all__ = ["CLASS_NAMES", "GENERATOR_VERSION", "make_glyphs", "render_sample", "resolve_glyphs"]

#: Bump whenever the files made for the same parameters change: it names the cache folders.
GENERATOR_VERSION = 4
MANIFEST_NAME = "dataset.json"
_GENERATOR_ID = "dssn.apps.glyphs"

# Strokes of each glyph as polylines in a box x, y in [-1, 1] (y down). Chosen so that no
# glyph is another one rotated by less than the 25 degrees the renderer allows.
_OVAL = [(0.6 * math.sin(t), -0.95 * math.cos(t)) for t in np.linspace(0, 2 * math.pi, 13)]
_GLYPHS: dict[str, list[list[tuple[float, float]]]] = {
    "zero": [_OVAL],
    "two": [[(-0.6, -0.55), (-0.3, -0.9), (0.3, -0.9), (0.6, -0.55), (0.5, -0.15), (-0.6, 0.9), (0.65, 0.9)]],
    "four": [[(0.35, 0.95), (0.35, -0.95), (-0.65, 0.35), (0.7, 0.35)]],
    "seven": [[(-0.65, -0.9), (0.65, -0.9), (-0.15, 0.95)]],
}
CLASS_NAMES: tuple[str, ...] = ("background", *_GLYPHS)
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)
# Smallest brightness step between a plate and its glyph: the glyph must survive the
# strong views' greyscale and halved contrast (finding 4 of docs/findings.md).
_MIN_LUMA_STEP = 60.0


def _segment_distance(xx: np.ndarray, yy: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance of every pixel centre to the segment from ``a`` to ``b`` (pixels)."""
    ab = b - a
    t = ((xx - a[0]) * ab[0] + (yy - a[1]) * ab[1]) / max(float(ab @ ab), 1e-9)
    t = np.clip(t, 0.0, 1.0)
    return np.hypot(xx - (a[0] + t * ab[0]), yy - (a[1] + t * ab[1]))


def _stroke_mask(xx: np.ndarray, yy: np.ndarray, polylines: list[np.ndarray], half_width: float) -> np.ndarray:
    dist = np.full(xx.shape, np.inf, dtype=np.float32)
    for points in polylines:
        for a, b in zip(points[:-1], points[1:]):
            dist = np.minimum(dist, _segment_distance(xx, yy, a, b))
    return dist <= half_width


def _styled_glyph(rng: np.random.Generator, name: str, cx: float, cy: float, half_height: float) -> list[np.ndarray]:
    """The glyph's polylines in pixels around (cx, cy), in a random hand: jittered
    vertices, slant, width and rotation (up to 25 degrees). The training views' horizontal
    flips add mirrored digits, under the same label."""
    jitter, slant = rng.uniform(0.0, 0.1), rng.uniform(-0.3, 0.3)
    width, angle = rng.uniform(0.65, 1.1), rng.uniform(-1, 1) * math.radians(25)
    cos, sin = math.cos(angle), math.sin(angle)
    out = []
    for line in _GLYPHS[name]:
        p = np.array(line, dtype=np.float32) + rng.normal(0, jitter, (len(line), 2)).astype(np.float32)
        if name == "zero":
            p[-1] = p[0]  # keep the oval closed
        x, y = (p[:, 0] + slant * p[:, 1]) * width, p[:, 1]
        out.append(np.stack([cx + half_height * (cos * x - sin * y), cy + half_height * (sin * x + cos * y)], axis=1))
    return out


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, 3).astype(np.float32)


def _contrasting(rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
    """A random colour whose brightness differs from ``base``'s by at least _MIN_LUMA_STEP."""
    while True:
        colour = _colour(rng)
        if abs(float((colour - base) @ _LUMA_WEIGHTS)) >= _MIN_LUMA_STEP:
            return colour


def _plate_mask(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float,
                radius: float) -> np.ndarray:
    """A disc or a rounded square (superellipse of power 4), the same for every class."""
    power = 2.0 if rng.random() < 0.5 else 4.0
    return np.abs((xx - cx) / radius) ** power + np.abs((yy - cy) / radius) ** power <= 1.0


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    coarse = Image.fromarray(rng.random((cells, cells), dtype=np.float32), mode="F")
    return np.asarray(coarse.resize((size, size), Image.BILINEAR), dtype=np.float32)


def _outer_band(mask: np.ndarray) -> np.ndarray:
    """Pixels just outside ``mask`` (4-neighbours of it), the PASCAL-style 'void' outline."""
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown & ~mask


def _place(rng: np.random.Generator, size: int, radius: float, placed: list[tuple[float, float, float]]):
    """A centre for a plate of ``radius`` that overlaps no placed plate (None after 30 tries);
    up to a third of the plate may leave the image."""
    for _ in range(30):
        cx, cy = rng.uniform(radius * 0.6, size - radius * 0.6, 2)
        if all(math.hypot(cx - x, cy - y) > radius + r + 1 for x, y, r in placed):
            return float(cx), float(cy)
    return None


def render_sample(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One image (``size x size x 3`` uint8) and its mask (``size x size`` uint8: 0
    background, 1..4 the digit of the sign, 255 the band just outside each sign).

    1 to 3 signs (plates of radius size/4.5 to size/2.5, log-uniform) that do not overlap
    and 3 to 8 loose strokes as clutter on a two-colour mottled ground. Each plate is
    tiled with small copies of its digit, all in the sign's own hand (version 4: one
    large digit per plate, in versions 1 to 3, was not learnt even from all labels in
    1600 iterations), so a patch of about 18 pixels shows one whole digit."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    c1, c2 = _colour(rng), _colour(rng)
    img = c1 + (c2 - c1) * _smooth_noise(rng, size, int(rng.integers(2, 6)))[..., None]
    labels = np.zeros((size, size), dtype=np.uint8)
    signs = np.zeros((size, size), dtype=bool)
    unit = size / 64  # stroke widths and texture periods scale with the image

    for _ in range(int(rng.integers(3, 9))):  # loose strokes: glyph-like lines that are background
        points = rng.uniform(0, size, (int(rng.integers(2, 4)), 2)).astype(np.float32)
        stroke = _stroke_mask(xx, yy, [points], rng.uniform(0.6, 1.6) * unit)
        img[stroke] = _colour(rng)

    placed: list[tuple[float, float, float]] = []
    for _ in range(int(rng.integers(1, 4))):
        radius = size * math.exp(rng.uniform(math.log(1 / 4.5), math.log(1 / 2.5)))
        centre = _place(rng, size, radius, placed)
        if centre is None:
            continue
        placed.append((*centre, radius))
        plate = _plate_mask(rng, xx, yy, *centre, radius)
        base = _colour(rng)
        img[plate] = base
        class_index = int(rng.integers(1, len(CLASS_NAMES)))
        half_height = rng.uniform(4.5, 6.0) * unit
        lines = _styled_glyph(rng, CLASS_NAMES[class_index], 0.0, 0.0, half_height)
        # Pixel offsets folded into one tile of the grid, the tile's centre at 0.
        period = half_height * rng.uniform(2.9, 3.3)
        phase = rng.uniform(0, period, 2)
        tile_x = np.mod(xx - centre[0] + phase[0], period) - period / 2
        tile_y = np.mod(yy - centre[1] + phase[1], period) - period / 2
        stroke = _stroke_mask(tile_x, tile_y, lines, rng.uniform(0.8, 1.2) * unit) & plate
        img[stroke] = _contrasting(rng, base)
        labels[plate] = class_index
        signs |= plate

    labels[_outer_band(signs)] = IGNORE
    img += rng.normal(0, 4, img.shape).astype(np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), labels


# --- dataset on disk ------------------------------------------------------


def _cache_key(params: dict) -> str:
    """Folder name, e.g. ``glyphs-v3-64px-train512-val192-1_16-seed0``."""
    return (f"glyphs-v{GENERATOR_VERSION}-{params['size']}px-train{params['num_train']}-val{params['num_val']}"
            f"-{split_name(params['labeled_fraction'])}-seed{params['seed']}")


def _manifest(folder: Path) -> dict | None:
    return read_generated_manifest(folder, _GENERATOR_ID)


def _write_dataset(folder: Path, params: dict, progress: bool) -> None:
    """Write the dataset for ``params`` into the empty ``folder``, the manifest last."""
    counts, labeled, _ = write_voc_files(folder, params, render_sample, progress)
    num_train = params["num_train"]
    manifest = {"generator": _GENERATOR_ID, "version": GENERATOR_VERSION, "params": params,
                "class_names": list(CLASS_NAMES), "ignore_index": IGNORE,
                "counts": {"train": num_train, "val": params["num_val"], "labeled": len(labeled)},
                "train_pixel_counts": {name: int(counts[i]) for i, name in enumerate(CLASS_NAMES)}}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")


class GlyphDataError(DssnError, FileExistsError):
    """A folder in the way of the glyph dataset cache."""


def make_glyphs(root: str | os.PathLike[str], *, seed: int = 0, num_train: int = 512, num_val: int = 192,
                size: int = 64, labeled_fraction: float = 1 / 16, progress: bool = False) -> Path:
    """Generate (or reuse) the glyph dataset cached under ``root``; return its folder
    ``root/<key>``, the key naming the generator version and every parameter.

    The files are written to a hidden ``.<key>.<random>.tmp`` sibling and renamed into
    place when complete, so a key's folder is always whole; a folder of that name that
    this version did not write for these parameters is never written into."""
    if num_train < 1 or num_val < 0 or size < 32:
        raise ValueError("need num_train >= 1, num_val >= 0 and size >= 32")
    params = {"seed": int(seed), "num_train": int(num_train), "num_val": int(num_val), "size": int(size),
              "labeled_fraction": float(labeled_fraction)}
    root = Path(root)
    folder = root / _cache_key(params)

    def cached() -> bool:
        if not folder.exists():
            return False
        manifest = _manifest(folder)
        if manifest is None or manifest.get("version") != GENERATOR_VERSION or manifest.get("params") != params:
            raise GlyphDataError(f"{folder} exists but holds no glyph dataset made by version {GENERATOR_VERSION} "
                                 f"for {params}; it will not be written into: move it away or choose another root")
        return True

    if cached():
        return folder
    return publish_generated(folder, lambda tmp: _write_dataset(tmp, params, progress), cached)


def resolve_glyphs(root: str | os.PathLike[str], *, progress: bool = False) -> Path:
    """The dataset folder that ``data.root`` names for ``data.dataset=glyphs``: ``root``
    itself when it holds a glyph dataset of this version (a folder ``make_glyphs``
    returned), otherwise the default dataset cached under ``root``, generated first if absent."""
    root = Path(root)
    manifest = _manifest(root)
    if manifest is None:
        return make_glyphs(root, progress=progress)
    if manifest.get("version") != GENERATOR_VERSION:
        raise GlyphDataError(f"{root} holds a glyph dataset made by generator version {manifest.get('version')}, "
                             f"and this dssn makes version {GENERATOR_VERSION}: point data.root at its parent "
                             "folder (the new version is generated beside it) or delete it")
    return root


DATASETS.add("glyphs", DatasetSpec("as pascal; generated under data.root", voc_pool, CLASS_NAMES,
                                   resolve_root=resolve_glyphs, splits_command=False))
