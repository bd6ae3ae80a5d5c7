"""Palettes, colourised masks and display-size resizing (numpy only, no matplotlib)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from dssn.constants import IGNORE
from dssn.data.transforms import IMAGENET_MEAN, IMAGENET_STD

NOT_SELECTED_GREY = np.array([128, 128, 128], dtype=np.float32)
FADE = 0.75
"""Unselected pseudo-label pixels: the class colour pulled this far toward grey."""
PAD_COLOUR = np.array([255, 255, 255], dtype=np.uint8)
"""Display padding (outside the image) is white in every column."""


def voc_palette(n: int = 256) -> list[int]:
    """Flat ``[r, g, b, ...]`` PASCAL VOC colour map: the bits of the class index
    are interleaved into the high bits of the three channels."""
    palette = []
    for index in range(n):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    return palette


def palette_array(palette: list[int] | np.ndarray) -> np.ndarray:
    """A flat ``[r, g, b, ...]`` palette as ``[256, 3]`` uint8 (missing entries black)."""
    flat = np.zeros(768, dtype=np.uint8)
    values = np.asarray(palette, dtype=np.uint8).reshape(-1)[:768]
    flat[: values.size] = values
    return flat.reshape(256, 3)


def class_colours(palette: list[int] | np.ndarray, num_classes: int) -> list[tuple[float, float, float]]:
    """matplotlib colours (RGB in [0, 1]) of the first ``num_classes`` palette entries."""
    table = palette_array(palette)
    return [tuple(float(v) / 255 for v in table[c]) for c in range(num_classes)]


def colourise(mask: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Class-index mask ``[H, W]`` -> RGB ``[H, W, 3]`` uint8 (255 takes the palette's 255 entry)."""
    return palette[np.asarray(mask, dtype=np.uint8)]


def blend(image: np.ndarray, mask: np.ndarray, palette: list[int] | np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """RGB ``[H, W, 3]`` uint8: ``image`` with the class colours of ``mask`` ``[H, W]`` mixed in
    at ``alpha`` (0: the image, 1: the colours); ``palette`` flat or ``[256, 3]``."""
    colours = colourise(mask, palette_array(palette)).astype(np.float32)
    mixed = image.astype(np.float32) * (1 - alpha) + colours * alpha
    return mixed.round().clip(0, 255).astype(np.uint8)


def pseudo_label_rgb(pseudo: np.ndarray, selected: np.ndarray, valid: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Pseudo labels in class colours, the unselected pixels faded to grey, invalid ones in the ignore colour."""
    rgb = colourise(pseudo, palette).astype(np.float32)
    faded = (1 - FADE) * rgb + FADE * NOT_SELECTED_GREY
    rgb = np.where(selected[..., None], rgb, faded)
    rgb = np.where(valid[..., None], rgb, palette[IGNORE].astype(np.float32))
    return rgb.round().astype(np.uint8)


def denormalise(image) -> np.ndarray:
    """An ImageNet-normalised ``[3, H, W]`` tensor or array -> RGB ``[H, W, 3]`` uint8."""
    arr = image.detach().float().cpu().numpy() if hasattr(image, "detach") else np.asarray(image, dtype=np.float32)
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD, dtype=np.float32)[:, None, None]
    return np.clip((arr * std + mean) * 255, 0, 255).round().astype(np.uint8).transpose(1, 2, 0)


def fit_box(arr: np.ndarray, size: int, nearest: bool) -> tuple[np.ndarray, np.ndarray]:
    """Resize ``[H, W]`` or ``[H, W, 3]`` so the long side is ``size`` (aspect kept) and pad to
    ``size x size`` at the bottom/right. Returns ``(array, valid)``, ``valid`` False on the padding."""
    h, w = arr.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) != (h, w):
        img = Image.fromarray(arr)
        arr = np.asarray(img.resize((nw, nh), Image.NEAREST if nearest else Image.BILINEAR))
    out = np.zeros((size, size, *arr.shape[2:]), dtype=arr.dtype)
    out[:nh, :nw] = arr
    valid = np.zeros((size, size), dtype=bool)
    valid[:nh, :nw] = True
    return out, valid


def grid(rows: list[list[np.ndarray]], gap: int = 2) -> np.ndarray:
    """Equal-sized RGB tiles ``rows[r][c]`` into one image with white gaps."""
    h, w = rows[0][0].shape[:2]
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    out = np.full((n_rows * h + (n_rows - 1) * gap, n_cols * w + (n_cols - 1) * gap, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            out[r * (h + gap): r * (h + gap) + h, c * (w + gap): c * (w + gap) + w] = tile
    return out
