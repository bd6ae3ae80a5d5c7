"""Datasets for training and evaluation, built from a ``Config``."""

from __future__ import annotations

from pathlib import Path

from dssn.config import Config
from dssn.data.catalog import DatasetSpec, dataset_spec
from dssn.data.classes import COCO_CATEGORY_IDS, COCO_CLASSES
from dssn.data.datasets import DataError, MaskDecoder, SegmentationDataset, Split, load_split, read_split
from dssn.data.layouts import FolderMeta, Pool, load_folder_meta, pairs_to_split, scan_pool
from dssn.data.colors import voc_palette

__all__ = ["SegmentationDataset", "read_split", "build_train_datasets", "build_val_dataset",
           "class_names_for", "palette_for", "decoder_for", "data_root", "folder_meta", "split_sources", "DataError",
           "COCO_CLASSES", "COCO_CATEGORY_IDS", "DatasetSpec", "dataset_spec"]

def folder_meta(cfg: Config) -> FolderMeta | None:
    """The ``dataset.yaml`` of a ``folder`` dataset (``data.meta``, default ``ROOT/dataset.yaml``)."""
    if not dataset_spec(cfg.data.dataset).reads_meta:
        return None
    root = Path(cfg.data.root).expanduser()
    path = Path(cfg.data.meta or "dataset.yaml").expanduser()
    return load_folder_meta(path if path.is_absolute() else root / path)


def class_names_for(cfg: Config) -> list[str]:
    d = cfg.data
    meta = folder_meta(cfg)
    spec = dataset_spec(d.dataset)
    if d.class_names is not None:
        names, where = list(d.class_names), "data.class_names"
    elif meta is not None:
        names, where = list(meta.classes), f"{meta.path} ('classes')"
    elif spec.classes is not None:
        names, where = list(spec.classes), f"the {d.dataset} class list"
    else:
        names, where = [f"class_{i}" for i in range(d.num_classes)], ""
    if len(names) != d.num_classes:
        raise DataError(f"{where} has {len(names)} classes but data.num_classes is {d.num_classes}; "
                        f"set data.num_classes={len(names)}")
    return names


def palette_for(cfg: Config) -> list[int]:
    """Flat RGB palette (256 entries) used for masks and overlays."""
    meta = folder_meta(cfg)
    colours = meta.palette if meta is not None else dataset_spec(cfg.data.dataset).palette
    flat = [c for rgb in colours or () for c in rgb]
    return flat + voc_palette(256)[len(flat):]


def decoder_for(cfg: Config) -> MaskDecoder:
    """How this dataset's masks become class ids; values that are no class are errors."""
    meta = folder_meta(cfg)
    if meta is not None:
        class_names_for(cfg)  # num_classes must agree with dataset.yaml
        return meta.decoder()
    spec = dataset_spec(cfg.data.dataset)
    if spec.decoder is not None:
        class_names_for(cfg)  # num_classes must be the dataset's (ADE20K: 150)
        decoder = spec.decoder(cfg.data)
        if decoder is not None:
            return decoder
    return MaskDecoder(cfg.data.num_classes, hint=f"; data.num_classes is {cfg.data.num_classes}")


def data_root(cfg: Config) -> Path:
    """``data.root``, checked to exist. For the built-in dataset, the dataset folder it
    names: itself if it holds one, else the default one cached under it (generated if absent)."""
    root = Path(cfg.data.root).expanduser()
    resolve = dataset_spec(cfg.data.dataset).resolve_root
    if resolve is not None:
        root = resolve(root)
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
        elif dataset_spec(cfg.data.dataset).reads_meta:
            if listing is None:
                meta = folder_meta(cfg)
                assert meta is not None
                listing = meta, scan_pool(cfg.data.dataset, root, meta)
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
