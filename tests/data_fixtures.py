"""Tiny datasets in each real layout, written into a temporary folder by the tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from dssn.config import Config, load_config
from dssn.data import COCO_CATEGORY_IDS, COCO_CLASSES
from dssn.data.colors import voc_palette

W, H = 40, 30


def write_image(path: Path, seed: int, size: tuple[int, int] = (W, H)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_index_mask(path: Path, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = Image.fromarray(labels.astype(np.uint8)).convert("P")
    mask.putpalette(voc_palette(256))
    mask.save(path)


def labels(seed: int, num_classes: int, ignore_row: bool = True) -> np.ndarray:
    out = np.random.default_rng(seed).integers(0, num_classes, (H, W), dtype=np.uint8)
    if ignore_row:
        out[0] = 255
    return out


def make_voc(root: Path, n_train: int = 6, n_val: int = 2, num_classes: int = 21) -> Path:
    """JPEGImages + SegmentationClass, and the official val list in ImageSets."""
    ids = [f"2007_{i:06d}" for i in range(n_train + n_val)]
    for i, name in enumerate(ids):
        write_image(root / "JPEGImages" / f"{name}.jpg", i)
        write_index_mask(root / "SegmentationClass" / f"{name}.png", labels(i, num_classes))
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids[n_train:]) + "\n")
    return root


def make_cityscapes_raw(root: Path, per_split: dict[str, int] | None = None) -> Path:
    """leftImg8bit PNGs and raw gtFine *_labelIds.png (ids 0..33), two cities."""
    per_split = per_split or {"train": 4, "val": 2}
    k = 0
    for split, n in per_split.items():
        for i in range(n):
            city = ("aachen", "bonn")[i % 2]
            stem = f"{city}_{i:06d}_000019"
            write_image(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", k)
            ids = np.random.default_rng(k).integers(0, 34, (H, W), dtype=np.uint8)
            path = root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(ids, "L").save(path)
            k += 1
    return root


def _square(x: int, y: int, s: int) -> list[float]:
    return [x, y, x + s, y, x + s, y + s, x, y + s]


def make_coco_raw(root: Path, n_train: int = 4, n_val: int = 2) -> Path:
    """train2017/val2017 JPEGs and instance annotation JSONs with COCO's 80 categories."""
    categories = [{"id": cid, "name": name, "supercategory": "x"}
                  for cid, name in zip(COCO_CATEGORY_IDS, COCO_CLASSES[1:])]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, n, offset in (("train2017", n_train, 0), ("val2017", n_val, 100)):
        images, anns = [], []
        for i in range(n):
            image_id = offset + i + 1
            name = f"{image_id:012d}.jpg"
            write_image(root / split / name, image_id)
            images.append({"id": image_id, "file_name": name, "width": W, "height": H})
            # a big person (category 1) under a small toothbrush (category 90): painted largest first
            anns.append({"id": 2 * image_id, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                         "segmentation": [_square(2, 2, 20)], "area": 400.0, "bbox": [2, 2, 20, 20]})
            anns.append({"id": 2 * image_id + 1, "image_id": image_id, "category_id": 90, "iscrowd": 0,
                         "segmentation": [_square(6, 6, 6)], "area": 36.0, "bbox": [6, 6, 6, 6]})
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(
            {"images": images, "annotations": anns, "categories": categories}))
    return root


def ade20k_raw_labels(seed: int) -> np.ndarray:
    """An official-style annotation: 0 ("other") and class values 1..150, both ends present."""
    out = np.random.default_rng(seed).integers(0, 151, (H, W), dtype=np.uint8)
    out[0, :3] = (0, 1, 150)
    return out


def make_ade20k_raw(root: Path, n_train: int = 4, n_val: int = 2) -> Path:
    """ADEChallengeData2016: images/{training,validation}/*.jpg, raw annotations/{...}/*.png."""
    for split, prefix, n, offset in (("training", "ADE_train", n_train, 0), ("validation", "ADE_val", n_val, 100)):
        for i in range(n):
            name = f"{prefix}_{i + 1:08d}"
            write_image(root / "images" / split / f"{name}.jpg", offset + i)
            path = root / "annotations" / split / f"{name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(ade20k_raw_labels(offset + i), "L").save(path)
    return root


def make_folder(root: Path, *, colour: bool = False, binary: bool = False, n_labeled: int = 3,
                n_unlabeled: int = 4, n_val: int = 2) -> Path:
    """images/ + masks/ (some images have no mask) + val/, and dataset.yaml.

    Masks: class-index PNGs, RGB colour-coded PNGs (``colour``), or 0/255 binary
    grayscale masks with a value map (``binary``). Some images are grayscale or 16-bit.
    """
    classes = ["background", "thing"] if binary else ["background", "road", "tree"]
    palette = [[0, 0, 0], [128, 64, 128], [0, 128, 0]]
    meta: dict = {"classes": classes}
    if n_val:
        meta |= {"val_images": "val/images", "val_masks": "val/masks"}
    if colour:
        meta |= {"palette": palette, "ignore_color": [255, 255, 255]}
    if binary:
        meta["values"] = {0: 0, 255: 1}
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.yaml").write_text(yaml.safe_dump(meta))

    def mask_for(path: Path, seed: int) -> None:
        lab = labels(seed, len(classes), ignore_row=not binary)
        path.parent.mkdir(parents=True, exist_ok=True)
        if colour:
            rgb = np.array(palette + [[255, 255, 255]] * 253, dtype=np.uint8)[np.where(lab == 255, 3, lab)]
            Image.fromarray(rgb, "RGB").save(path)
        elif binary:
            Image.fromarray((lab * 255).astype(np.uint8), "L").save(path)
        else:
            write_index_mask(path, lab)

    for i in range(n_labeled + n_unlabeled):
        image = root / "images" / f"img{i}.png"
        if i == 0:  # grayscale
            image.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((H, W), 90, np.uint8), "L").save(image)
        elif i == 1:  # 16-bit grayscale
            Image.fromarray(np.full((H, W), 40000, np.uint16)).save(image)
        else:
            write_image(image, i)
        if i < n_labeled:
            mask_for(root / "masks" / f"img{i}.png", i)
    for i in range(n_val):
        write_image(root / "val" / "images" / f"v{i}.jpg", 50 + i)
        mask_for(root / "val" / "masks" / f"v{i}.png", 50 + i)
    return root


TINY = ["model.backbone=resnet18", "model.backbone_width=8", "model.decoder_channels=8", "model.pretrained=null",
        "data.crop_size=32", "data.num_workers=0", "train.iters=1", "train.batch_size=2",
        "train.batch_size_unlabeled=2", "train.progress=false", "eval.crop_size=32",
        # one thread: on a busy 2-core machine two torch threads made each step ~50x slower
        "train.threads=1"]


def tiny_config(preset: str, root: Path, run_dir: Path, *extra: str) -> Config:
    return load_config(preset, [f"data.root={root}", f"run_dir={run_dir}", *TINY, *extra])
