"""Data-pipeline throughput: can one loader worker keep a GPU busy?

Measures, in one process with one torch thread (what a DataLoader worker gets):

1. samples per second for *unlabeled* training samples (weak view + two strong views +
   two CutMix boxes + ignore mask, docs/method.md §6) on VOC-sized JPEGs (500x375, crop 513,
   strong ops on, written on the fly into a temp folder) and on the built-in
   synthetic data (96x96, crop 64), plus labeled samples for comparison;
2. the time of each augmentation step on a 513x513 weak view: every op of the
   ``STRONG_OPS`` registry and the others (decode, resize, crop, flip, jitter, ...).

Usage: ``.venv/bin/python benchmarks/data.py [--samples 60] [--reps 30]`` (about a minute).
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dssn.data.datasets import SegmentationDataset, open_image, write_split
from dssn.apps.synthetic import make_synthetic
from dssn.data.transforms import (
    STRONG_OPS,
    color_jitter,
    cutmix_box,
    hflip,
    pad_crop,
    random_blur,
    random_grayscale,
    random_strong_ops,
    resize_long_side,
    strong_view,
    to_tensor_normalized,
)

VOC_SIZE = (500, 375)
VOC_CROP = 513
SYNTHETIC_CROP = 64


def voc_like_image(rng: np.random.Generator) -> np.ndarray:
    """A photo-like 500x375 image: smooth colour gradients, shapes and mild noise (JPEG
    decode time depends on content; pure noise would be unrealistically slow)."""
    w, h = VOC_SIZE
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([128 + 100 * np.sin(x / rng.uniform(20, 80) + c) * np.cos(y / rng.uniform(20, 80))
                    for c in range(3)], axis=-1)
    for _ in range(8):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(10, 80)
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_voc_like(root: Path, n: int) -> Path:
    """JPEGs plus random class-index masks in the VOC layout, and a split file."""
    rng = np.random.default_rng(0)
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    pairs = []
    for i in range(n):
        Image.fromarray(voc_like_image(rng)).save(root / "JPEGImages" / f"{i:06d}.jpg", quality=90)
        mask = rng.integers(0, 21, (VOC_SIZE[1] // 25, VOC_SIZE[0] // 25), dtype=np.uint8)
        Image.fromarray(mask).resize(VOC_SIZE, Image.NEAREST).save(root / "SegmentationClass" / f"{i:06d}.png")
        pairs.append((f"JPEGImages/{i:06d}.jpg", f"SegmentationClass/{i:06d}.png"))
    write_split(root / "train.txt", pairs)
    return root / "train.txt"


def samples_per_second(ds: SegmentationDataset, n: int) -> float:
    for i in range(min(3, n)):  # warm-up: file cache, lazy imports
        ds[i]
    start = time.perf_counter()
    for i in range(n):
        ds[i % len(ds)]
    return n / (time.perf_counter() - start)


def time_op(fn: Callable[[random.Random], object], reps: int) -> float:
    """Mean milliseconds of ``fn`` over ``reps`` calls, each with its own seeded rng (the mean,
    not the median, so an op applied with probability p is charged its expected cost)."""
    fn(random.Random(-1))
    times = []
    for r in range(reps):
        rng = random.Random(r)
        start = time.perf_counter()
        fn(rng)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.fmean(times)


def op_table(jpeg: Path, reps: int) -> list[tuple[str, float]]:
    img = open_image(jpeg).convert("RGB")
    mask = Image.new("L", img.size, 0)
    big, big_mask = resize_long_side(img, mask, (1.5, 1.5), rng=random.Random(0))
    weak, weak_mask = pad_crop(big, big_mask, VOC_CROP, rng=random.Random(0))
    rows: list[tuple[str, float]] = [
        ("decode JPEG 500x375 + to RGB", time_op(lambda rng: open_image(jpeg).convert("RGB"), reps)),
        ("resize_long_side (x0.5-2)", time_op(lambda rng: resize_long_side(img, mask, rng=rng), reps)),
        ("pad_crop 513", time_op(lambda rng: pad_crop(big, big_mask, VOC_CROP, rng=rng), reps)),
        ("hflip (p=0.5)", time_op(lambda rng: hflip(weak, weak_mask, rng=rng), reps)),
        ("color_jitter (p=0.8)", time_op(lambda rng: color_jitter(weak, rng=rng), reps)),
        ("random_grayscale (p=0.2)", time_op(lambda rng: random_grayscale(weak, rng=rng), reps)),
        ("random_blur (p=0.5)", time_op(lambda rng: random_blur(weak, rng=rng), reps)),
        ("random_strong_ops (1-3 ops)", time_op(lambda rng: random_strong_ops(weak, rng=rng), reps)),
        ("strong_view (all of the above)", time_op(lambda rng: strong_view(weak, True, rng=rng), reps)),
        ("cutmix_box 513", time_op(lambda rng: cutmix_box(VOC_CROP, rng=rng), reps)),
        ("to_tensor_normalized 513", time_op(lambda rng: to_tensor_normalized(weak), reps)),
    ]
    rows += [(f"STRONG_OPS['{name}']", time_op(lambda rng, op=op: op(weak, rng), reps))
             for name, op in STRONG_OPS.items()]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=60, help="samples timed per dataset (default 60)")
    parser.add_argument("--reps", type=int, default=30, help="repetitions per augmentation op (default 30)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        voc_split = make_voc_like(Path(tmp) / "voc", 16)
        synthetic = make_synthetic(Path(tmp) / "synthetic", num_train=64, num_val=0)
        synthetic_split = synthetic / "splits" / "full" / "labeled.txt"
        cases = [
            ("VOC-sized JPEG 500x375, crop 513", voc_split.parent, voc_split, VOC_CROP),
            ("synthetic 96x96, crop 64", synthetic, synthetic_split, SYNTHETIC_CROP),
        ]
        print(f"torch {torch.__version__}, 1 thread; one process = one loader worker\n")
        print(f"{'data':<34} {'sample':<40} {'samples/s per worker':>22}")
        for name, root, split, crop in cases:
            unlabeled = SegmentationDataset(root, split, "train_u", crop, strong_ops=True)
            labeled = SegmentationDataset(root, split, "train_l", crop, strong_ops=True)
            print(f"{name:<34} {'unlabeled (weak + 2 strong + 2 boxes)':<40} "
                  f"{samples_per_second(unlabeled, args.samples):>22.1f}")
            print(f"{'':<34} {'labeled (image + mask)':<40} {samples_per_second(labeled, args.samples):>22.1f}")
        print(f"\n{'augmentation step (on a 513x513 view)':<40} {'mean ms':>10}")
        for name, ms in op_table(voc_split.parent / "JPEGImages" / "000000.jpg", args.reps):
            print(f"{name:<40} {ms:>10.2f}")


if __name__ == "__main__":
    main()
