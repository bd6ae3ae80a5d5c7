"""Does the class cue survive the strong views? A checkpoint scored on transformed validation images.

DSSN trains its student to give a strong view the teacher's label for the weak one,
which only teaches something if the class can still be seen in the strong view. This
scores a network on the validation images as they are and after each part of the
strong view (SPEC 5.1) applied with probability 1: colour jitter, grayscale, blur,
and the whole strong view with and without the extra operations. A large drop for a
network trained without such views is a warning that the view hides the class.

Usage: ``.venv/bin/python benchmarks/strong_views.py CHECKPOINT [--root data/synthetic]
[--network student] [--seed 0]`` (seconds on the built-in dataset).
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from dssn.data import transforms as T
from dssn.data.datasets import read_split
from dssn.engine.evaluate import evaluate
from dssn.engine.inference import load_for_inference

View = Callable[[Image.Image, random.Random], Image.Image]
VIEWS: dict[str, View] = {
    "as is": lambda img, rng: img,
    "colour jitter": lambda img, rng: T.color_jitter(img, p=1.0, rng=rng),
    "grayscale": lambda img, rng: T.random_grayscale(img, p=1.0, rng=rng),
    "blur": lambda img, rng: T.random_blur(img, p=1.0, rng=rng),
    "strong view, no extra ops": lambda img, rng: T.strong_view(img, strong_ops=False, rng=rng),
    "strong view": lambda img, rng: T.strong_view(img, strong_ops=True, rng=rng),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--root", type=Path, default=Path("data/synthetic"))
    parser.add_argument("--split", default="splits/val.txt")
    parser.add_argument("--network", default="student")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    models = load_for_inference(args.checkpoint, device="cpu")
    name, model = models.pick(args.network)
    pairs = read_split(args.root / args.split)
    images = [Image.open(args.root / image).convert("RGB") for image, _ in pairs]
    masks = torch.stack([T.mask_to_tensor(Image.open(args.root / mask)) for _, mask in pairs])
    n = len(models.class_names)

    print(f"{name} of {args.checkpoint}, {len(pairs)} images of {args.split}\n")
    print("| view (p=1) | mIoU | " + " | ".join(models.class_names) + " |")
    print("|---|---|" + "---|" * n)
    for view, transform in VIEWS.items():
        rng = random.Random(args.seed)
        x = torch.stack([T.to_tensor_normalized(transform(img, rng)) for img in images])
        batches = [(x[start:start + 32], masks[start:start + 32]) for start in range(0, len(x), 32)]
        result = evaluate({name: model}, batches, n, torch.device("cpu"))[name]
        print(f"| {view} | {100 * result.miou:.1f} | "
              + " | ".join(f"{100 * v:.1f}" for v in result.per_class.tolist()) + " |")


if __name__ == "__main__":
    main()
