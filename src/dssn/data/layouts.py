"""Where each dataset kind keeps its files, and the ``folder`` kind's ``dataset.yaml``.

A *pool* is everything a dataset folder holds, before any split: the training
images (with their mask when there is one) and the official validation pairs, if
the layout has them. ``dssn splits`` draws split files from a pool; the ``folder``
kind uses it directly when no split files are given.

Layouts (paths relative to the dataset root):

- ``pascal`` / ``synthetic``: ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png``;
  official validation ids in ``ImageSets/Segmentation/val.txt`` when present.
- ``cityscapes``: ``leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png``,
  ``gtFine/{train,val}/<city>/<name>_gtFine_labelTrainIds.png``.
- ``coco``: ``{train2017,val2017}/<id>.jpg``, ``masks/<id>.png`` (one folder for both,
  as in the authors' split files; written by ``dssn prepare coco``).
- ``ade20k`` (ADEChallengeData2016): ``images/{training,validation}/<name>.jpg``,
  ``annotations/{training,validation}/<name>.png`` (the official annotations, mapped while
  loading; see ``dssn.data.ade20k``).
- ``folder``: described by ``dataset.yaml`` (``FolderMeta``): an image folder and a mask
  folder matched by file stem (sub-folders allowed), optionally validation folders.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dssn.constants import IGNORE
from dssn.data.datasets import RGB, DataError, MaskDecoder, Split, SplitEntry
from dssn.registry import DATASETS, UnknownNameError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
META_KEYS = ("classes", "palette", "ignore_color", "values", "images", "masks", "val_images", "val_masks")

Pair = tuple[str, str | None]


@dataclass(frozen=True)
class FolderMeta:
    """The ``dataset.yaml`` of a ``folder`` dataset. Folders are relative to the YAML's folder."""

    path: Path
    classes: tuple[str, ...]
    palette: tuple[RGB, ...] | None = None
    ignore_color: RGB | None = None
    values: dict[int, int] | None = None
    images: str = "images"
    masks: str = "masks"
    val_images: str | None = None
    val_masks: str | None = None

    def decoder(self) -> MaskDecoder:
        return MaskDecoder(len(self.classes), self.values, self.palette, self.ignore_color,
                           hint=f"; the classes are declared in {self.path}")


def _meta_error(path: Path, key: str, what: str) -> DataError:
    return DataError(f"{path}: key '{key}': {what}")


def _colour(path: Path, key: str, value: Any) -> RGB:
    if (not isinstance(value, (list, tuple)) or len(value) != 3
            or not all(isinstance(c, int) and 0 <= c <= 255 for c in value)):
        raise _meta_error(path, key, f"expected a colour [r, g, b] with values 0..255, got {value!r}")
    return (value[0], value[1], value[2])


def _parse_values(path: Path, raw: Any, num_classes: int) -> dict[int, int]:
    if not isinstance(raw, dict) or not raw:
        raise _meta_error(path, "values", f"expected a mapping stored value -> class id, e.g. {{0: 0, 255: 1}}, "
                                          f"got {raw!r}")
    out = {}
    for value, cls in raw.items():
        if not isinstance(value, int) or not 0 <= value <= 65535:
            raise _meta_error(path, "values", f"stored value {value!r} must be an integer 0..65535")
        if not isinstance(cls, int) or not (0 <= cls < num_classes or cls == IGNORE):
            raise _meta_error(path, "values", f"{value}: {cls!r} is not a class id 0..{num_classes - 1} or 255")
        out[value] = cls
    return out


def _check_meta_keys(path: Path, data: dict[str, Any]) -> None:
    for key in data:
        if key not in META_KEYS:
            close = difflib.get_close_matches(str(key), META_KEYS, n=2, cutoff=0.5)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise DataError(f"{path}: unknown key '{key}'{hint} Valid keys: {', '.join(META_KEYS)}")


def load_folder_meta(path: Path) -> FolderMeta:
    """Read and validate a ``dataset.yaml``; every mistake names the file and the key."""
    if not path.is_file():
        raise DataError(f"dataset description '{path}' not found (data.meta; relative paths are under data.root). "
                        "A folder dataset needs one, e.g.\n  classes: [background, crack]\n"
                        "  values: {0: 0, 255: 1}   # optional, for 0/255 binary masks")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise DataError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a mapping of keys at the top level")
    _check_meta_keys(path, data)
    classes = data.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise _meta_error(path, "classes", f"expected a non-empty list of class names, got {classes!r}")
    if len(classes) > 255:
        raise _meta_error(path, "classes", f"at most 255 classes (255 means ignore), got {len(classes)}")
    palette = None
    if data.get("palette") is not None:
        palette = tuple(_colour(path, f"palette[{i}]", c) for i, c in enumerate(data["palette"]))
        if len(palette) != len(classes):
            raise _meta_error(path, "palette", f"has {len(palette)} colours for {len(classes)} classes")
        if len(set(palette)) != len(palette):
            raise _meta_error(path, "palette", "two classes share a colour")
    ignore = None if data.get("ignore_color") is None else _colour(path, "ignore_color", data["ignore_color"])
    if ignore is not None and palette and ignore in palette:
        raise _meta_error(path, "ignore_color", f"{ignore} is also a class colour in 'palette'")
    values = None if data.get("values") is None else _parse_values(path, data["values"], len(classes))
    folders = {k: str(data[k]) for k in ("images", "masks", "val_images", "val_masks") if data.get(k) is not None}
    if ("val_images" in folders) != ("val_masks" in folders):
        raise DataError(f"{path}: give both 'val_images' and 'val_masks' (a validation set needs masks), or neither")
    return FolderMeta(path, tuple(classes), palette, ignore, values, **folders)


# --------------------------------------------------------------------------- pools


