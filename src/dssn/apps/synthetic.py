"""A built-in synthetic segmentation dataset stored in the PASCAL VOC layout.

Why it exists: ``dssn demo`` needs a dataset that downloads nothing, trains in
minutes on a CPU and is still a *fair* test of semi-supervised learning. Each
object class has a characteristic shape family and texture, while colours are
drawn per instance from one shared palette (also used by the background
clutter), so colour alone says nothing about the class and a network has to
learn texture and shape from examples. Class frequencies are long-tailed so
that 1/16 of the labels leaves the rare classes badly under-represented.

The dataset is written to disk (once for each generator version and set of
parameters, see ``make_synthetic``) in the same layout as PASCAL VOC
(``JPEGImages``, palette-PNG ``SegmentationClass`` with 255 on a 1-pixel band
around objects, split files in the authors' format), so the VOC loader reads
both. Every image is generated from its own seed derived from
``(seed, split, index)``, so the output does not depend on generation order.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from dssn.constants import IGNORE
from dssn.data.catalog import DatasetSpec
from dssn.data.colors import voc_palette
from dssn.data.layouts import voc_pool
from dssn.data.splits import split_name
from dssn.registry import DATASETS

__all__ = [
    "CLASS_NAMES",
    "GENERATOR_VERSION",
    "NUM_CLASSES",
    "class_frequencies",
    "make_synthetic",
    "render_sample",
    "resolve_synthetic",
    "write_voc_files",
]

#: Bump whenever the files made for the same parameters change: it names the cache folders.
GENERATOR_VERSION = 5
MANIFEST_NAME = "dataset.json"
_GENERATOR_ID = "dssn.data.synthetic"  # the manifests' name for this generator, kept from its first home
_SPLIT_IDS = {"train": 0, "val": 1, "labeled-subset": 2}
# Cache folders are named by version and parameters (``_cache_key``); a generation in
# progress writes to a hidden temporary sibling ``.<key>.<random>.tmp``.
_KEY_PATTERN = r"v\d+-\d+px-train\d+-val\d+-(?:full|\d+_\d+)-seed\d+"
_CACHE_ENTRY = re.compile(rf"{_KEY_PATTERN}|\.{_KEY_PATTERN}\.\w+\.tmp")
_JPEG_QUALITY = 90

# Texture periods are in pixels at this image size. Larger images scale them
# up; smaller ones keep them, as finer patterns would alias.
_REFERENCE_SIZE = 96
# Every texture period is this much coarser than its nominal value, so that the
# pattern survives the training views' 0.5x rescale and Gaussian blur.
_TEXTURE_GAIN = 2.0


@dataclass(frozen=True)
class _ObjectClass:
    name: str
    shape: str
    texture: str
    weight: float  # relative probability that an object is of this class


# Ordered from common to rare: the weights make the pixel frequencies long-tailed
# (star: about 2.4% of object pixels).
_OBJECT_CLASSES = (
    _ObjectClass("disc", "disc", "stripes", 0.34),
    _ObjectClass("square", "square", "vertical", 0.25),
    _ObjectClass("triangle", "triangle", "dots", 0.17),
    _ObjectClass("cross", "cross", "diagonal", 0.12),
    _ObjectClass("ring", "ring", "concentric", 0.07),
    _ObjectClass("star", "star", "checker", 0.05),
)

CLASS_NAMES: tuple[str, ...] = ("background",) + tuple(c.name for c in _OBJECT_CLASSES)
NUM_CLASSES = len(CLASS_NAMES)

_CLASS_PROBS = np.array([c.weight for c in _OBJECT_CLASSES])
_CLASS_PROBS /= _CLASS_PROBS.sum()

# Shared by all classes and by the background clutter, so colour is no cue.
_PALETTE = np.array(
    [
        (205, 60, 50),  # red
        (60, 160, 70),  # green
        (50, 90, 190),  # blue
        (225, 195, 60),  # yellow
        (150, 70, 170),  # purple
        (60, 170, 180),  # teal
        (230, 130, 50),  # orange
        (240, 238, 228),  # off-white
        (40, 40, 48),  # near-black
        (140, 140, 132),  # grey
    ],
    dtype=np.float32,
)
# Luma (ITU-R 601, what a greyscale conversion keeps) of each palette colour.
_LUMA = _PALETTE @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


# Ordered pairs of palette indices to texture an object with. A luma step of at least 40
# survives the strong view's grayscale, desaturation and halved contrast, so the texture
# stays visible in every view (a pair far apart in RGB alone, like red on green, would not).
_CONTRAST_PAIRS = np.array(
    [
        (a, b)
        for a in range(len(_PALETTE))
        for b in range(len(_PALETTE))
        if a != b and abs(_LUMA[a] - _LUMA[b]) >= 40
    ]
)


# --- shapes ---------------------------------------------------------------
# Each takes object-frame coordinates (u, v), already rotated and scaled so the
# shape roughly fills the unit disc, and returns a boolean mask.

_COS36, _SIN36 = math.cos(math.pi / 5), math.sin(math.pi / 5)
_STAR_INNER = 0.45


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Five-pointed star: fold the angle into one half-spike and test against
    the edge from the inner vertex (angle 0) to the tip (angle 36 degrees)."""
    rho = np.hypot(u, v)
    folded = np.abs(np.mod(np.arctan2(v, u), 2 * math.pi / 5) - math.pi / 5)
    px, py = rho * np.cos(folded), rho * np.sin(folded)
    ex, ey = _COS36 - _STAR_INNER, _SIN36
    return ex * py - ey * (px - _STAR_INNER) >= 0


