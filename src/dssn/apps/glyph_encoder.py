"""The glyph task's pretrained encoder: the demo backbone trained without labels (SimCLR), and its recipe.

Why it exists (issue 23; docs/findings.md, finding 18): semi-supervised segmentation is used
from a pretrained encoder, with few labels and many unlabeled images of the same world. From
scratch, in the demo's minutes, the glyph task's networks spend most of the run learning what
a digit is, and when that happens varies by seed by 6 to 14 points (finding 17). Starting from
an encoder that already tells strokes apart, the demo measures what the method adds: the
``glyphs`` preset loads this file by the name ``glyphs_r18w16_simclr``.

The recipe (``python -m dssn.apps.glyph_encoder``, about 10 minutes on one CPU core): the
``glyphs`` preset's backbone (ResNet-18 v1c, width 16) learns by contrasting views of the
generated training images (2048, ``make_glyphs``' default; the demo's 512 are the first 512 of
them, validation images are not used and no label is read): two 32-pixel crops of one image
around nearby centres, recoloured independently (channel order, inversion, saturation,
greyscale, contrast, brightness, noise), must find each other among the batch's views
(NT-Xent, Chen et al. 2020). What the views keep is what the two crops share: the strokes and
the digits' shapes, not their colours.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from dssn.apps.glyphs import make_glyphs
from dssn.data import read_split
from dssn.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from dssn.files import atomic_path
from dssn.models import build_backbone
from dssn.models.resnet import ResNet
from dssn.models.sources import packaged_weights_path

__all__ = ["ENCODER_NAME", "TRAINED_ON_VERSION", "Recipe", "knn_probe", "load_images", "load_masks", "nt_xent",
           "pretrain_encoder", "simclr_views"]

logger = logging.getLogger(__name__)

#: The name the ``glyphs`` preset gives ``model.pretrained`` (dssn.models.sources.PACKAGED_WEIGHTS).
ENCODER_NAME = "glyphs_r18w16_simclr"
#: The glyph generator version whose images the shipped file was trained on: a new version
#: changes the images, so the file is retrained with it (a test holds the two together).
TRAINED_ON_VERSION = 4


class Recipe:
    """The settings the shipped file was trained with."""

    pool_size = 2048  # generated training images (make_glyphs' default dataset)
    iters = 3000
    batch = 128  # images; each gives two views
    lr = 5e-3  # AdamW, 100 warm-up steps, then a cosine to 0
    weight_decay = 1e-4
    temperature = 0.3
    crop = 32  # pixels of each view
    crop_side = (22.0, 44.0)  # pixels of the source image a view covers
    centre_jitter = 6.0  # pixels between the two views' centres, at most, per axis
    seed = 0


def _split_pairs(folder: Path, split_file: str) -> list[tuple[Path, Path | None]]:
    return [(folder / image, mask and folder / mask) for image, mask in read_split(folder / split_file)]


def load_images(folder: Path, split_file: str) -> Tensor:
    """The images a split file of a generated folder names, as one ``(N, 3, H, W)`` tensor in [0, 1]."""
    arrays = [np.asarray(Image.open(image).convert("RGB")) for image, _ in _split_pairs(folder, split_file)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def load_masks(folder: Path, split_file: str) -> Tensor:
    """The masks a split file names, as one ``(N, H, W)`` int64 tensor."""
    arrays = [np.asarray(Image.open(mask)) for _, mask in _split_pairs(folder, split_file)]
    return torch.from_numpy(np.stack(arrays).astype(np.int64))


def _normalise(x: Tensor) -> Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


def simclr_views(images: Tensor, centres: Tensor, gen: torch.Generator, recipe: type[Recipe] = Recipe) -> Tensor:
    """One normalised view per image (``recipe.crop`` pixels square): a crop of ``recipe.crop_side``
    pixels around ``centres`` (in [-1, 1], moved by up to ``recipe.centre_jitter`` pixels), flipped
    at random, then recoloured. Call twice with the same centres for a positive pair."""
    b, _, h, _ = images.shape
    side = _uniform(b, *recipe.crop_side, gen) / h
    aspect = torch.exp(_uniform(b, -0.2, 0.2, gen))
    sx, sy = side * aspect.sqrt(), side / aspect.sqrt()
    jitter = 2 * recipe.centre_jitter / h
    cx = (centres[:, 0] + _uniform(b, -jitter, jitter, gen)).clamp(-1 + sx, 1 - sx)
    cy = (centres[:, 1] + _uniform(b, -jitter, jitter, gen)).clamp(-1 + sy, 1 - sy)
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx * flip, cx, sy, cy
    grid = F.affine_grid(theta, [b, 3, recipe.crop, recipe.crop], align_corners=False)
    view = F.grid_sample(images, grid, align_corners=False)

    order = torch.rand(b, 3, generator=gen).argsort(1)  # colours carry no class: shuffle the channels
    view = torch.gather(view, 1, order.view(b, 3, 1, 1).expand_as(view))
    view = torch.where(torch.rand(b, 1, 1, 1, generator=gen) < 0.3, 1 - view, view)
    grey = view.mean(1, keepdim=True)
    view = grey + _uniform(b, 0.0, 1.5, gen).view(b, 1, 1, 1) * (view - grey)
    view = torch.where(torch.rand(b, 1, 1, 1, generator=gen) < 0.2, view.mean(1, keepdim=True).expand_as(view), view)
    mean = view.mean((1, 2, 3), keepdim=True)
    contrast, brightness = _uniform(b, 0.5, 1.5, gen), _uniform(b, 0.6, 1.4, gen)
    view = (view - mean) * contrast.view(b, 1, 1, 1) + mean * brightness.view(b, 1, 1, 1)
    view = view + 0.03 * torch.randn(view.shape, generator=gen)
    return _normalise(view.clamp(0, 1))


def nt_xent(z: Tensor, temperature: float) -> Tensor:
    """SimCLR's loss for ``2n`` embeddings where row ``i`` and row ``i + n`` are two views of one image."""
    z = F.normalize(z, dim=1)
    n = z.shape[0] // 2
    logits = (z @ z.T / temperature).fill_diagonal_(float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(logits, positives)


def pretrain_encoder(images: Tensor, recipe: type[Recipe] = Recipe, iters: int | None = None,
                     log_every: int = 100) -> ResNet:
    """Train the ``glyphs`` preset's backbone on ``images`` (``(N, 3, H, W)`` in [0, 1]) by SimCLR."""
    torch.manual_seed(recipe.seed)  # the initialisation
    gen = torch.Generator().manual_seed(recipe.seed)  # the batches and the views
    iters = recipe.iters if iters is None else iters
    backbone = build_backbone("resnet18", 16, 16)
    projector = nn.Sequential(nn.Linear(backbone.high_channels, 256), nn.BatchNorm1d(256), nn.ReLU(),
                              nn.Linear(256, 128))
    opt = torch.optim.AdamW([*backbone.parameters(), *projector.parameters()], lr=recipe.lr,
                            weight_decay=recipe.weight_decay)
    start = time.time()
    for it in range(iters):
        lr = recipe.lr * min(1.0, (it + 1) / 100) * 0.5 * (1 + math.cos(math.pi * it / iters))
        for group in opt.param_groups:
            group["lr"] = lr
        batch = images[torch.randint(len(images), (recipe.batch,), generator=gen)]
        centres = torch.rand(recipe.batch, 2, generator=gen) * 1.4 - 0.7
        views = torch.cat([simclr_views(batch, centres, gen, recipe), simclr_views(batch, centres, gen, recipe)])
        loss = nt_xent(projector(backbone(views).c4.mean((2, 3))), recipe.temperature)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log_every and (it + 1) % log_every == 0:
            logger.info("step %d/%d: loss %.3f, %.0f s", it + 1, iters, loss.item(), time.time() - start)
    return backbone.eval()


@torch.no_grad()
def knn_probe(backbone: ResNet, support: tuple[Tensor, Tensor], query: tuple[Tensor, Tensor],
              num_classes: int, k: int = 10) -> float:
    """How well the encoder's features name the objects: each ``c4`` cell of a query image that
    lies mostly (> 60%) on one object takes the majority class of its ``k`` nearest (cosine) such
    cells of the support images; returns the share named right (chance: 1 / number of object classes).
    Images ``(N, 3, H, W)`` in [0, 1], masks ``(N, H, W)`` with 0 background and 255 ignored."""

    def cells(images: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
        features = F.normalize(backbone(_normalise(images)).c4, dim=1)
        valid = (masks != 255).unsqueeze(1)
        one_hot = F.one_hot(masks.clamp(max=num_classes - 1), num_classes).permute(0, 3, 1, 2) * valid
        share, label = F.adaptive_avg_pool2d(one_hot.float(), features.shape[-2:]).max(1)
        keep = (share > 0.6) & (label > 0)
        return features.permute(0, 2, 3, 1)[keep], label[keep]

    support_features, support_labels = cells(*support)
    query_features, query_labels = cells(*query)
    nearest = (query_features @ support_features.T).topk(k, dim=1).indices
    votes = F.one_hot(support_labels[nearest], num_classes).sum(1)
    return (votes.argmax(1) == query_labels).float().mean().item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Pretrain the glyph task's encoder (SimCLR) and write it "
                                     "where the glyphs preset reads it.")
    parser.add_argument("--data", type=Path, default=Path("data/glyphs"), help="where the images are generated")
    parser.add_argument("--out", type=Path, default=packaged_weights_path(ENCODER_NAME))
    parser.add_argument("--iters", type=int, default=Recipe.iters)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    folder = make_glyphs(args.data, num_train=Recipe.pool_size, progress=True)
    backbone = pretrain_encoder(load_images(folder, "splits/full/labeled.txt"), iters=args.iters)
    state = {key: value.half() if value.is_floating_point() else value for key, value in backbone.state_dict().items()}
    with atomic_path(args.out) as tmp:
        torch.save(state, tmp)
    support = (load_images(folder, "splits/1_16/labeled.txt"), load_masks(folder, "splits/1_16/labeled.txt"))
    query = (load_images(folder, "splits/val.txt"), load_masks(folder, "splits/val.txt"))
    accuracy = knn_probe(backbone, support, query, num_classes=5)
    print(f"wrote {args.out}; k-NN probe on validation signs: {100 * accuracy:.1f}% (chance 25%)")


if __name__ == "__main__":
    main()
