"""Hand-checkable properties of the augmentations of docs/method.md §6."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from dssn.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    STRONG_OPS,
    adjust_hue,
    color_jitter,
    cutmix_box,
    hflip,
    mask_to_tensor,
    pad_crop,
    random_blur,
    random_grayscale,
    resize_long_side,
    strong_view,
    to_tensor_normalized,
)


def _random_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    array = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(array)


def _mask(width: int, height: int) -> Image.Image:
    return Image.fromarray((np.arange(width * height) % 4).reshape(height, width).astype(np.uint8))


class _FixedInts(random.Random):
    """A generator whose ``randint`` always answers ``value``, to pin an op's magnitude."""

    def __init__(self, value: int) -> None:
        super().__init__(0)
        self.value = value

    def randint(self, a: int, b: int) -> int:
        assert a <= self.value <= b
        return self.value


def test_resize_long_side_range_and_aspect():
    rng = random.Random(0)
    img, mask = _random_rgb(40, 30), _mask(40, 30)
    longs = set()
    for _ in range(200):
        out_img, out_mask = resize_long_side(img, mask, rng=rng)
        w, h = out_img.size
        assert out_mask.size == (w, h)
        assert 20 <= w <= 80
        assert abs(h - w * 30 / 40) <= 0.5 + 1e-9  # aspect kept up to rounding
        longs.add(w)
    assert min(longs) < 30 and max(longs) > 70  # the whole range is used


def test_resize_long_side_portrait_and_nearest_mask():
    img = _random_rgb(10, 20)
    mask = _mask(10, 20)
    out_img, out_mask = resize_long_side(img, mask, (2.0, 2.0), rng=random.Random(0))
    assert out_img.size == (20, 40)
    assert set(np.unique(np.asarray(out_mask))) <= {0, 1, 2, 3}  # no blended class ids


def test_pad_crop_pads_with_image_zero_and_mask_fill():
    img = Image.new("RGB", (4, 3), (10, 20, 30))
    mask = Image.new("L", (4, 3), 1)
    out_img, out_mask = pad_crop(img, mask, 6, 255, rng=random.Random(0))
    assert out_img.size == out_mask.size == (6, 6)
    a, m = np.asarray(out_img), np.asarray(out_mask)
    # smaller than the crop in both directions: the only crop is the padded canvas itself
    assert (a[:3, :4] == (10, 20, 30)).all() and (m[:3, :4] == 1).all()
    assert (a[3:] == 0).all() and (a[:, 4:] == 0).all()
    assert (m[3:] == 255).all() and (m[:, 4:] == 255).all()


def test_pad_crop_crops_aligned_pairs():
    img = _random_rgb(20, 16)
    # the mask holds each pixel's own (x + y * 20) % 256 so the crop can be located
    mask = Image.fromarray((np.arange(320) % 256).reshape(16, 20).astype(np.uint8))
    rng = random.Random(1)
    offsets = set()
    for _ in range(50):
        out_img, out_mask = pad_crop(img, mask, 8, 255, rng=rng)
        m = np.asarray(out_mask)
        y, x = divmod(int(m[0, 0]), 20)
        offsets.add((x, y))
        assert np.array_equal(np.asarray(out_img), np.asarray(img)[y : y + 8, x : x + 8])
    assert len(offsets) > 10


def test_hflip_flips_image_and_mask_together():
    img = Image.new("RGB", (5, 2), 0)
    img.putpixel((0, 1), (255, 0, 0))
    mask = Image.new("L", (5, 2), 0)
    mask.putpixel((0, 1), 3)
    out_img, out_mask = hflip(img, mask, p=1.0, rng=random.Random(0))
    assert out_img.getpixel((4, 1)) == (255, 0, 0) and out_mask.getpixel((4, 1)) == 3
    same_img, same_mask = hflip(img, mask, p=0.0, rng=random.Random(0))
    assert same_img is img and same_mask is mask


def test_cutmix_box_shape_area_aspect_and_rate():
    rng = random.Random(0)
    # large enough that rounding the sides to whole pixels moves area/aspect by < 6 %
    size, present, draws = 256, 0, 400
    for _ in range(draws):
        box = cutmix_box(size, rng=rng)
        assert box.dtype == torch.bool and box.shape == (size, size)
        box = box.numpy()  # NumPy checks: cheap, and immune to torch thread start-up
        if not box.any():
            continue
        present += 1
        rows, cols = np.flatnonzero(box.any(axis=1)), np.flatnonzero(box.any(axis=0))
        h = int(rows[-1] - rows[0] + 1)
        w = int(cols[-1] - cols[0] + 1)
        assert int(box.sum()) == w * h  # a filled axis-aligned rectangle
        assert 0.02 * 0.94 <= w * h / size**2 <= 0.4 * 1.06
        assert 0.3 * 0.94 <= w / h <= (1 / 0.3) * 1.06
    assert 0.4 * draws <= present <= 0.6 * draws