def _triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Equilateral triangle with circumradius 1.2 (three half-planes)."""
    inside = np.ones(u.shape, dtype=bool)
    for k in range(3):
        a = math.pi / 2 + k * 2 * math.pi / 3
        inside &= u * math.cos(a) + v * math.sin(a) <= 0.6
    return inside


_SHAPES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "disc": lambda u, v: u * u + v * v <= 1.0,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.8,
    "triangle": _triangle,
    "cross": lambda u, v: (np.minimum(np.abs(u), np.abs(v)) <= 0.33)
    & (np.maximum(np.abs(u), np.abs(v)) <= 1.0),
    "ring": lambda u, v: (u * u + v * v <= 1.0) & (u * u + v * v >= 0.5**2),
    "star": _star,
}


# --- textures -------------------------------------------------------------
# Each maps pixel offsets from the object centre to a mixing weight in [0, 1]
# between the instance's two colours. The pattern's structure and its
# orientation in the image are the class cue, not its period (the training
# views rescale by up to 4x); phases and small jitters are random so no single
# template fits. Orientations are fixed in the image frame, as the views never
# rotate, and chosen so that no horizontal flip turns one class's pattern into
# another's (textures that turn with the object are much harder to tell apart
# for a network trained from scratch).


def _square_wave(phase: np.ndarray) -> np.ndarray:
    """Soft square wave: crisp stripes with a one-pixel-ish transition."""
    return np.clip(0.5 + 2.0 * np.sin(phase), 0.0, 1.0)


def _along(dx: np.ndarray, dy: np.ndarray, angle: float) -> np.ndarray:
    """Coordinate along direction ``angle``."""
    return dx * math.cos(angle) + dy * math.sin(angle)


# Signature shared by all textures: (dx, dy, object angle, texture scale, rng).
_Texture = Callable[[np.ndarray, np.ndarray, float, float, np.random.Generator], np.ndarray]


def _stripes(
    dx: np.ndarray,
    dy: np.ndarray,
    angle: float,
    scale: float,
    rng: np.random.Generator,
    base_angle: float = math.pi / 2,
    period: float = 6.0,
) -> np.ndarray:
    """Stripes at a class-specific image-frame orientation (horizontal by default)."""
    theta = base_angle + rng.uniform(-0.2, 0.2)
    period *= scale * rng.uniform(0.9, 1.1)
    return _square_wave(2 * math.pi * _along(dx, dy, theta) / period + rng.uniform(0, 2 * math.pi))


def _diagonal(
    dx: np.ndarray, dy: np.ndarray, angle: float, scale: float, rng: np.random.Generator
) -> np.ndarray:
    """Fine stripes at 45 degrees (135 after a horizontal flip)."""
    return _stripes(dx, dy, angle, scale, rng, base_angle=math.pi / 4, period=4.0)


def _checker(
    dx: np.ndarray, dy: np.ndarray, angle: float, scale: float, rng: np.random.Generator
) -> np.ndarray:
    """Axis-aligned checkerboard."""
    period = 8.0 * scale * rng.uniform(0.9, 1.1)
    a = dx * (2 * math.pi / period) + rng.uniform(0, 2 * math.pi)
    b = dy * (2 * math.pi / period) + rng.uniform(0, 2 * math.pi)
    return np.clip(0.5 + 3.0 * np.sin(a) * np.sin(b), 0.0, 1.0)


def _dots(
    dx: np.ndarray, dy: np.ndarray, angle: float, scale: float, rng: np.random.Generator
) -> np.ndarray:
    """Axis-aligned grid of round dots."""
    period = 6.0 * scale * rng.uniform(0.9, 1.1)
    radius = 1.7 * scale
    a = np.mod(dx + rng.uniform(0, period), period) - period / 2
    b = np.mod(dy + rng.uniform(0, period), period) - period / 2
    return np.clip(radius + 0.5 - np.hypot(a, b), 0.0, 1.0)


def _vertical(
    dx: np.ndarray, dy: np.ndarray, angle: float, scale: float, rng: np.random.Generator
) -> np.ndarray:
    """Vertical stripes (horizontal flips keep them vertical)."""
    return _stripes(dx, dy, angle, scale, rng, base_angle=0.0, period=6.0)


def _concentric(
    dx: np.ndarray, dy: np.ndarray, angle: float, scale: float, rng: np.random.Generator
) -> np.ndarray:
    """Concentric rings around the object centre."""
    period = 4.0 * scale * rng.uniform(0.9, 1.1)
    return _square_wave(2 * math.pi * np.hypot(dx, dy) / period + rng.uniform(0, 2 * math.pi))


_TEXTURES: dict[str, _Texture] = {
    "stripes": _stripes,
    "diagonal": _diagonal,
    "checker": _checker,
    "dots": _dots,
    "vertical": _vertical,
    "concentric": _concentric,
}


# --- rendering ------------------------------------------------------------


def _random_radius(rng: np.random.Generator, size: int) -> float:
    """Object radius, log-uniform over a 4x range (size/12 to size/3)."""
    return size * math.exp(rng.uniform(math.log(1 / 12), math.log(1 / 3)))


def _shape_mask(
    rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, shape: str, radius: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Place a randomly rotated, slightly squashed shape; return its mask, the
    pixel offsets from its centre and its rotation."""
    size = xx.shape[0]
    cx, cy = rng.uniform(0.05 * size, 0.95 * size, 2)
    angle = rng.uniform(0, 2 * math.pi)
    aspect = rng.uniform(0.75, 1.0)
    dx, dy = xx - cx, yy - cy
    u = (dx * math.cos(angle) + dy * math.sin(angle)) / radius
    v = (-dx * math.sin(angle) + dy * math.cos(angle)) / (radius * aspect)
    return _SHAPES[shape](u, v), dx, dy, angle


