"""Split files and SegmentationDataset on a tiny VOC-like folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dssn.data.batch import UnlabeledViews
from dssn.data.datasets import SegmentationDataset, SplitFileError, read_split

REFERENCE_SPLITS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "splits"

WIDTH, HEIGHT = 40, 30
PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [224, 224, 192] * 252


def _write_pair(root: Path, name: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    Image.fromarray(image).save(root / "JPEGImages" / f"{name}.jpg")
    labels = rng.integers(0, 4, (HEIGHT, WIDTH), dtype=np.uint8)
    labels[0, :] = 255  # a boundary row, like VOC's 255 outlines
    mask = Image.fromarray(labels).convert("P")
    mask.putpalette(PALETTE)
    mask.save(root / "SegmentationClass" / f"{name}.png")


@pytest.fixture()
def voc(tmp_path: Path) -> Path:
    """Three 40x30 JPEG/palette-PNG pairs, a labeled split and an image-only split."""
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "SegmentationClass").mkdir()
    names = ["a", "b", "c"]
    for i, name in enumerate(names):
        _write_pair(tmp_path, name, i)
    pairs = [f"JPEGImages/{n}.jpg SegmentationClass/{n}.png" for n in names]
    (tmp_path / "labeled.txt").write_text("\n".join(pairs) + "\n")
    (tmp_path / "unlabeled.txt").write_text("\n\n".join(f"JPEGImages/{n}.jpg" for n in names))
    return tmp_path


# --------------------------------------------------------------------------- read_split


def test_read_split_pairs_and_image_only_lines(tmp_path: Path):
    split = tmp_path / "split.txt"
    split.write_text("img/a.jpg mask/a.png\n\n  \nimg/b.jpg\nimg/c.jpg\tmask/c.png")
    assert read_split(split) == [
        ("img/a.jpg", "mask/a.png"),
        ("img/b.jpg", None),
        ("img/c.jpg", "mask/c.png"),
    ]


def test_read_split_too_many_fields_names_file_and_line(tmp_path: Path):
    split = tmp_path / "bad.txt"
    split.write_text("a.jpg a.png\n\nb.jpg b.png extra\n")
    with pytest.raises(SplitFileError) as info:
        read_split(split)
    message = str(info.value)
    assert str(split) in message and "line 3" in message
    assert "b.jpg b.png extra" in message and "image_path [mask_path]" in message
    assert isinstance(info.value, ValueError)


def test_read_split_missing_file(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_split(tmp_path / "nope.txt")


@pytest.mark.skipif(not REFERENCE_SPLITS.is_dir(), reason="reference splits not available")
@pytest.mark.parametrize(
    ("relative", "count"),
    [
        ("pascal/92/labeled.txt", 92),
        ("pascal/732/labeled.txt", 732),
        ("pascal/val.txt", 1449),
        ("cityscapes/1_16/labeled.txt", 186),
        ("cityscapes/val.txt", 500),
    ],
)
def test_read_split_reference_files(relative: str, count: int):
    entries = read_split(REFERENCE_SPLITS / relative)
    assert len(entries) == count
    for image, mask in entries:
        assert mask is not None
        assert image.startswith(("JPEGImages/", "leftImg8bit/"))
        assert mask.startswith(("SegmentationClass/", "gtFine/"))


# --------------------------------------------------------------------------- dataset


def test_val_mode_returns_full_size_tensors_and_name(voc: Path):
    ds = SegmentationDataset(voc, voc / "labeled.txt", "val")
    image, mask, name = ds[1]
    assert image.shape == (3, HEIGHT, WIDTH) and image.dtype == torch.float32
    assert mask.shape == (HEIGHT, WIDTH) and mask.dtype == torch.long
    assert name == "JPEGImages/b.jpg"
    expected = np.asarray(Image.open(voc / "SegmentationClass" / "b.png"))  # palette indices
    assert mask.tolist() == expected.tolist()
    assert set(mask.unique().tolist()) <= {0, 1, 2, 3, 255}


def test_train_l_shapes_and_padding_is_ignore(voc: Path):
    crop = 100  # at most 2 x 40 = 80 after rescaling, so padding always happens
    ds = SegmentationDataset(voc, voc / "labeled.txt", "train_l", crop_size=crop)
    image, mask = ds[0]
    assert image.shape == (3, crop, crop) and image.dtype == torch.float32
    assert mask.shape == (crop, crop) and mask.dtype == torch.long
    assert (mask[-1] == 255).all()  # the bottom row is always padding (height <= 60)
    assert set(mask.unique().tolist()) <= {0, 1, 2, 3, 255}
    assert (mask != 255).any()
    # padded image pixels are 0 before normalisation, i.e. -mean/std after it
    zero = (-torch.tensor([0.485, 0.456, 0.406]) / torch.tensor([0.229, 0.224, 0.225]))
    assert torch.allclose(image[:, -1, -1], zero, atol=1e-6)


def test_train_u_views_and_ignore_marks_padding(voc: Path):
    crop = 100  # > 2 x 40, so padding always happens
    ds = SegmentationDataset(voc, voc / "unlabeled.txt", "train_u", crop_size=crop, strong_ops=True)
    sample = ds[2]
    assert type(sample) is UnlabeledViews
    for view in (sample.weak, sample.strong1, sample.strong2):
        assert view.shape == (3, crop, crop) and view.dtype == torch.float32
    ign = sample.ignore
    assert ign.shape == (crop, crop) and ign.dtype == torch.long
    assert set(ign.unique().tolist()) == {0, 255}
    assert (ign[-1] == 255).all()  # the bottom row is padding (rescaled height <= 60)
    image_area = ign == 0
    # the rest is the image: a rectangle at the top-left, or top-right once flipped
    rows, cols = image_area.any(1).nonzero().flatten(), image_area.any(0).nonzero().flatten()
    assert rows[0] == 0 and (cols[0] == 0 or cols[-1] == crop - 1)
    assert int(image_area.sum()) == int((rows[-1] + 1) * (cols[-1] - cols[0] + 1))
    # the image content sits exactly where ignore is 0: padded pixels of the weak view are zeros
    zero = (-torch.tensor([0.485, 0.456, 0.406]) / torch.tensor([0.229, 0.224, 0.225])).view(3, 1)
    assert torch.allclose(sample.weak[:, ~image_area], zero.expand(3, int((~image_area).sum())), atol=1e-6)
    for box in (sample.box1, sample.box2):
        assert box.shape == (crop, crop) and box.dtype == torch.bool


def test_train_u_without_padding_has_no_ignore(voc: Path):
    ds = SegmentationDataset(voc, voc / "unlabeled.txt", "train_u", crop_size=8, strong_ops=False)
    for i in range(3):
        assert (ds[i].ignore == 0).all()  # 8 < 0.5 x 30 = 15, so never padded


def test_strong_views_are_independent(voc: Path):
    torch.manual_seed(0)
    ds = SegmentationDataset(voc, voc / "unlabeled.txt", "train_u", crop_size=16)
    differ = sum(not torch.equal(s.strong1, s.strong2) for s in (ds[0] for _ in range(5)))
    assert differ >= 4


def test_length_cycles_the_list(voc: Path):
    ds = SegmentationDataset(voc, voc / "labeled.txt", "val", length=7)
    assert len(ds) == 7
    assert [ds[i][2] for i in range(7)] == [f"JPEGImages/{n}.jpg" for n in "abcabca"]
    assert len(SegmentationDataset(voc, voc / "labeled.txt", "val", length=2)) == 3


def test_reproducible_under_global_seed(voc: Path):
    ds = SegmentationDataset(voc, voc / "labeled.txt", "train_l", crop_size=24)
    torch.manual_seed(123)
    first = [ds[0], ds[1]]
    torch.manual_seed(123)
    again = [ds[0], ds[1]]
    for (i1, m1), (i2, m2) in zip(first, again):
        assert torch.equal(i1, i2) and torch.equal(m1, m2)
    # without reseeding, the same index gets a fresh augmentation
    later = [ds[0] for _ in range(4)]
    assert any(not torch.equal(img, first[0][0]) for img, _ in later)


def test_missing_image_names_file_and_line(voc: Path):
    split = voc / "broken.txt"
    split.write_text("JPEGImages/a.jpg SegmentationClass/a.png\nJPEGImages/zz.jpg SegmentationClass/a.png\n")
    ds = SegmentationDataset(voc, split, "val")
    with pytest.raises(FileNotFoundError) as info:
        ds[1]
    message = str(info.value)
    assert "zz.jpg" in message and "line 2" in message and str(split) in message


def test_missing_mask_names_file(voc: Path):
    split = voc / "broken.txt"
    split.write_text("JPEGImages/a.jpg SegmentationClass/gone.png\n")
    ds = SegmentationDataset(voc, split, "train_l", crop_size=16)
    with pytest.raises(FileNotFoundError, match="gone.png"):
        ds[0]


def test_labeled_modes_need_masks(voc: Path):
    with pytest.raises(SplitFileError, match="line 1"):
        SegmentationDataset(voc, voc / "unlabeled.txt", "train_l", crop_size=16)


def test_bad_arguments(voc: Path):
    with pytest.raises(ValueError, match="mode"):
        SegmentationDataset(voc, voc / "labeled.txt", "train")
    with pytest.raises(ValueError, match="crop_size"):
        SegmentationDataset(voc, voc / "labeled.txt", "train_l")


def test_colour_masks_are_rejected(voc: Path):
    Image.new("RGB", (WIDTH, HEIGHT), (128, 0, 0)).save(voc / "SegmentationClass" / "rgb.png")
    split = voc / "rgb.txt"
    split.write_text("JPEGImages/a.jpg SegmentationClass/rgb.png\n")
    with pytest.raises(ValueError, match="class-index"):
        SegmentationDataset(voc, split, "val")[0]


def test_works_in_a_dataloader_with_workers(voc: Path):
    ds = SegmentationDataset(voc, voc / "unlabeled.txt", "train_u", crop_size=16, length=4)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    batches = list(loader)
    assert len(batches) == 2 and type(batches[0]) is UnlabeledViews  # default_collate keeps the type
    assert batches[0].weak.shape == (2, 3, 16, 16) and batches[0].box1.dtype == torch.bool
