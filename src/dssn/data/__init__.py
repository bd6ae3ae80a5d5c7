"""Datasets for training and evaluation, built from a ``Config``."""

from __future__ import annotations

from pathlib import Path

from dssn.config import Config
from dssn.data.ade20k import ADE20K_CLASSES, ADE20K_PALETTE, Ade20kDecoder
from dssn.data.datasets import DataError, MaskDecoder, SegmentationDataset, Split, load_split, read_split
from dssn.data.layouts import FolderMeta, Pool, load_folder_meta, pairs_to_split, scan_pool
from dssn.data.synthetic import CLASS_NAMES, resolve_synthetic, voc_palette

__all__ = ["SegmentationDataset", "read_split", "build_train_datasets", "build_val_dataset",
           "class_names_for", "palette_for", "decoder_for", "data_root", "folder_meta", "split_sources", "DataError",
           "COCO_CLASSES", "COCO_CATEGORY_IDS"]

PASCAL_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
# COCO: background + the 80 "thing" categories. Category ids in increasing order map to
# class ids 1..80 (the mapping UniMatch and DSSN used); ids 12, 26, 29, 30, 45, 66, 68,
# 69, 71 and 83 are unused in the official annotations.
COCO_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32, 33, 34,
    35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63,
    64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
)
COCO_CLASSES = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep",
    "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)


def folder_meta(cfg: Config) -> FolderMeta | None:
    """The ``dataset.yaml`` of a ``folder`` dataset (``data.meta``, default ``ROOT/dataset.yaml``)."""
    if cfg.data.dataset != "folder":
        return None
    root = Path(cfg.data.root).expanduser()
    path = Path(cfg.data.meta or "dataset.yaml").expanduser()
    return load_folder_meta(path if path.is_absolute() else root / path)


def class_names_for(cfg: Config) -> list[str]:
    d = cfg.data
    meta = folder_meta(cfg)
    if d.class_names is not None:
        names, where = list(d.class_names), "data.class_names"
    elif meta is not None:
        names, where = list(meta.classes), f"{meta.path} ('classes')"
    elif d.dataset == "pascal":
        names, where = list(PASCAL_CLASSES), "the pascal class list"
    elif d.dataset == "cityscapes":
        names, where = list(CITYSCAPES_CLASSES), "the cityscapes class list"
    elif d.dataset == "coco":
        names, where = list(COCO_CLASSES), "the coco class list"
    elif d.dataset == "ade20k":
        names, where = list(ADE20K_CLASSES), "the ade20k class list"
    elif d.dataset == "synthetic":
        names, where = list(CLASS_NAMES), "the synthetic class list"
    else:
        names, where = [f"class_{i}" for i in range(d.num_classes)], ""
    if len(names) != d.num_classes:
        raise DataError(f"{where} has {len(names)} classes but data.num_classes is {d.num_classes}; "
                        f"set data.num_classes={len(names)}")
    return names


def palette_for(cfg: Config) -> list[int]:
    """Flat RGB palette (256 entries) used for masks and overlays."""
    meta = folder_meta(cfg)
    if meta is not None and meta.palette:
        flat = [c for rgb in meta.palette for c in rgb]
        return flat + voc_palette(256)[len(flat):]
    if cfg.data.dataset in ("cityscapes", "ade20k"):
        colours = CITYSCAPES_PALETTE if cfg.data.dataset == "cityscapes" else ADE20K_PALETTE
        flat = [c for rgb in colours for c in rgb]
        return flat + voc_palette(256)[len(flat):]
    return voc_palette(256)


def decoder_for(cfg: Config) -> MaskDecoder:
    """How this dataset's masks become class ids; values that are no class are errors."""
    meta = folder_meta(cfg)
    if meta is not None:
        class_names_for(cfg)  # num_classes must agree with dataset.yaml
        return meta.decoder()
    if cfg.data.dataset == "ade20k":
        class_names_for(cfg)  # num_classes must be ADE20K's 150
        if cfg.data.ade20k_masks == "raw":
            return Ade20kDecoder()
    return MaskDecoder(cfg.data.num_classes, hint=f"; data.num_classes is {cfg.data.num_classes}")


