"""Augmentations for semi-supervised segmentation (docs/method.md §6).

Every op takes and returns PIL images. Randomness always comes from an explicit
``random.Random`` passed as ``rng`` (keyword-only), so a dataset can give each sample
its own seeded generator and a run is reproducible no matter how many loader workers
run. No torchvision: everything is PIL plus NumPy/torch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# (x / 255 - mean) / std folded into one multiply-subtract per channel
_SCALE = (1.0 / (255.0 * np.array(IMAGENET_STD))).astype(np.float32)
_SHIFT = (np.array(IMAGENET_MEAN) / np.array(IMAGENET_STD)).astype(np.float32)


# --------------------------------------------------------------------------- geometry
# Geometric ops move image and mask together so labels stay aligned with pixels.


def resize_long_side(
    img: Image.Image,
    mask: Image.Image,
    ratio_range: tuple[float, float] = (0.5, 2.0),
    *,
    rng: random.Random,
) -> tuple[Image.Image, Image.Image]:
    """Rescale so the long side becomes a random integer in ``ratio_range`` x its length.

    The aspect ratio is kept; the image is resampled bilinearly, the mask with nearest
    neighbour so class ids are never blended.
    """
    w, h = img.size
    long_side = max(w, h)
    new_long = rng.randint(int(long_side * ratio_range[0]), int(long_side * ratio_range[1]))
    new_long = max(new_long, 1)
    scale = new_long / long_side
    if w >= h:
        new_w, new_h = new_long, max(1, int(h * scale + 0.5))
    else:
        new_w, new_h = max(1, int(w * scale + 0.5)), new_long
    return (
        img.resize((new_w, new_h), Image.BILINEAR),
        mask.resize((new_w, new_h), Image.NEAREST),
    )


def _pad_to(img: Image.Image, width: int, height: int, fill: int) -> Image.Image:
    """Pad on the right/bottom to ``width`` x ``height`` (no-op if already that big)."""
    if img.width >= width and img.height >= height:
        return img
    channels = len(img.getbands())
    canvas = Image.new(img.mode, (max(width, img.width), max(height, img.height)),
                       fill if channels == 1 else (fill,) * channels)
    canvas.paste(img, (0, 0))
    return canvas


def pad_crop(
    img: Image.Image,
    mask: Image.Image,
    size: int,
    mask_fill: int = 255,
    *,
    rng: random.Random,
) -> tuple[Image.Image, Image.Image]:
    """Pad right/bottom up to ``size`` (image 0, mask ``mask_fill``), then random square crop.

    Padding only on the right/bottom keeps the original content at the top-left, the
    way the released code does; the mask fill marks padded pixels so losses skip them.
    """
    img = _pad_to(img, size, size, 0)
    mask = _pad_to(mask, size, size, mask_fill)
    x = rng.randint(0, img.width - size)
    y = rng.randint(0, img.height - size)
    box = (x, y, x + size, y + size)
    return img.crop(box), mask.crop(box)


def hflip(
    img: Image.Image, mask: Image.Image, p: float = 0.5, *, rng: random.Random
) -> tuple[Image.Image, Image.Image]:
    """Flip image and mask left-right together with probability ``p``."""
    if rng.random() < p:
        return img.transpose(Image.FLIP_LEFT_RIGHT), mask.transpose(Image.FLIP_LEFT_RIGHT)
    return img, mask


# --------------------------------------------------------------------------- photometric


def adjust_hue(img: Image.Image, shift: float) -> Image.Image:
    """Rotate the hue by ``shift`` of the full circle (``shift`` in [-0.5, 0.5]).

    PIL's HSV mode stores hue as uint8, so the rotation is a uint8 addition that
    wraps around the circle. The step ``shift * 255`` is truncated toward zero, as the
    releases' ``np.uint8(shift * 255)`` cast it (NumPy 1.x): -0.05 moves by -12, not -13.
    """
    # No shortcut for a zero step: the HSV round trip itself alters some pixels, as in the release.
    step = int(shift * 255)  # int() truncates toward zero
    h, s, v = img.convert("HSV").split()
    hue = np.asarray(h, dtype=np.uint8) + np.uint8(step % 256)  # wraps mod 256
    return Image.merge("HSV", (Image.fromarray(hue), s, v)).convert("RGB")


def gaussian_blur(img: Image.Image, sigma: float) -> Image.Image:
    """Gaussian blur with standard deviation ``sigma`` pixels."""
    return img.filter(ImageFilter.GaussianBlur(radius=sigma))


def color_jitter(
    img: Image.Image,
    brightness: float = 0.5,
    contrast: float = 0.5,
    saturation: float = 0.5,
    hue: float = 0.25,
    p: float = 0.8,
    *,
    rng: random.Random,
) -> Image.Image:
    """With probability ``p``, jitter brightness, contrast, saturation and hue.

    Like torchvision's ColorJitter: factors uniform in [1 - x, 1 + x], hue shift uniform
    in [-hue, hue], the four adjustments applied in a random order.
    """
    if rng.random() >= p:
        return img
    b = rng.uniform(max(0.0, 1 - brightness), 1 + brightness)
    c = rng.uniform(max(0.0, 1 - contrast), 1 + contrast)
    s = rng.uniform(max(0.0, 1 - saturation), 1 + saturation)
    hu = rng.uniform(-hue, hue)
    adjustments: list[Callable[[Image.Image], Image.Image]] = [
        lambda im: ImageEnhance.Brightness(im).enhance(b),
        lambda im: ImageEnhance.Contrast(im).enhance(c),
        lambda im: ImageEnhance.Color(im).enhance(s),
        lambda im: adjust_hue(im, hu),
    ]
    rng.shuffle(adjustments)
    for adjust in adjustments:
        img = adjust(img)
    return img


def random_grayscale(img: Image.Image, p: float = 0.2, *, rng: random.Random) -> Image.Image:
    """With probability ``p``, convert to grayscale, kept as 3 equal RGB channels."""
    if rng.random() < p:
        return ImageOps.grayscale(img).convert("RGB")
    return img


def random_blur(
    img: Image.Image,
    p: float = 0.5,
    sigma: tuple[float, float] = (0.1, 2.0),
    *,
    rng: random.Random,
) -> Image.Image:
    """With probability ``p``, Gaussian blur with sigma uniform in ``sigma``."""
    if rng.random() < p:
        return gaussian_blur(img, rng.uniform(*sigma))
    return img


# --------------------------------------------------------------------------- strong ops
# The extra random operations of the PASCAL/COCO strong view. Each op has the same
# signature ``op(img, rng) -> img`` and samples its own magnitude, so the registry
# below can be timed op by op.

StrongOp = Callable[[Image.Image, random.Random], Image.Image]

_ENHANCE_FACTOR = (0.05, 0.95)


def _identity(img: Image.Image, rng: random.Random) -> Image.Image:
    return img


def _autocontrast(img: Image.Image, rng: random.Random) -> Image.Image:
    return ImageOps.autocontrast(img)


def _equalize(img: Image.Image, rng: random.Random) -> Image.Image:
    return ImageOps.equalize(img)


def _blur(img: Image.Image, rng: random.Random) -> Image.Image:
    return gaussian_blur(img, rng.uniform(0.1, 2.0))


def _contrast(img: Image.Image, rng: random.Random) -> Image.Image:
    return ImageEnhance.Contrast(img).enhance(rng.uniform(*_ENHANCE_FACTOR))


def _brightness(img: Image.Image, rng: random.Random) -> Image.Image:
    return ImageEnhance.Brightness(img).enhance(rng.uniform(*_ENHANCE_FACTOR))


def _color(img: Image.Image, rng: random.Random) -> Image.Image:
    return ImageEnhance.Color(img).enhance(rng.uniform(*_ENHANCE_FACTOR))


def _sharpness(img: Image.Image, rng: random.Random) -> Image.Image:
    return ImageEnhance.Sharpness(img).enhance(rng.uniform(*_ENHANCE_FACTOR))


def _posterize(img: Image.Image, rng: random.Random) -> Image.Image:
    """Keep the top ``bits`` bits of each channel: ``8 - max(1, ceil(4u))``, so 4, 5, 6 or 7
    bits with equal chance and never all 8 (the release's draw)."""
    return ImageOps.posterize(img, 8 - max(1, math.ceil(4 * rng.random())))


def _solarize(img: Image.Image, rng: random.Random) -> Image.Image:
    """Invert channel values >= threshold: ``256 - max(1, ceil(255u))``, uniform in 1..255,
    never the no-op 256 (the release's draw)."""
    return ImageOps.solarize(img, 256 - max(1, math.ceil(255 * rng.random())))


def _hue(img: Image.Image, rng: random.Random) -> Image.Image:
    """Hue shift of magnitude uniform in [0, 0.5) of the circle, its sign 50/50 (the release
    draws the two apart; the shift is uniform in (-0.5, 0.5) either way)."""
    magnitude = 0.5 * rng.random()
    return adjust_hue(img, -magnitude if rng.random() < 0.5 else magnitude)


STRONG_OPS: dict[str, StrongOp] = {
    "identity": _identity,
    "autocontrast": _autocontrast,
    "equalize": _equalize,
    "blur": _blur,
    "contrast": _contrast,
    "brightness": _brightness,
    "color": _color,
    "sharpness": _sharpness,
    "posterize": _posterize,
    "solarize": _solarize,
    "hue": _hue,
}


def random_strong_ops(
    img: Image.Image, max_ops: int = 3, *, rng: random.Random
) -> Image.Image:
    """Apply k ops (k uniform in 1..max_ops) drawn with replacement from ``STRONG_OPS``."""
    names = list(STRONG_OPS)
    for _ in range(rng.randint(1, max_ops)):
        img = STRONG_OPS[rng.choice(names)](img, rng)
    return img


def strong_view(img_w: Image.Image, strong_ops: bool = True, *, rng: random.Random) -> Image.Image:
    """A strong view of the weak view: jitter -> grayscale -> blur -> (optionally) strong ops.

    ``strong_ops`` is on for PASCAL/COCO and off for Cityscapes (docs/method.md §9).
    """
    img = color_jitter(img_w, rng=rng)
    img = random_grayscale(img, rng=rng)
    img = random_blur(img, rng=rng)
    if strong_ops:
        img = random_strong_ops(img, rng=rng)
    return img


# --------------------------------------------------------------------------- CutMix


def cutmix_box(
    size: int,
    p: float = 0.5,
    area: tuple[float, float] = (0.02, 0.4),
    ratio: tuple[float, float] = (0.3, 1 / 0.3),
    *,
    rng: random.Random,
) -> torch.Tensor:
    """A CutMix region for a ``size`` x ``size`` crop, as a bool mask (all False if absent).

    The releases' ``obtain_cutmix_box``: absent when ``random() > p``; otherwise the area is
    drawn once (a fraction uniform in ``area`` of the crop), and only the aspect ``r``
    (uniform in ``ratio``) and the top-left corner (uniform integers in [0, size - 1]) are
    redrawn until the box fits inside the crop. Width ``int(sqrt(a / r))``, height
    ``int(sqrt(a * r))``: ``r`` is height over width. Redrawing the area too would favour
    small boxes (mean 0.14 of the crop instead of 0.21).
    """
    # built in NumPy: its lazily zeroed allocation beats torch's (threaded) fill here
    box = np.zeros((size, size), dtype=bool)
    if rng.random() > p:
        return torch.from_numpy(box)
    box_area = rng.uniform(*area) * size * size
    while True:
        aspect = rng.uniform(*ratio)
        w = int(math.sqrt(box_area / aspect))
        h = int(math.sqrt(box_area * aspect))
        x = rng.randint(0, size - 1)
        y = rng.randint(0, size - 1)
        if x + w <= size and y + h <= size:
            break
    box[y : y + h, x : x + w] = True
    return torch.from_numpy(box)


# --------------------------------------------------------------------------- to tensors


def to_tensor_normalized(img: Image.Image) -> torch.Tensor:
    """RGB image -> float tensor [3, H, W], scaled to [0, 1] then ImageNet-normalised."""
    rgb = np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
    out = np.empty((3, *rgb.shape[:2]), dtype=np.float32)
    for c in range(3):  # one pass per channel from uint8 HWC straight into float CHW
        np.multiply(rgb[..., c], _SCALE[c], out=out[c], dtype=np.float32)
        out[c] -= _SHIFT[c]
    return torch.from_numpy(out)


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """Class-index mask ("L" or "P" mode) -> LongTensor [H, W] of the raw indices."""
    return torch.from_numpy(np.array(mask, dtype=np.int64))
