"""Hand-checkable properties of the augmentations of docs/method.md §6."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from dssn.data import transforms
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


def _release_cutmix_box(size: int, rng: random.Random) -> tuple[int, int] | None:
    """A literal reading of the releases' ``obtain_cutmix_box`` (the area drawn once; the
    aspect and corner redrawn until the box fits), returning (width, height) or None."""
    if rng.random() > 0.5:
        return None
    area = rng.uniform(0.02, 0.4) * size * size
    while True:
        ratio = rng.uniform(0.3, 1 / 0.3)
        w, h = int(np.sqrt(area / ratio)), int(np.sqrt(area * ratio))
        x, y = rng.randint(0, size - 1), rng.randint(0, size - 1)
        if x + w <= size and y + h <= size:
            return w, h


def _box_sides(box: np.ndarray) -> tuple[int, int] | None:
    if not box.any():
        return None
    rows, cols = np.flatnonzero(box.any(axis=1)), np.flatnonzero(box.any(axis=0))
    h, w = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
    assert int(box.sum()) == w * h  # a filled axis-aligned rectangle
    return w, h


def _ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    values = np.concatenate([a, b])
    cdf_a = np.searchsorted(np.sort(a), values, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), values, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def test_cutmix_box_distribution_is_the_releases():
    """The figures of docs/method.md §6 for the releases' sampler at S=321: present 0.50; mean area 0.21 of
    the crop when present; wider than tall in 27% of boxes (width int(sqrt(a/r)), height
    int(sqrt(a*r))). Redrawing the area on rejection gives 0.14, swapping the sides 73%."""
    size, draws = 321, 20_000
    rng = random.Random(0)
    sides = []
    for _ in range(draws):
        box = cutmix_box(size, rng=rng)
        assert box.dtype == torch.bool and box.shape == (size, size)
        sides.append(_box_sides(box.numpy()))  # NumPy checks: cheap, and immune to torch thread start-up
    present = [s for s in sides if s is not None]
    area = np.array([w * h for w, h in present]) / size**2
    wider = np.mean([w > h for w, h in present])
    assert abs(len(present) / draws - 0.5) < 0.02
    assert abs(area.mean() - 0.21) < 0.01
    assert abs(wider - 0.27) < 0.02
    # always whole and inside: a box clipped by the crop's edge would fall below the smallest
    # area the truncated sides allow (0.02 S^2 less about 2.4 sqrt(0.02) S)
    assert area.min() >= 0.018 and area.max() <= 0.4
    heights_over_widths = np.array([h / w for w, h in present])
    assert heights_over_widths.min() >= 0.3 * 0.9 and heights_over_widths.max() <= (1 / 0.3) * 1.1

    # and distribution against distribution, with the literal reading of the release
    release_rng = random.Random(1)
    release = [b for b in (_release_cutmix_box(size, release_rng) for _ in range(draws)) if b is not None]
    release_area = np.array([w * h for w, h in release]) / size**2
    assert _ks_distance(area, release_area) < 0.03


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


class _FixedUniform(random.Random):
    """A generator whose ``random()`` always answers ``value``, to pin an op's magnitude."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


def test_posterize_and_solarize_by_hand():
    img = Image.new("RGB", (1, 1), (200, 100, 7))
    # u = 0.9: 8 - ceil(3.6) = 4 bits
    assert STRONG_OPS["posterize"](img, _FixedUniform(0.9)).getpixel((0, 0)) == (192, 96, 0)
    # u = 0.5: threshold 256 - ceil(127.5) = 128
    assert STRONG_OPS["solarize"](img, _FixedUniform(0.5)).getpixel((0, 0)) == (55, 100, 7)
    # u = 0 (the generator's edge): max(1, 0) keeps the op from being a no-op
    assert STRONG_OPS["posterize"](img, _FixedUniform(0.0)).getpixel((0, 0)) == (200, 100, 6)
    assert STRONG_OPS["solarize"](img, _FixedUniform(0.0)).getpixel((0, 0)) == (200, 100, 7)


def _gradient() -> Image.Image:
    """Every channel value 0..255 once (a 16 x 16 gray ramp)."""
    return Image.fromarray(np.repeat(np.arange(256, dtype=np.uint8).reshape(16, 16, 1), 3, axis=2))


def test_posterize_keeps_4_to_7_bits_uniformly_never_8():
    """The release's ``8 - max(1, ceil(4u))``: the bits kept are read off the output as
    log2 of the number of distinct levels left in a full ramp."""
    rng, ramp, draws = random.Random(0), _gradient(), 2000
    bits = [int(np.log2(len(np.unique(np.asarray(STRONG_OPS["posterize"](ramp, rng)))))) for _ in range(draws)]
    counts = {b: bits.count(b) / draws for b in set(bits)}
    assert set(counts) == {4, 5, 6, 7}
    assert all(abs(share - 0.25) < 0.04 for share in counts.values())


def test_solarize_threshold_is_1_to_255_never_256():
    """The release's ``256 - max(1, ceil(255u))``: the threshold is read off the output as the
    smallest value of a full ramp that was inverted (256 if none was)."""
    rng, ramp, draws = random.Random(0), _gradient(), 3000
    values = np.asarray(ramp)[..., 0].ravel()
    thresholds = []
    for _ in range(draws):
        out = np.asarray(STRONG_OPS["solarize"](ramp, rng))[..., 0].ravel()
        inverted = values[out != values]
        thresholds.append(int(inverted.min()) if inverted.size else 256)
    thresholds = np.array(thresholds)
    assert thresholds.min() >= 1 and thresholds.max() <= 255
    assert abs(thresholds.mean() - 128) < 4  # uniform on 1..255: mean 128, sd 73.6 -> se 1.3
    assert (thresholds < 128).mean() == pytest.approx(127 / 255, abs=0.03)


def test_hue_shift_wraps_and_half_turn_maps_red_to_cyan():
    red = Image.new("RGB", (2, 2), (255, 0, 0))
    r, g, b = adjust_hue(red, 0.5).getpixel((0, 0))
    assert r < 10 and g > 245 and b > 245
    r, g, b = adjust_hue(red, -0.5).getpixel((0, 0))  # negative shift wraps the same way
    assert r < 10 and g > 245 and b > 245
    gray = Image.new("RGB", (2, 2), (90, 90, 90))
    assert adjust_hue(gray, 0.3).getpixel((0, 0)) == (90, 90, 90)


def test_hue_step_truncates_toward_zero_as_the_release_casts_it():
    """``np.uint8(shift * 255)``: -0.05 * 255 = -12.75 moves the uint8 hue by -12 (to 244 for
    red, whose hue is 0), not by the rounded -13; -0.1 -> -25 (231), not -26."""
    red = Image.new("RGB", (1, 1), (255, 0, 0))
    for shift, hue in ((-0.05, 244), (-0.1, 231), (0.3, 76)):
        assert np.asarray(adjust_hue(red, shift).convert("HSV"))[0, 0, 0] == hue


def test_hue_op_draws_its_magnitude_and_sign_apart(monkeypatch):
    """The strong op's shift is +-0.5u: symmetric, magnitude uniform in [0, 0.5)."""
    shifts: list[float] = []
    monkeypatch.setattr(transforms, "adjust_hue", lambda img, shift: shifts.append(shift) or img)
    rng = random.Random(0)
    for _ in range(4000):
        STRONG_OPS["hue"](None, rng)
    magnitudes = np.abs(shifts)
    assert magnitudes.max() < 0.5
    assert abs((np.array(shifts) < 0).mean() - 0.5) < 0.03
    assert abs(magnitudes.mean() - 0.25) < 0.01


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
