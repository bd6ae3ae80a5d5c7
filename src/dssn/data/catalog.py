"""Every dataset layout dssn reads, one ``DatasetSpec`` each, registered in ``DATASETS``.

``data.dataset``'s choices, ``dssn splits`` and ``dssn prepare``'s choices, ``dssn check-data``,
class names, palettes, mask decoders and the layout table of docs/design.md all read this
table: a new layout is its spec (a module of its own if it needs code) plus one ``DATASETS.add``
line below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dssn.config import DataConfig
from dssn.data.ade20k import ADE20K_CLASSES, ADE20K_PALETTE, Ade20kDecoder
from dssn.data.classes import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, COCO_CLASSES, PASCAL_CLASSES
from dssn.data.datasets import RGB, MaskDecoder
from dssn.data.layouts import FolderMeta, Pool, ade20k_pool, cityscapes_pool, coco_pool, folder_pool, voc_pool
from dssn.data.prepare import PrepareOptions, ade20k_step, cityscapes_step, coco_step
from dssn.registry import DATASETS


@dataclass(frozen=True)
class DatasetSpec:
    """What dssn knows of one dataset layout."""

    layout: str
    """Where its files are, relative to the root (one line, for the docs)."""
    scan: Callable[[Path, FolderMeta | None], Pool]
    """Lists a dataset folder (``dssn splits``; ``folder`` datasets without split files)."""
    classes: tuple[str, ...] | None = None
    """Class names; None: from the root's ``dataset.yaml`` (``reads_meta``)."""
    palette: tuple[RGB, ...] | None = None
    """Colours of the first classes; the PASCAL VOC palette for the rest (and for None)."""
    decoder: Callable[[DataConfig], MaskDecoder | None] | None = None
    """For masks that hold something other than class ids (ADE20K's raw annotations)."""
    prepare: Callable[[Path, PrepareOptions], list[str]] | None = None
    """``dssn prepare NAME ROOT``: writes class-index masks, returns what it did (one line each)."""
    resolve_root: Callable[..., Path] | None = None
    """``data.root`` -> the dataset folder for a generated dataset, generated and cached there:
    called as ``resolve_root(root)`` by training and ``resolve_root(root, progress=True)`` by
    ``dssn demo``, which offers every dataset that has one as a task."""
    reads_meta: bool = False
    """Described by a ``dataset.yaml`` (``data.meta``); split files optional."""
    splits_command: bool = True
    """``dssn splits NAME ROOT`` draws split files from it."""


def _ade20k_decoder(data: DataConfig) -> MaskDecoder | None:
    return Ade20kDecoder() if data.ade20k_masks == "raw" else None


DATASETS.add("pascal", DatasetSpec("JPEGImages/<id>.jpg, SegmentationClass/<id>.png", voc_pool,
                                   PASCAL_CLASSES))
DATASETS.add("cityscapes", DatasetSpec("leftImg8bit/{train,val}/<city>/*_leftImg8bit.png, "
                                       "gtFine/.../*_gtFine_labelTrainIds.png", cityscapes_pool, CITYSCAPES_CLASSES,
                                       CITYSCAPES_PALETTE, prepare=cityscapes_step))
DATASETS.add("coco", DatasetSpec("{train2017,val2017}/<id>.jpg, masks/<id>.png", coco_pool, COCO_CLASSES,
                                 prepare=coco_step))
DATASETS.add("ade20k", DatasetSpec("images/{training,validation}/<name>.jpg, annotations/.../<name>.png",
                                   ade20k_pool, ADE20K_CLASSES, ADE20K_PALETTE, _ade20k_decoder, ade20k_step))
DATASETS.add("folder", DatasetSpec("described by ROOT/dataset.yaml", folder_pool, reads_meta=True))


def dataset_spec(name: str) -> DatasetSpec:
    return DATASETS[name]
