"""Datasets for training and evaluation, built from a ``Config``."""

from __future__ import annotations

from pathlib import Path

from dssn.config import Config
from dssn.errors import DssnError
from dssn.data.datasets import SegmentationDataset, read_split
from dssn.data.synthetic import voc_palette

__all__ = ["SegmentationDataset", "read_split", "build_train_datasets", "build_val_dataset",
           "class_names_for", "palette_for", "DataError"]

PASCAL_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)


class DataError(DssnError, ValueError):
    """The data described by the config is missing or malformed; the message says where."""


def class_names_for(cfg: Config) -> list[str]:
    d = cfg.data
    if d.class_names is not None:
        names = list(d.class_names)
    elif d.dataset == "pascal":
        names = list(PASCAL_CLASSES)
    elif d.dataset == "cityscapes":
        names = list(CITYSCAPES_CLASSES)
    elif d.dataset == "synthetic":
        from dssn.data.synthetic import CLASS_NAMES

        names = list(CLASS_NAMES)
    else:
        names = [f"class_{i}" for i in range(d.num_classes)]
    if len(names) != d.num_classes:
        raise DataError(f"data.class_names has {len(names)} names but data.num_classes is {d.num_classes}")
    return names


def palette_for(cfg: Config) -> list[int]:
    """Flat RGB palette (256 entries) used for masks and overlays."""
    if cfg.data.dataset == "cityscapes":
        flat = [c for rgb in CITYSCAPES_PALETTE for c in rgb]
        return flat + voc_palette(256)[len(flat):]
    return voc_palette(256)


def _root(cfg: Config) -> Path:
    root = Path(cfg.data.root).expanduser()
    if cfg.data.dataset == "synthetic":
        from dssn.data.synthetic import make_synthetic

        make_synthetic(root)  # cached: returns at once when already generated
    if not root.is_dir():
        raise DataError(f"data root '{root.resolve()}' does not exist (data.root). Download the dataset there "
                        f"or point data.root=PATH at it; see the README section for '{cfg.data.dataset}'.")
    return root


def _split(root: Path, value: str, key: str) -> Path:
    path = Path(value).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise DataError(f"split file '{path}' does not exist ({key}; relative paths are under data.root)")
    return path


def build_train_datasets(cfg: Config) -> tuple[SegmentationDataset, SegmentationDataset | None]:
    """Labeled and unlabeled training sets (SPEC 5.1).

    The labeled set is repeated to cover one pass over the unlabeled set, so an
    epoch is one pass over the unlabeled images whatever the method.
    """
    d, t = cfg.data, cfg.train
    root = _root(cfg)
    unlabeled = None
    length = None
    if d.unlabeled_split:
        unlabeled = SegmentationDataset(root, _split(root, d.unlabeled_split, "data.unlabeled_split"), "train_u",
                                        d.crop_size, strong_ops=d.strong_ops, seed=t.seed)
        length = (len(unlabeled) // t.batch_size_unlabeled) * t.batch_size
    labeled = SegmentationDataset(root, _split(root, d.labeled_split, "data.labeled_split"), "train_l",
                                  d.crop_size, strong_ops=d.strong_ops, length=length, seed=t.seed)
    return labeled, unlabeled


def build_val_dataset(cfg: Config) -> SegmentationDataset:
    root = _root(cfg)
    return SegmentationDataset(root, _split(root, cfg.data.val_split, "data.val_split"), "val")
