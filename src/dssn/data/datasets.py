"""Split files and the segmentation dataset behind every preset (SPEC 5.1, 5.2).

Split files follow the authors' format: one ``image_path mask_path`` pair per line,
relative to the dataset root; unlabeled lines may carry only the image path. The same
dataset class serves PASCAL VOC, Cityscapes (``*_labelTrainIds.png`` masks) and COCO,
since all three are "RGB image + single-channel class-index mask" pairs.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dssn.data.transforms import (
    cutmix_box,
    hflip,
    mask_to_tensor,
    pad_crop,
    resize_long_side,
    strong_view,
    to_tensor_normalized,
)

Mode = Literal["train_l", "train_u", "val"]
MODES: tuple[str, ...] = ("train_l", "train_u", "val")

IGNORE_INDEX = 255
# Fill for the dummy mask of unlabeled crops: any value that is not 0 works, since the
# dummy mask is all zeros; padded pixels become IGNORE_INDEX in ``ign``.
_PAD_MARKER = 254


class SplitFileError(ValueError):
    """A split file line that is not ``image_path [mask_path]``."""


class SplitEntry(NamedTuple):
    """One split file line, remembered with its line number for error messages."""

    image: str
    mask: str | None
    line_no: int


def _read_split_entries(path: str | Path) -> list[SplitEntry]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path}")
    entries = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) > 2:
                raise SplitFileError(
                    f"{path}, line {line_no}: expected 'image_path [mask_path]' "
                    f"(1 or 2 space-separated fields), got {len(fields)} fields: {line.rstrip()!r}"
                )
            entries.append(SplitEntry(fields[0], fields[1] if len(fields) == 2 else None, line_no))
    return entries


def read_split(path: str | Path) -> list[tuple[str, str | None]]:
    """Parse a split file into ``(image_path, mask_path or None)`` pairs, paths as written.

    Blank (whitespace-only) lines are skipped; a line has one field (unlabeled) or two.
    Raises ``FileNotFoundError`` if the file is missing and ``SplitFileError`` (a
    ``ValueError``) naming the file and line for a line with more than two fields.
    """
    return [(entry.image, entry.mask) for entry in _read_split_entries(path)]


class SegmentationDataset(Dataset):
    """Image/mask pairs listed in a split file, augmented for one training role.

    Modes:
      - ``"val"``: ``(image [3,H,W] float, mask [H,W] long, name)`` at the original
        size; ``name`` is the image path as written in the split file.
      - ``"train_l"``: ``(image [3,c,c], mask [c,c] long)``: resize_long_side ->
        pad_crop (mask padding 255) -> hflip.
      - ``"train_u"``: dict with the weak view ``w``, two independent strong views
        ``s1``/``s2`` (each [3,c,c]), ``ign`` (long [c,c], 255 where the crop padded the
        image, 0 elsewhere) and CutMix boxes ``b1``/``b2`` (bool [c,c]). Masks in the
        split file, if any, are not read.

    ``length``: if larger than the split, the list is cycled up to it (the labeled set
    is repeated to the unlabeled set's length, SPEC 5.1); otherwise it has no effect.
    """

    def __init__(
        self,
        root: str | Path,
        split_file: str | Path,
        mode: Mode,
        crop_size: int | None = None,
        strong_ops: bool = True,
        length: int | None = None,
        seed: int = 0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode != "val" and (crop_size is None or crop_size < 1):
            raise ValueError(f"mode {mode!r} needs a positive crop_size, got {crop_size!r}")
        self.root = Path(root)
        self.split_file = Path(split_file)
        self.mode = mode
        self.crop_size = crop_size
        self.strong_ops = strong_ops
        self.seed = seed
        self.entries = _read_split_entries(self.split_file)
        if not self.entries:
            raise ValueError(f"split file {self.split_file} lists no images")
        if mode != "train_u":
            for entry in self.entries:
                if entry.mask is None:
                    raise SplitFileError(
                        f"{self.split_file}, line {entry.line_no}: mode {mode!r} needs "
                        f"'image_path mask_path', got only {entry.image!r}"
                    )
        self._length = max(len(self.entries), length or 0)

    def __len__(self) -> int:
        return self._length

    def _rng(self, index: int) -> random.Random:
        # One generator per sample. The torch draw comes from torch's global generator:
        # with num_workers=0 it is reproducible under torch.manual_seed and advances each
        # call (so repeated indices and later epochs get fresh augmentations); in a
        # DataLoader worker torch is re-seeded with base_seed + worker_id, a new base_seed
        # each epoch, so workers and epochs differ. ``seed`` and ``index`` are mixed in so
        # two datasets or two samples never share a stream. String seeds are hashed with
        # SHA-512 by ``random``, stable across processes.
        draw = int(torch.randint(0, 2**62, ()).item())
        return random.Random(f"{self.seed}:{draw}:{index}")

    def _open(self, relative: str, line_no: int) -> Image.Image:
        path = self.root / relative
        try:
            img = Image.open(path)
            img.load()
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path} not found (listed on line {line_no} of {self.split_file}, "
                f"relative to root {self.root})"
            ) from None
        return img

    def _load_mask(self, relative: str, line_no: int) -> Image.Image:
        mask = self._open(relative, line_no)
        if mask.mode not in ("P", "L"):
            raise ValueError(
                f"{self.root / relative} (line {line_no} of {self.split_file}) has mode "
                f"{mask.mode!r}; masks must be single-channel class-index images "
                "('P' palette or 'L'), not colour-coded"
            )
        # Palette indices are the class ids: read them as-is into an "L" image, never
        # through the palette (which ``convert("L")`` would do).
        return Image.fromarray(np.asarray(mask, dtype=np.uint8))

    def __getitem__(
        self, index: int
    ) -> tuple[torch.Tensor, torch.Tensor, str] | tuple[torch.Tensor, torch.Tensor] | dict[str, torch.Tensor]:
        entry = self.entries[index % len(self.entries)]
        img = self._open(entry.image, entry.line_no).convert("RGB")

        if self.mode == "train_u":
            return self._unlabeled_views(img, self._rng(index))

        mask = self._load_mask(entry.mask, entry.line_no)
        if mask.size != img.size:
            raise ValueError(
                f"line {entry.line_no} of {self.split_file}: image {entry.image} is "
                f"{img.size} but mask {entry.mask} is {mask.size}"
            )
        if self.mode == "val":
            return to_tensor_normalized(img), mask_to_tensor(mask), entry.image

        rng = self._rng(index)
        img, mask = resize_long_side(img, mask, rng=rng)
        img, mask = pad_crop(img, mask, self.crop_size, IGNORE_INDEX, rng=rng)
        img, mask = hflip(img, mask, rng=rng)
        return to_tensor_normalized(img), mask_to_tensor(mask)

    def _unlabeled_views(self, img: Image.Image, rng: random.Random) -> dict[str, torch.Tensor]:
        # The unlabeled mask is unknown: crop an all-zero dummy alongside the image so
        # the padded area can be found afterwards.
        dummy = Image.new("L", img.size, 0)
        img, dummy = resize_long_side(img, dummy, rng=rng)
        img, dummy = pad_crop(img, dummy, self.crop_size, _PAD_MARKER, rng=rng)
        img, dummy = hflip(img, dummy, rng=rng)

        s1 = strong_view(img, self.strong_ops, rng=rng)
        b1 = cutmix_box(self.crop_size, rng=rng)
        s2 = strong_view(img, self.strong_ops, rng=rng)
        b2 = cutmix_box(self.crop_size, rng=rng)

        padded = np.asarray(dummy) == _PAD_MARKER
        ign = torch.from_numpy(np.where(padded, IGNORE_INDEX, 0).astype(np.int64))
        return {
            "w": to_tensor_normalized(img),
            "s1": to_tensor_normalized(s1),
            "s2": to_tensor_normalized(s2),
            "ign": ign,
            "b1": b1,
            "b2": b2,
        }