def _random_colour(rng: np.random.Generator, index: int | None = None) -> np.ndarray:
    """A palette colour with a little per-instance jitter."""
    if index is None:
        index = int(rng.integers(len(_PALETTE)))
    return np.clip(_PALETTE[index] + rng.normal(0, 12, 3), 0, 255).astype(np.float32)


def _blend(img: np.ndarray, mask: np.ndarray, colour: np.ndarray, alpha: float) -> None:
    img[mask] = (1 - alpha) * img[mask] + alpha * colour


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid, bilinearly upsampled."""
    coarse = Image.fromarray(rng.random((cells, cells), dtype=np.float32), mode="F")
    return np.asarray(coarse.resize((size, size), Image.BILINEAR), dtype=np.float32)


def _render_background(
    rng: np.random.Generator, size: int, xx: np.ndarray, yy: np.ndarray
) -> np.ndarray:
    """Textured clutter in the object colours: a mottled base, random lines and
    blobs, and textured camouflage patches, so that colour alone marks nothing."""
    grey = np.float32(128)
    c1, c2 = (grey + rng.uniform(0.4, 1.0) * (_random_colour(rng) - grey) for _ in range(2))
    img = c1 + (c2 - c1) * _smooth_noise(rng, size, int(rng.integers(3, 7)))[..., None]

    canvas = Image.new("L", (size, size))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(2, 7))):
        draw.rectangle((0, 0, size, size), fill=0)
        x0, y0, x1, y1 = rng.uniform(-0.2 * size, 1.2 * size, 4)
        draw.line((x0, y0, x1, y1), fill=255, width=int(rng.integers(1, 3)))
        _blend(img, np.asarray(canvas) > 0, _random_colour(rng), rng.uniform(0.3, 0.7))
    for _ in range(int(rng.integers(0, 3))):
        draw.rectangle((0, 0, size, size), fill=0)
        x, y = rng.uniform(0, size, 2)
        rx, ry = rng.uniform(0.05, 0.2, 2) * size
        draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=255)
        _blend(img, np.asarray(canvas) > 0, _random_colour(rng), rng.uniform(0.2, 0.5))
    for _ in range(int(rng.integers(0, 3))):
        # Irregular camouflage blotches: textured, but not a class texture.
        x, y = rng.uniform(0, size, 2)
        radius = rng.uniform(0.08, 0.25) * size
        patch = (xx - x) ** 2 + (yy - y) ** 2 <= radius**2
        blotches = _smooth_noise(rng, size, int(rng.integers(8, 16))) > 0.5
        _blend(img, patch & blotches, _random_colour(rng), rng.uniform(0.4, 0.8))
    return img


def _erode(mask: np.ndarray) -> np.ndarray:
    """4-neighbour binary erosion (the image border counts as inside)."""
    padded = np.pad(mask, 1, mode="edge")
    return (
        mask
        & padded[:-2, 1:-1]
        & padded[2:, 1:-1]
        & padded[1:-1, :-2]
        & padded[1:-1, 2:]
    )


def _boundary_band(instances: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of a later-drawn instance: a 1-pixel band just
    outside each visible object, like the PASCAL 'void' outline."""
    band = np.zeros(instances.shape, dtype=bool)
    band[:-1, :] |= instances[1:, :] > instances[:-1, :]
    band[1:, :] |= instances[:-1, :] > instances[1:, :]
    band[:, :-1] |= instances[:, 1:] > instances[:, :-1]
    band[:, 1:] |= instances[:, :-1] > instances[:, 1:]
    return band