def test_cutmix_box_absent_and_always():
    assert not cutmix_box(16, p=0.0, rng=random.Random(0)).any()
    assert cutmix_box(16, p=1.0, rng=random.Random(0)).any()


def test_normalisation_of_constant_image():
    img = Image.new("RGB", (3, 2), (51, 102, 204))
    out = to_tensor_normalized(img)
    assert out.shape == (3, 2, 3) and out.dtype == torch.float32
    for c, v in enumerate((51, 102, 204)):
        expected = (v / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        assert torch.allclose(out[c], torch.full((2, 3), expected), atol=1e-6)


def test_mask_to_tensor_keeps_palette_indices():
    mask = Image.fromarray(np.array([[0, 3], [255, 1]], dtype=np.uint8)).convert("P")
    mask.putpalette([255, 255, 255] * 256)  # a palette must never change the indices
    out = mask_to_tensor(mask)
    assert out.dtype == torch.long
    assert out.tolist() == [[0, 3], [255, 1]]


@pytest.mark.parametrize("name", sorted(STRONG_OPS))
def test_strong_op_returns_rgb_same_size(name):
    img = _random_rgb(17, 11)
    rng = random.Random(3)
    for _ in range(5):
        out = STRONG_OPS[name](img, rng)
        assert out.mode == "RGB" and out.size == img.size


def test_identity_is_exact():
    img = _random_rgb(7, 5)
    assert np.array_equal(np.asarray(STRONG_OPS["identity"](img, random.Random(0))), np.asarray(img))


def test_posterize_and_solarize_by_hand():
    img = Image.new("RGB", (1, 1), (200, 100, 7))
    assert STRONG_OPS["posterize"](img, _FixedInts(4)).getpixel((0, 0)) == (192, 96, 0)
    assert STRONG_OPS["solarize"](img, _FixedInts(128)).getpixel((0, 0)) == (55, 100, 7)
    assert STRONG_OPS["solarize"](img, _FixedInts(256)).getpixel((0, 0)) == (200, 100, 7)


def test_hue_shift_wraps_and_half_turn_maps_red_to_cyan():
    red = Image.new("RGB", (2, 2), (255, 0, 0))
    assert adjust_hue(red, 0.0) is red
    r, g, b = adjust_hue(red, 0.5).getpixel((0, 0))
    assert r < 10 and g > 245 and b > 245
    r, g, b = adjust_hue(red, -0.5).getpixel((0, 0))  # negative shift wraps the same way
    assert r < 10 and g > 245 and b > 245
    gray = Image.new("RGB", (2, 2), (90, 90, 90))
    assert adjust_hue(gray, 0.3).getpixel((0, 0)) == (90, 90, 90)


def test_grayscale_has_equal_channels():
    out = random_grayscale(_random_rgb(9, 6), p=1.0, rng=random.Random(0))
    a = np.asarray(out)
    assert out.mode == "RGB" and (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()


def test_probabilities_zero_leave_the_image_alone():
    img = _random_rgb(9, 6)
    rng = random.Random(0)
    assert color_jitter(img, p=0.0, rng=rng) is img
    assert random_grayscale(img, p=0.0, rng=rng) is img
    assert random_blur(img, p=0.0, rng=rng) is img


def test_color_jitter_and_blur_change_the_image():
    img = _random_rgb(16, 16)
    assert not np.array_equal(np.asarray(color_jitter(img, p=1.0, rng=random.Random(0))), np.asarray(img))
    blurred = np.asarray(random_blur(img, p=1.0, sigma=(2.0, 2.0), rng=random.Random(0)), dtype=float)
    assert blurred.std() < np.asarray(img, dtype=float).std()


def test_strong_view_is_reproducible_and_keeps_size():
    img = _random_rgb(24, 24)
    for strong_ops in (True, False):
        a = strong_view(img, strong_ops, rng=random.Random(5))
        b = strong_view(img, strong_ops, rng=random.Random(5))
        assert a.mode == "RGB" and a.size == img.size
        assert np.array_equal(np.asarray(a), np.asarray(b))
