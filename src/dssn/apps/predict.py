"""``dssn predict``: segment image files, folders or globs with a trained network.

For each input image two files are written under ``OUT``:

- ``masks/<name>.png``: the class index of every pixel (palette PNG with the
  dataset's colours, at the image's original size; the class names are in the
  PNG's ``dssn:classes`` text chunk);
- ``overlays/<name>.jpg``: the image and the image with the coloured mask blended
  in, side by side.

``<name>`` is the file name without its extension, or its path relative to the
folder given (sub-folders are kept). Existing outputs are never replaced unless
``overwrite``; with ``skip_existing`` inputs whose outputs exist are left out.
Images of the same size are run in batches of ``batch_size``.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin
from tqdm import tqdm

from dssn.apps.inference import AUTO
from dssn.apps.segmenter import OVERLAY_ALPHA, open_segmenter, read_rgb
from dssn.data.colors import blend
from dssn.errors import DssnError
from dssn.files import atomic_path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm")
MASKS_DIR = "masks"
OVERLAYS_DIR = "overlays"
_LISTED = 5


class PredictError(DssnError, ValueError):
    """Inputs or outputs of ``dssn predict`` that cannot be used; the message says why."""


@dataclass(frozen=True)
class Item:
    image: Path
    name: str
    """Output name without suffix (may contain ``/`` for images found in sub-folders)."""


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def collect_inputs(inputs: list[str]) -> list[Item]:
    """Files, folders (searched recursively) and glob patterns -> items with unique output names."""
    items: list[Item] = []
    for text in inputs:
        path = Path(text).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if _is_image(p))
            if not found:
                raise PredictError(f"folder '{path}' holds no images ({', '.join(IMAGE_SUFFIXES)})")
            items += [Item(p, p.relative_to(path).with_suffix("").as_posix()) for p in found]
        elif path.is_file():
            items.append(Item(path, path.stem))
        elif glob.has_magic(text):
            found = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True))
            found = [p for p in found if _is_image(p)]
            if not found:
                raise PredictError(f"pattern '{text}' matches no image file")
            items += [Item(p, p.stem) for p in found]
        else:
            raise PredictError(f"input '{text}' does not exist (give image files, folders or glob patterns)")
    unique: dict[Path, Item] = {}
    for item in items:
        unique.setdefault(item.image.resolve(), item)
    by_name: dict[str, list[Path]] = {}
    for item in unique.values():
        by_name.setdefault(item.name, []).append(item.image)
    clashes = {n: ps for n, ps in by_name.items() if len(ps) > 1}
    if clashes:
        shown = "; ".join(f"{n}: {', '.join(map(str, ps))}" for n, ps in list(clashes.items())[:_LISTED])
        raise PredictError(f"{len(clashes)} output name(s) would be shared by several inputs ({shown}); "
                           "give their folder instead (sub-folders are kept) or predict them separately")
    return list(unique.values())


def output_paths(out_dir: Path, item: Item) -> tuple[Path, Path]:
    return out_dir / MASKS_DIR / f"{item.name}.png", out_dir / OVERLAYS_DIR / f"{item.name}.jpg"


def overlay(image: np.ndarray, pred: np.ndarray, palette: list[int], alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """``image | image blended with the coloured mask``, side by side (``[H, 2W, 3]``); the right
    half is what ``Segmenter.overlay`` returns."""
    return np.concatenate([image, blend(image, pred, palette, alpha)], axis=1)


def _write_atomic(img: Image.Image, path: Path, **save_args) -> None:
    with atomic_path(path, durable=False) as tmp:
        img.save(tmp, **save_args)


def write_outputs(out_dir: Path, item: Item, image: np.ndarray, pred: np.ndarray, palette: list[int],
                  class_names: list[str]) -> None:
    mask_path, overlay_path = output_paths(out_dir, item)
    mask = Image.fromarray(pred.astype(np.uint8))
    mask.putpalette(palette[:768])
    info = PngImagePlugin.PngInfo()
    info.add_text("dssn:classes", json.dumps(class_names))
    _write_atomic(mask, mask_path, format="PNG", pnginfo=info)
    _write_atomic(Image.fromarray(overlay(image, pred, palette)), overlay_path, format="JPEG", quality=90)


@dataclass
class PredictSummary:
    written: int
    skipped: int
    network: str
    out_dir: Path
    network_reason: str = ""
    """Why this network (``as asked``, ``best mIoU on the last evaluation: ...``)."""


def predict_files(checkpoint: str, inputs: list[str], out_dir: str | Path, *, config: str | None = None,
                  overrides: list[str] | None = None, model: str | None = AUTO, batch_size: int = 4,
                  overwrite: bool = False, skip_existing: bool = False, progress: bool = True) -> PredictSummary:
    """Segment every input image with one network of ``checkpoint`` (``model``: ``auto``, the one
    that scored best on the last evaluation, or ``student``/``teacher``/``model``).

    Decoding, inference and masks are :class:`dssn.apps.segmenter.Segmenter`'s, so they equal
    ``dssn.load(checkpoint).predict(image)``: the config's ``eval`` section (``mode`` whole or
    sliding, ``scales``, ``flip``; ``center_crop`` runs as whole), on ``train.device``.
    """
    if batch_size < 1:
        raise PredictError(f"--batch-size must be at least 1, got {batch_size}")
    out_dir = Path(out_dir).expanduser()
    items = collect_inputs(inputs)
    existing = [p for item in items for p in output_paths(out_dir, item) if p.exists()]
    skipped = 0
    if existing and skip_existing:
        todo = [item for item in items if not all(p.exists() for p in output_paths(out_dir, item))]
        skipped = len(items) - len(todo)
        items = todo
    elif existing and not overwrite:
        shown = ", ".join(str(p) for p in existing[:_LISTED])
        more = f" and {len(existing) - _LISTED} more" if len(existing) > _LISTED else ""
        raise PredictError(f"{len(existing)} output file(s) already exist ({shown}{more}); nothing was written. "
                           "Use --overwrite to replace them, --skip-existing to leave those images out, "
                           "or choose another --out")

    segmenter = open_segmenter(checkpoint, model, device=None, config=config, overrides=overrides)

    # Images of one size share batches: order by size (read from the headers only).
    def size_of(item: Item) -> tuple[int, int]:
        try:
            with Image.open(item.image) as img:
                return img.size
        except (OSError, SyntaxError, ValueError) as err:
            raise PredictError(f"image '{item.image}' cannot be read: {err}") from None

    items = sorted(items, key=size_of)
    bar = tqdm(total=len(items), unit="img", disable=not progress, desc=f"predict ({segmenter.network})")
    pending: list[tuple[Item, np.ndarray]] = []

    def run(batch: list[tuple[Item, np.ndarray]]) -> None:
        masks = segmenter.predict([rgb for _, rgb in batch], batch_size=len(batch))
        for (item, rgb), mask in zip(batch, masks):
            write_outputs(out_dir, item, rgb, mask, segmenter.png_palette, segmenter.classes)
        bar.update(len(batch))

    try:
        for item in items:
            rgb = read_rgb(item.image)
            if pending and (len(pending) >= batch_size or pending[0][1].shape != rgb.shape):
                run(pending)
                pending = []
            pending.append((item, rgb))
        if pending:
            run(pending)
    finally:
        bar.close()
    return PredictSummary(len(items), skipped, segmenter.network, out_dir, segmenter.network_reason)