@dataclass
class Pool:
    """What a dataset folder holds: training images (mask or None) and official val pairs."""

    train: list[Pair] = field(default_factory=list)
    val: list[Pair] = field(default_factory=list)
    val_source: str = ""
    """Where the official validation set comes from, for messages."""


def _files(folder: Path) -> dict[str, Path]:
    """Image files under ``folder`` (recursively), keyed by relative path without suffix."""
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        key = path.relative_to(folder).with_suffix("").as_posix()
        if key in found:
            raise DataError(f"{found[key]} and {path} have the same name apart from the extension, so the "
                            "mask for either is ambiguous; rename or remove one")
        found[key] = path
    return found


def match_by_stem(root: Path, images: Path, masks: Path | None) -> list[Pair]:
    """Images under ``images`` paired with the mask of the same stem under ``masks`` (or None)."""
    if not images.is_dir():
        raise DataError(f"image folder '{images}' does not exist")
    mask_files = _files(masks) if masks is not None and masks.is_dir() else {}
    pairs = []
    for key, image in _files(images).items():
        mask = mask_files.get(key)
        pairs.append((image.relative_to(root).as_posix(), mask.relative_to(root).as_posix() if mask else None))
    return pairs


def voc_pool(root: Path, meta: FolderMeta | None = None) -> Pool:
    pairs = [(f"JPEGImages/{p.stem}.jpg", f"SegmentationClass/{p.stem}.png"
              if (root / "SegmentationClass" / f"{p.stem}.png").is_file() else None)
             for p in sorted((root / "JPEGImages").glob("*.jpg"))]
    if not pairs:
        raise DataError(f"no JPEGImages/*.jpg under {root}: is this a PASCAL VOC folder?")
    val_list = root / "ImageSets" / "Segmentation" / "val.txt"
    if not val_list.is_file():
        return Pool(pairs)
    val_ids = set(val_list.read_text().split())
    train = [p for p in pairs if Path(p[0]).stem not in val_ids]
    val = [(f"JPEGImages/{i}.jpg", f"SegmentationClass/{i}.png") for i in sorted(val_ids)]
    return Pool(train, val, str(val_list))


def _cityscapes_pairs(root: Path, split: str) -> list[Pair]:
    pairs = []
    for image in sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png")):
        rel = image.relative_to(root / "leftImg8bit")
        mask = Path("gtFine") / rel.parent / rel.name.replace("_leftImg8bit.png", "_gtFine_labelTrainIds.png")
        pairs.append((f"leftImg8bit/{rel.as_posix()}", mask.as_posix() if (root / mask).is_file() else None))
    return pairs


def cityscapes_pool(root: Path, meta: FolderMeta | None = None) -> Pool:
    train = _cityscapes_pairs(root, "train")
    if not train:
        raise DataError(f"no leftImg8bit/train/<city>/*_leftImg8bit.png under {root}: is this a Cityscapes folder?")
    return Pool(train, [p for p in _cityscapes_pairs(root, "val") if p[1]], f"{root}/leftImg8bit/val")


def _coco_pairs(root: Path, split: str) -> list[Pair]:
    return [(f"{split}/{p.name}", f"masks/{p.stem}.png" if (root / "masks" / f"{p.stem}.png").is_file() else None)
            for p in sorted((root / split).glob("*.jpg"))]


def coco_pool(root: Path, meta: FolderMeta | None = None) -> Pool:
    train = _coco_pairs(root, "train2017")
    if not train:
        raise DataError(f"no train2017/*.jpg under {root}: is this a COCO folder?")
    return Pool(train, [p for p in _coco_pairs(root, "val2017") if p[1]], f"{root}/val2017")


def _ade20k_pairs(root: Path, split: str) -> list[Pair]:
    masks = root / "annotations" / split
    return [(f"images/{split}/{p.name}", f"annotations/{split}/{p.stem}.png" if (masks / f"{p.stem}.png").is_file()
             else None) for p in sorted((root / "images" / split).glob("*.jpg"))]


def ade20k_pool(root: Path, meta: FolderMeta | None = None) -> Pool:
    train = _ade20k_pairs(root, "training")
    if not train:
        raise DataError(f"no images/training/*.jpg under {root}: is this the ADEChallengeData2016 folder?")
    return Pool(train, [p for p in _ade20k_pairs(root, "validation") if p[1]], f"{root}/images/validation")


def folder_pool(root: Path, meta: FolderMeta | None = None) -> Pool:
    if meta is None:
        raise ValueError("the folder layout needs its dataset.yaml (meta)")
    train = match_by_stem(root, root / meta.images, root / meta.masks)
    if meta.val_images is None or meta.val_masks is None:
        return Pool(train)
    val = match_by_stem(root, root / meta.val_images, root / meta.val_masks)
    missing = [image for image, mask in val if mask is None]
    if missing:
        raise DataError(f"{len(missing)} validation image(s) in '{meta.val_images}' have no mask in "
                        f"'{meta.val_masks}' (first: {missing[0]}); every validation image needs a mask")
    return Pool(train, val, f"{root / meta.val_images}")


def scan_pool(kind: str, root: Path, meta: FolderMeta | None = None) -> Pool:
    """List what a dataset folder of the given kind holds (its spec's ``scan``, ``dssn.data.catalog``)."""
    if not root.is_dir():
        raise DataError(f"data root '{root}' does not exist")
    try:
        spec = DATASETS[kind]
    except UnknownNameError as err:
        raise DataError(str(err)) from None
    return spec.scan(root, meta)


def pairs_to_split(pairs: list[Pair], source: str) -> Split:
    """A listed (not file-backed) split; its entries have no line number (0)."""
    return Split(source, tuple(SplitEntry(image, mask, 0) for image, mask in pairs))