def render_sample(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Render one image (``size x size x 3`` uint8) and its class-index mask
    (``size x size`` uint8: 0 background, 1..K objects, 255 boundary band).

    3 to 8 objects, radii spanning 4x, random rotation and aspect, may overlap
    (the later object wins) and may be cut by the image border."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    texture_scale = _TEXTURE_GAIN * max(size / _REFERENCE_SIZE, 1.0)
    img = _render_background(rng, size, xx, yy)
    labels = np.zeros((size, size), dtype=np.uint8)
    instances = np.zeros((size, size), dtype=np.int32)

    for instance in range(1, int(rng.integers(3, 9)) + 1):
        class_index = int(rng.choice(len(_OBJECT_CLASSES), p=_CLASS_PROBS))
        spec = _OBJECT_CLASSES[class_index]
        radius = _random_radius(rng, size)
        mask, dx, dy, angle = _shape_mask(rng, xx, yy, spec.shape, radius)
        weight = _TEXTURES[spec.texture](dx, dy, angle, texture_scale, rng)[..., None]
        first, second = _CONTRAST_PAIRS[int(rng.integers(len(_CONTRAST_PAIRS)))]
        colour_a, colour_b = _random_colour(rng, first), _random_colour(rng, second)
        # A gentle brightness gradient, as if lit from one side.
        light = rng.uniform(-0.15, 0.15) * _along(dx, dy, rng.uniform(0, 2 * math.pi)) / radius
        brightness = 1 + np.clip(light, -0.3, 0.3)[..., None]
        img[mask] = (((1 - weight) * colour_a + weight * colour_b) * brightness)[mask]
        labels[mask] = class_index + 1
        instances[mask] = instance

    labels[_boundary_band(instances)] = IGNORE
    img += rng.normal(0, 4, img.shape).astype(np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), labels


# --- dataset on disk ------------------------------------------------------


def _sample_ids(split: str, count: int) -> list[str]:
    return [f"{split}_{i:05d}" for i in range(count)]


def _split_line(sample_id: str) -> str:
    return f"JPEGImages/{sample_id}.jpg SegmentationClass/{sample_id}.png\n"


def _write_split(path: Path, ids: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(_split_line(i) for i in ids))


def read_generated_manifest(folder: Path, generator: str) -> dict | None:
    """The ``dataset.json`` manifest that ``generator`` wrote in ``folder``, or None. Shared
    with the demo task generators (``dssn.apps.glyphs``)."""
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if isinstance(manifest, dict) and manifest.get("generator") == generator:
        return manifest
    return None


def _read_manifest(folder: Path) -> dict | None:
    """The manifest of a dataset this module wrote in ``folder``, or None."""
    return read_generated_manifest(folder, _GENERATOR_ID)


def publish_generated(folder: Path, write: Callable[[Path], None], is_cached: Callable[[], bool]) -> Path:
    """Generate a dataset into ``folder``: ``write`` fills a hidden ``.<name>.<random>.tmp``
    sibling, which is renamed into place when complete, so ``folder`` is always whole. When
    another process renamed its copy first, ``is_cached()`` decides whether that copy is
    accepted. Shared with the demo task generators (``dssn.apps.glyphs``)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir()
    try:
        write(tmp)
        try:
            os.rename(tmp, folder)  # atomic; fails if another process renamed its copy first
        except OSError:
            if not is_cached():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # ours, unless the rename moved it
    return folder


def _cache_key(params: dict) -> str:
    """Folder name of a dataset, e.g. ``v5-96px-train512-val192-1_16-seed0``."""
    return (f"v{GENERATOR_VERSION}-{params['size']}px-train{params['num_train']}-val{params['num_val']}"
            f"-{split_name(params['labeled_fraction'])}-seed{params['seed']}")


def _check_cache_root(root: Path) -> None:
    """Refuse a cache root holding anything but our cache folders, so that a user's
    folder is never written into."""
    if not root.is_dir():
        return
    foreign = sorted(p.name for p in root.iterdir() if not _CACHE_ENTRY.fullmatch(p.name))
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise FileExistsError(
            f"{root} holds {shown}, which the synthetic dataset cache did not write; it will not "
            "write into this folder: choose a new or empty one"
        )


def _is_cached(folder: Path, params: dict) -> bool:
    """Whether ``folder`` holds the finished dataset for ``params``. False when it is
    absent or empty; raises when it holds anything else."""
    if not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
        return False
    manifest = _read_manifest(folder)
    if manifest is None:
        raise FileExistsError(
            f"{folder} exists but holds no synthetic dataset ({MANIFEST_NAME} missing or not "
            "ours); it will not be written into: move it away or choose another folder"
        )
    made = {"version": manifest.get("version"), **manifest.get("params", {})}
    if made != {"version": GENERATOR_VERSION, **params}:
        raise FileExistsError(
            f"{folder} holds a synthetic dataset made with {made}, not {params}: delete it "
            "(it regenerates in seconds) or choose another folder"
        )
    return True


def write_voc_files(
    folder: Path,
    params: dict,
    render: Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]],
    progress: bool = False,
) -> tuple[np.ndarray, list[str], list[str]]:
    """Write the images, palette masks and split files of a generated dataset into the
    empty ``folder``: sample ``index`` of ``split`` is ``render(rng, params["size"])`` with
    ``rng`` seeded by ``(params["seed"], split, index)``. Return the training pixel counts
    per mask value (256) and the labeled and unlabeled ids. Shared with the demo task
    generators (``dssn.apps.glyphs``)."""
    seed, num_train = params["seed"], params["num_train"]
    (folder / "JPEGImages").mkdir()
    (folder / "SegmentationClass").mkdir()
    palette = voc_palette()
    pixel_counts = np.zeros(256, dtype=np.int64)
    ids = {"train": _sample_ids("train", num_train), "val": _sample_ids("val", params["num_val"])}
    jobs = [(split, i, sample_id) for split in ids for i, sample_id in enumerate(ids[split])]
    for split, index, sample_id in tqdm(jobs, desc="generating images", unit="img", disable=not progress):
        rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
        image, labels = render(rng, params["size"])
        Image.fromarray(image).save(folder / "JPEGImages" / f"{sample_id}.jpg", quality=_JPEG_QUALITY)
        mask = Image.fromarray(labels)
        mask.putpalette(palette)
        mask.save(folder / "SegmentationClass" / f"{sample_id}.png", optimize=True)
        if split == "train":
            pixel_counts += np.bincount(labels.ravel(), minlength=256)

    fraction_name = split_name(params["labeled_fraction"])
    num_labeled = max(1, round(num_train * params["labeled_fraction"]))
    order = np.random.default_rng([seed, _SPLIT_IDS["labeled-subset"]]).permutation(num_train)
    labeled = sorted(ids["train"][i] for i in order[:num_labeled])
    unlabeled = sorted(set(ids["train"]) - set(labeled))
    splits = folder / "splits"
    _write_split(splits / fraction_name / "labeled.txt", labeled)
    _write_split(splits / fraction_name / "unlabeled.txt", unlabeled)
    _write_split(splits / "full" / "labeled.txt", ids["train"])
    _write_split(splits / "val.txt", ids["val"])
    return pixel_counts, labeled, unlabeled


def _write_dataset(folder: Path, params: dict, progress: bool) -> None:
    """Write the dataset for ``params`` into the empty ``folder``, the manifest last."""
    pixel_counts, labeled, unlabeled = write_voc_files(folder, params, render_sample, progress)
    num_train, fraction_name = params["num_train"], split_name(params["labeled_fraction"])

    manifest = {
        "generator": _GENERATOR_ID,
        "version": GENERATOR_VERSION,
        "params": params,
        "class_names": list(CLASS_NAMES),
        "ignore_index": IGNORE,
        "split_name": fraction_name,
        "counts": {"train": num_train, "val": params["num_val"], "labeled": len(labeled),
                   "unlabeled": len(unlabeled)},
        "train_pixel_counts": {name: int(pixel_counts[i]) for i, name in enumerate(CLASS_NAMES)},
        "train_ignored_pixels": int(pixel_counts[IGNORE]),
    }
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")


def make_synthetic(
    root: str | os.PathLike[str],
    *,
    seed: int = 0,
    num_train: int = 512,
    num_val: int = 192,
    size: int = 96,
    labeled_fraction: float = 1 / 16,
    progress: bool = False,
) -> Path:
    """Generate (or reuse) the synthetic dataset cached under ``root``; return its folder,
    ``root/<key>`` with a key naming the generator version and the parameters
    (``v5-96px-train512-val192-1_16-seed0`` for the defaults). It holds ``JPEGImages``,
    ``SegmentationClass`` (VOC palette PNGs), ``splits/<fraction>/{labeled,unlabeled}.txt``,
    ``splits/full/labeled.txt``, ``splits/val.txt`` and ``dataset.json``.

    The dataset is written to a hidden ``.<key>.<random>.tmp`` folder and renamed into place
    when complete, so a key's folder is always complete and concurrent processes all use the
    copy renamed first; a killed run's temporary folder is ignored (delete it at will).
    ``root`` holding anything else raises ``FileExistsError``: it is never written into.
    """
    if num_train < 1 or num_val < 0 or size < 16:
        raise ValueError("need num_train >= 1, num_val >= 0 and size >= 16")
    params = {
        "seed": int(seed),
        "num_train": int(num_train),
        "num_val": int(num_val),
        "size": int(size),
        "labeled_fraction": float(labeled_fraction),
    }
    root = Path(root)
    folder = root / _cache_key(params)
    _check_cache_root(root)
    if _is_cached(folder, params):
        return folder
    return publish_generated(folder, lambda tmp: _write_dataset(tmp, params, progress),
                             lambda: _is_cached(folder, params))


def resolve_synthetic(root: str | os.PathLike[str], *, progress: bool = False) -> Path:
    """The dataset folder that ``data.root`` names for the built-in dataset: ``root``
    itself when it holds a dataset (a folder ``make_synthetic`` returned), otherwise the
    default dataset cached under ``root``, generated first if absent."""
    root = Path(root)
    manifest = _read_manifest(root)
    if manifest is None:
        return make_synthetic(root, progress=progress)
    if manifest.get("version") != GENERATOR_VERSION:
        raise FileExistsError(
            f"{root} holds a synthetic dataset made by generator version {manifest.get('version')}, "
            f"and this dssn makes version {GENERATOR_VERSION}: delete the folder (it regenerates "
            "in seconds) or point data.root at another one"
        )
    return root


def class_frequencies(
    root: str | os.PathLike[str], *, foreground: bool = False
) -> dict[str, float]:
    """Per-class share of the labelled (non-ignored) train pixels, from the
    manifest; with ``foreground=True``, shares of the object pixels only."""
    manifest = _read_manifest(Path(root))
    if manifest is None:
        raise FileNotFoundError(f"no synthetic dataset manifest in {root}")
    counts = manifest["train_pixel_counts"]
    if foreground:
        counts = {name: n for name, n in counts.items() if name != CLASS_NAMES[0]}
    total = sum(counts.values())
    return {name: n / total if total else 0.0 for name, n in counts.items()}


DATASETS.add("synthetic", DatasetSpec("as pascal; generated under data.root", voc_pool, CLASS_NAMES,
                                      resolve_root=resolve_synthetic, splits_command=False))