def data_root(cfg: Config) -> Path:
    """``data.root``, checked to exist. For the built-in dataset, the dataset folder it
    names: itself if it holds one, else the default one cached under it (generated if absent)."""
    root = Path(cfg.data.root).expanduser()
    if cfg.data.dataset == "synthetic":
        root = resolve_synthetic(root)
    if not root.is_dir():
        raise DataError(f"data root '{root.resolve()}' does not exist (data.root). Download the dataset there "
                        f"or point data.root=PATH at it; see the README section for '{cfg.data.dataset}'.")
    return root


ROLES = (("labeled", "labeled_split"), ("unlabeled", "unlabeled_split"), ("val", "val_split"))


def _listed(meta: FolderMeta, pool: Pool, root: Path, role: str) -> Split | None:
    """A ``folder`` split with no file: labeled = images with a mask, unlabeled = images
    without one, val = the validation folders of ``dataset.yaml``."""
    if role == "val":
        if not pool.val:
            raise DataError(f"no validation set: data.val_split is not set and {meta.path} names no "
                            "'val_images'/'val_masks' folders. Make split files with "
                            f"`dssn splits folder {root} --labeled all --val 10%`, or add validation folders")
        return pairs_to_split(pool.val, f"{root / str(meta.val_images)} (validation images)")
    pairs = [p for p in pool.train if (p[1] is not None) == (role == "labeled")]
    if role == "labeled" and not pairs:
        raise DataError(f"no image in {root / meta.images} has a mask of the same name in {root / meta.masks}")
    what = "images with a mask" if role == "labeled" else "images without a mask"
    return pairs_to_split(pairs, f"{root / meta.images} ({what})") if pairs else None


def split_sources(cfg: Config, root: Path) -> dict[str, Path | Split | None]:
    """Each role's split: a split file path (absolute, not yet checked), a listed ``Split``
    (``folder`` datasets with no split file) or None (no unlabeled set)."""
    out: dict[str, Path | Split | None] = {}
    listing: tuple[FolderMeta, Pool] | None = None
    for role, key in ROLES:
        value = getattr(cfg.data, key)
        if value is not None:
            path = Path(value).expanduser()
            out[role] = path if path.is_absolute() else root / path
        elif cfg.data.dataset == "folder":
            if listing is None:
                meta = folder_meta(cfg)
                assert meta is not None
                listing = meta, scan_pool("folder", root, meta)
            out[role] = _listed(*listing, root, role)
        elif role == "unlabeled":
            out[role] = None
        else:
            raise DataError(f"data.{key} is not set; the {cfg.data.dataset} dataset needs split files "
                            f"(make them with `dssn splits {cfg.data.dataset} {root} --labeled N`)")
    return out


def _load(source: Path | Split, key: str) -> Split:
    if isinstance(source, Split):
        return source
    if not source.is_file():
        raise DataError(f"split file '{source}' does not exist ({key}; relative paths are under data.root)")
    return load_split(source)


def build_train_datasets(cfg: Config) -> tuple[SegmentationDataset, SegmentationDataset | None]:
    """Labeled and unlabeled training sets (docs/method.md §6).

    The labeled set is repeated to cover one pass over the unlabeled set, so an
    epoch is one pass over the unlabeled images whatever the method.
    """
    d, t = cfg.data, cfg.train
    root = data_root(cfg)
    sources = split_sources(cfg, root)
    decoder = decoder_for(cfg)
    unlabeled = None
    length = None
    if sources["unlabeled"] is not None:
        unlabeled = SegmentationDataset(root, _load(sources["unlabeled"], "data.unlabeled_split"), "train_u",
                                        d.crop_size, strong_ops=d.strong_ops, seed=t.seed, decoder=decoder)
        length = (len(unlabeled) // t.batch_size_unlabeled) * t.batch_size
    labeled = SegmentationDataset(root, _load(sources["labeled"], "data.labeled_split"), "train_l",
                                  d.crop_size, strong_ops=d.strong_ops, length=length, seed=t.seed, decoder=decoder)
    return labeled, unlabeled


def build_val_dataset(cfg: Config) -> SegmentationDataset:
    root = data_root(cfg)
    return SegmentationDataset(root, _load(split_sources(cfg, root)["val"], "data.val_split"), "val",
                               decoder=decoder_for(cfg))
