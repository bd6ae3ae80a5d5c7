"""Would a pretrained backbone give DSSN its win on the demo?

The paper's backbones start from ImageNet; the demo's starts from scratch. This
benchmark stands in for ImageNet with a disjoint source task: it pretrains the demo's
backbone (ResNet-18 v1c, width 16) to classify 32x32 texture patches into 16 kinds
(stripes at 8 orientations, dots and checkers at 2, concentric, wavy, blotches, flat)
in random colours. It sees none of the demo's images, shapes or labels, only textures,
as ImageNet holds textures and objects that PASCAL shares. Then it trains, from that
backbone and as ``dssn demo`` does, ``supervised`` on 1/16 and on all labels and
``dssn`` on 1/16, and prints the three rows.

Usage: ``.venv/bin/python benchmarks/pretext.py [--seed 0] [--out runs/pretext]
[--pretrain-iters 1500] [key=value ...]`` (about 20 minutes on two CPU cores: 2 to
pretrain, then the three runs; the backbone is reused from ``OUT/backbone.pt``).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from headroom import SPLITS, print_table, train_rows
from PIL import Image
from torch import nn

from dssn.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from dssn.engine.checkpoint import atomic_save
from dssn.models import build_backbone

KINDS = 16  # 0-7 stripes at k * 22.5 degrees, then dots, dots 45, checker, checker 45, concentric, wavy, blotches, flat


def _stripes(phase: np.ndarray) -> np.ndarray:
    return np.clip(0.5 + 2.0 * np.sin(phase), 0.0, 1.0)


def _rotated(dx: np.ndarray, dy: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = math.cos(angle), math.sin(angle)
    return dx * c + dy * s, -dx * s + dy * c


def texture(kind: int, dx: np.ndarray, dy: np.ndarray, period: float, rng: np.random.Generator) -> np.ndarray:
    """Mixing weight in [0, 1] between a patch's two colours."""
    phase = rng.uniform(0, 2 * math.pi)
    if kind < 8:
        u, _ = _rotated(dx, dy, kind * math.pi / 8 + rng.uniform(-0.1, 0.1))
        return _stripes(2 * math.pi * u / period + phase)
    if kind in (8, 9):
        u, v = _rotated(dx, dy, 0.0 if kind == 8 else math.pi / 4)
        a = np.mod(u + rng.uniform(0, period), period) - period / 2
        b = np.mod(v + rng.uniform(0, period), period) - period / 2
        return np.clip(0.28 * period + 0.5 - np.hypot(a, b), 0.0, 1.0)
    if kind in (10, 11):
        u, v = _rotated(dx, dy, 0.0 if kind == 10 else math.pi / 4)
        wave = np.sin(2 * math.pi * u / period + phase) * np.sin(2 * math.pi * v / period + rng.uniform(0, 7))
        return np.clip(0.5 + 3.0 * wave, 0.0, 1.0)
    if kind == 12:
        cx, cy = rng.uniform(-dx.shape[0] / 2, dx.shape[0] / 2, 2)
        return _stripes(2 * math.pi * np.hypot(dx - cx, dy - cy) / period + phase)
    if kind == 13:
        u, v = _rotated(dx, dy, rng.uniform(0, math.pi))
        return _stripes(2 * math.pi * (u + 2 * np.sin(2 * v / period)) / period + phase)
    if kind == 14:
        coarse = Image.fromarray(rng.random((6, 6), dtype=np.float32), mode="F")
        return (np.asarray(coarse.resize(dx.shape[::-1], Image.BILINEAR)) > 0.5).astype(np.float32)
    return np.full(dx.shape, rng.uniform(0, 1), dtype=np.float32)


def _colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two random colours at least 40 luma levels apart, so every texture stays visible."""
    luma = np.array([0.299, 0.587, 0.114])
    while True:
        a, b = rng.uniform(0, 255, (2, 3))
        if abs((a - b) @ luma) >= 40:
            return a, b


def patch_batch(rng: np.random.Generator, n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` normalised patches and their texture kinds."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = xx - size / 2, yy - size / 2
    images, kinds = [], rng.integers(KINDS, size=n)
    for kind in kinds:
        period = math.exp(rng.uniform(math.log(3), math.log(16)))
        weight = texture(int(kind), dx, dy, period, rng)[..., None]
        a, b = _colour_pair(rng)
        img = ((1 - weight) * a + weight * b) * (1 + rng.uniform(-0.2, 0.2) * dx[..., None] / size)
        images.append(np.clip(img + rng.normal(0, 4, img.shape), 0, 255))
    x = torch.from_numpy(np.stack(images).astype(np.float32)).permute(0, 3, 1, 2) / 255
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return (x - mean) / std, torch.from_numpy(kinds)


def pretrain(path: Path, iters: int, batch: int = 32, size: int = 32, width: int = 16, seed: int = 0) -> None:
    """Texture classification: backbone, global average pool, linear; SGD with a poly schedule."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    backbone = build_backbone("resnet18", 16, width)
    head = nn.Linear(backbone.high_channels, KINDS)
    params = [*backbone.parameters(), *head.parameters()]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)
    start, correct = time.time(), []
    for it in range(iters):
        for group in opt.param_groups:
            group["lr"] = 0.1 * (1 - it / iters) ** 0.9
        x, y = patch_batch(rng, batch, size)
        logits = head(backbone(x).c4.mean((2, 3)))
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        correct = [*correct[-99:], (logits.argmax(1) == y).float().mean().item()]
        if (it + 1) % 250 == 0:
            print(f"pretext step {it + 1}/{iters}: loss {loss.item():.3f}, "
                  f"accuracy (last 100 batches) {np.mean(correct):.3f}, {time.time() - start:.0f} s", flush=True)
    atomic_save({"state_dict": backbone.state_dict()}, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/pretext"))
    parser.add_argument("--pretrain-iters", type=int, default=1500)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for the three runs")
    args = parser.parse_args()

    weights = args.out / "backbone.pt"
    if not weights.exists():
        pretrain(weights, args.pretrain_iters)
    runs = [(f"supervised, {name}", "supervised", split) for name, split in SPLITS.items()]
    runs.append(("dssn, 1/16", "dssn", SPLITS["1/16"]))
    rows = train_rows(runs, args.seed, args.out, [f"model.pretrained={weights}", *args.overrides])
    print_table("run (pretext backbone)", rows)


if __name__ == "__main__":
    main()
