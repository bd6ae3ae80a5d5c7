"""Split files, image/mask decoding and the segmentation dataset behind every preset (``docs/method.md`` §6, §8).

Split files follow the authors' format: one ``image_path mask_path`` pair per line,
relative to the dataset root; unlabeled lines may carry only the image path. The same
dataset class serves PASCAL VOC, Cityscapes (``*_labelTrainIds.png`` masks), COCO and
the generic ``folder`` layout: all are "image + mask" pairs, and a ``MaskDecoder`` says
how a mask file becomes class indices (index PNG as is, RGB colours through a palette,
or stored values through a value-to-class map such as ``{0: 0, 255: 1}``).

Every data error is a ``DataError`` whose message starts with the split file and line
(``Problem``), the same format ``dssn check-data`` prints.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dssn.constants import IGNORE
from dssn.data.batch import UnlabeledViews
from dssn.data.transforms import (
    cutmix_box,
    hflip,
    mask_to_tensor,
    pad_crop,
    resize_long_side,
    strong_view,
    to_tensor_normalized,
)
from dssn.errors import DssnError

Mode = Literal["train_l", "train_u", "val"]
MODES: tuple[str, ...] = ("train_l", "train_u", "val")
RGB = tuple[int, int, int]

# Fill for the mask cropped with unlabeled images (an all-zero dummy, or the true mask
# when asked for): any value that is neither a class id nor 255 works; padded pixels
# become IGNORE in ``ignore``.
_PAD_MARKER = 254


# --------------------------------------------------------------------------- errors


class DataError(DssnError, ValueError):
    """The data described by the config is missing or malformed; the message says where."""


class SplitFileError(DataError):
    """A split file line that is not ``image_path [mask_path]``."""


class MissingFileError(DataError, FileNotFoundError):
    """A listed image or mask does not exist."""


class MaskError(DataError):
    """A mask holds a value or colour that is no known class (the message names it)."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the data, located by split file (or folder) and line."""

    where: str
    line: int | None
    message: str

    def __str__(self) -> str:
        return f"{self.where}, line {self.line}: {self.message}" if self.line else f"{self.where}: {self.message}"


# --------------------------------------------------------------------------- split files


class SplitEntry(NamedTuple):
    """One split file line, remembered with its line number for error messages."""

    image: str
    mask: str | None
    line_no: int


@dataclass(frozen=True)
class Split:
    """The entries of one split and where they come from (a split file, or a folder listing)."""

    source: str
    entries: tuple[SplitEntry, ...]


def parse_split(path: str | Path) -> tuple[Split, list[Problem]]:
    """Read a split file, collecting malformed lines as problems instead of stopping at the first.

    Blank lines are skipped; a line has one field (image only) or two (image and mask).
    Raises ``FileNotFoundError`` if the file is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path}")
    entries: list[SplitEntry] = []
    problems: list[Problem] = []
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                problems.append(Problem(str(path), line_no, f"not UTF-8 text ({err.reason} at byte {err.start}); "
                                                            "split files list paths as UTF-8 text"))
                continue
            fields = line.split()
            if not fields:
                continue
            if len(fields) > 2:
                problems.append(Problem(
                    str(path), line_no, "expected 'image_path [mask_path]' (1 or 2 space-separated fields), "
                    f"got {len(fields)} fields: {line.rstrip()!r}"))
                continue
            entries.append(SplitEntry(fields[0], fields[1] if len(fields) == 2 else None, line_no))
    return Split(str(path), tuple(entries)), problems


def load_split(path: str | Path) -> Split:
    """Read a split file; ``SplitFileError`` naming the file and line for the first malformed line."""
    split, problems = parse_split(path)
    if problems:
        raise SplitFileError(str(problems[0]))
    return split


def read_split(path: str | Path) -> list[tuple[str, str | None]]:
    """Parse a split file into ``(image_path, mask_path or None)`` pairs, paths as written.

    Blank (whitespace-only) lines are skipped; a line has one field (unlabeled) or two.
    Raises ``FileNotFoundError`` if the file is missing and ``SplitFileError`` (a
    ``ValueError``) naming the file and line for a line with more than two fields.
    """
    return [(entry.image, entry.mask) for entry in load_split(path).entries]


def write_split(path: Path, pairs: Sequence[tuple[str, str | None]]) -> None:
    """Write pairs in the authors' format (``image mask`` or ``image`` per line)."""
    for image, mask in pairs:
        if any(c.isspace() for c in image + (mask or "")):
            raise DataError(f"cannot write {path}: the path {image!r} contains a space, which the split file "
                            "format cannot hold; rename the file")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{image} {mask}\n" if mask else f"{image}\n" for image, mask in pairs),
                    encoding="utf-8")


# --------------------------------------------------------------------------- decoding


def open_image(path: Path) -> Image.Image:
    """Open and fully decode an image file (so a truncated file fails here, not later)."""
    img = Image.open(path)
    img.load()
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any image as 8-bit RGB: grayscale is repeated, 16-bit and 32-bit integer images
    are scaled from the 16-bit range (65535 -> 255), alpha is dropped."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        values = np.asarray(img, dtype=np.float32)
        eight_bit = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(eight_bit, "L").convert("RGB")
    return img.convert("RGB")


def _mask_values(img: Image.Image) -> np.ndarray:
    """The stored values of a single-channel mask: palette indices for 'P' (never the
    colours), 0/255 for 1-bit images, raw values for 8/16/32-bit grayscale."""
    if img.mode == "1":
        img = img.convert("L")
    elif img.mode == "LA":
        img = img.getchannel("L")
    return np.asarray(img)


def _describe_values(values: np.ndarray, limit: int = 8) -> str:
    shown = ", ".join(str(int(v)) for v in values[:limit])
    return shown + (f" and {len(values) - limit} more" if len(values) > limit else "")


@dataclass(frozen=True)
class MaskDecoder:
    """How mask files become class-index arrays (``uint8``, 255 = ignore).

    - Single-channel masks ('P', 'L', '1', 16-bit): stored values are class ids, or are
      mapped through ``value_map`` (e.g. ``{0: 0, 255: 1}`` for binary 0/255 masks).
      255 stays ignore unless the map says otherwise.
    - RGB(A) masks: each colour is looked up in ``palette`` (class ``i`` has colour
      ``palette[i]``); ``ignore_color`` maps to 255. RGB masks need a palette.

    With ``num_classes`` set, any value that is not a class id (or 255) is an error;
    without it any 8-bit value passes, as the loader always did.
    """

    num_classes: int | None = None
    value_map: Mapping[int, int] | None = None
    palette: Sequence[RGB] | None = None
    ignore_color: RGB | None = None
    hint: str = ""
    """Appended to unknown value/colour errors: where the classes are declared."""

    def decode(self, img: Image.Image) -> np.ndarray:
        """Class indices of a mask image; ``MaskError`` naming unknown values or colours."""
        if img.mode in ("RGB", "RGBA"):
            return self._decode_colours(np.asarray(img)[..., :3])
        if img.mode not in ("P", "L", "1", "LA") and not img.mode.startswith("I"):
            raise MaskError(f"mask mode {img.mode!r} is not supported: use a single-channel class-index PNG "
                            "or an RGB colour-coded PNG")
        return self._decode_values(_mask_values(img))

    # ---- single-channel
    @cached_property
    def _lut(self) -> np.ndarray:
        """Stored value (0..65535) -> class id, or -1 for a value that is no class."""
        size = 65536 if self.value_map and max(self.value_map) > 255 else 256
        lut = np.full(size, -1, dtype=np.int32)
        if self.value_map is not None:
            for value, cls in self.value_map.items():
                lut[value] = cls
            if IGNORE not in self.value_map:
                lut[IGNORE] = IGNORE
        else:
            n = 256 if self.num_classes is None else min(self.num_classes, 256)
            lut[:n] = np.arange(n)
            lut[IGNORE] = IGNORE
        return lut

    def _decode_values(self, values: np.ndarray) -> np.ndarray:
        lut = self._lut
        if values.dtype != np.uint8:
            if values.size and (values.min() < 0 or values.max() >= len(lut)):
                bad = np.unique(values[(values < 0) | (values >= len(lut))])
                raise MaskError(f"unknown mask value(s) {_describe_values(bad)}{self._classes_hint()}")
            values = values.astype(np.int64)
        classes = lut[values]
        unknown = classes < 0
        if unknown.any():
            bad = np.unique(values[unknown])
            raise MaskError(f"unknown mask value(s) {_describe_values(bad)}{self._classes_hint()}")
        return classes.astype(np.uint8)

    def _classes_hint(self) -> str:
        if self.value_map is not None:
            known = ", ".join(f"{v}->{c}" for v, c in sorted(self.value_map.items()))
            return f" (the value map is {known}; 255 = ignore){self.hint}"
        if self.num_classes is not None:
            return f" (classes are 0..{self.num_classes - 1}, 255 = ignore){self.hint}"
        return self.hint

    # ---- colour
    @cached_property
    def _colour_table(self) -> tuple[np.ndarray, np.ndarray]:
        colours = [tuple(c) for c in self.palette or ()]
        classes = list(range(len(colours)))
        if self.ignore_color is not None:
            colours.append(tuple(self.ignore_color))
            classes.append(IGNORE)
        codes = np.array([(r << 16) | (g << 8) | b for r, g, b in colours], dtype=np.int64)
        order = np.argsort(codes)
        return codes[order], np.array(classes, dtype=np.uint8)[order]

    def _decode_colours(self, rgb: np.ndarray) -> np.ndarray:
        if not self.palette:
            raise MaskError("colour-coded (RGB) mask but no palette is declared: masks must be "
                            f"single-channel class-index images, or declare a palette{self.hint}")
        codes_sorted, classes_sorted = self._colour_table
        rgb = rgb.astype(np.int64)
        codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        pos = np.clip(np.searchsorted(codes_sorted, codes), 0, len(codes_sorted) - 1)
        known = codes_sorted[pos] == codes
        if not known.all():
            unknown, counts = np.unique(codes[~known], return_counts=True)
            shown = ", ".join(f"({c >> 16}, {(c >> 8) & 255}, {c & 255}) in {n} pixels"
                              for c, n in list(zip(unknown.tolist(), counts.tolist()))[:5])
            more = f" and {len(unknown) - 5} more colours" if len(unknown) > 5 else ""
            raise MaskError(f"unknown colour {shown}{more}: not in the palette{self.hint}")
        return classes_sorted[pos]


# --------------------------------------------------------------------------- listed files
# One place turns "a file listed in a split" into pixels or a message, used by the
# dataset and by ``dssn check-data`` alike, so both report a problem the same way.


def missing_message(kind: str, relative: str, path: Path) -> str:
    return f"{kind} {relative}: not found ({path})"


def open_listed(root: Path, relative: str, kind: str) -> Image.Image:
    """Open and decode ``root / relative``; ``DataError`` "<kind> <relative>: <what is wrong>"."""
    path = root / relative
    try:
        return open_image(path)
    except FileNotFoundError:
        raise MissingFileError(missing_message(kind, relative, path)) from None
    except (OSError, SyntaxError, ValueError) as err:  # what PIL raises for unreadable files
        raise DataError(f"{kind} {relative}: cannot be decoded ({err})") from None


def load_pair(root: Path, image: str, mask: str | None,
              decoder: MaskDecoder) -> tuple[Image.Image, Image.Image | None]:
    """An RGB image and, if ``mask`` is given, its class-index mask ('L'), sizes checked."""
    img = to_rgb(open_listed(root, image, "image"))
    if mask is None:
        return img, None
    raw = open_listed(root, mask, "mask")
    try:
        classes = Image.fromarray(decoder.decode(raw))
    except MaskError as err:
        raise MaskError(f"mask {mask}: {err}") from None
    if classes.size != img.size:
        raise DataError(f"image {image} is {img.width}x{img.height} but mask {mask} is "
                        f"{classes.width}x{classes.height} (width x height)")
    return img, classes


# --------------------------------------------------------------------------- dataset


class SegmentationDataset(Dataset):
    """Image/mask pairs listed in a split, augmented for one training role.

    Modes:
      - ``"val"``: ``(image [3,H,W] float, mask [H,W] long, name)`` at the original
        size; ``name`` is the image path as written in the split file.
      - ``"train_l"``: ``(image [3,c,c], mask [c,c] long)``: resize_long_side ->
        pad_crop (mask padding 255) -> hflip.
      - ``"train_u"``: ``UnlabeledViews``: the weak view, two independent strong views
        (each [3,c,c]), ``ignore`` (long [c,c], 255 where the crop padded the image, 0
        elsewhere) and the CutMix boxes ``box1``/``box2`` (bool [c,c]). Masks in the split
        file are not read.

    ``split_file``: a split file path, or a ``Split`` already listed (e.g. from a folder).
    ``length``: if larger than the split, the list is cycled up to it (the labeled set
    is repeated to the unlabeled set's length, ``docs/method.md`` §8); otherwise it has no effect.
    ``decoder``: how masks become class ids (default: single-channel index masks as is).
    Images of any mode (grayscale, 16-bit, RGBA) are read as RGB.
    """

    def __init__(
        self,
        root: str | Path,
        split_file: str | Path | Split,
        mode: Mode,
        crop_size: int | None = None,
        strong_ops: bool = True,
        length: int | None = None,
        seed: int = 0,
        decoder: MaskDecoder | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode != "val" and (crop_size is None or crop_size < 1):
            raise ValueError(f"mode {mode!r} needs a positive crop_size, got {crop_size!r}")
        self.root = Path(root)
        split = split_file if isinstance(split_file, Split) else load_split(split_file)
        self.split_file = split.source
        self.mode = mode
        self.crop_size = crop_size
        self.strong_ops = strong_ops
        self.seed = seed
        self.decoder = decoder or MaskDecoder()
        self.entries = split.entries
        if not self.entries:
            raise DataError(f"split {self.split_file} lists no images")
        if mode != "train_u":
            for entry in self.entries:
                if entry.mask is None:
                    raise SplitFileError(str(Problem(
                        self.split_file, entry.line_no,
                        f"mode {mode!r} needs 'image_path mask_path', got only {entry.image!r}")))
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

    def __getitem__(
        self, index: int
    ) -> tuple[torch.Tensor, torch.Tensor, str] | tuple[torch.Tensor, torch.Tensor] | UnlabeledViews:
        entry = self.entries[index % len(self.entries)]
        try:
            read_mask = self.mode != "train_u"
            img, mask = load_pair(self.root, entry.image, entry.mask if read_mask else None, self.decoder)
        except DataError as err:  # say where the file is listed
            raise type(err)(str(Problem(self.split_file, entry.line_no, str(err)))) from None

        if self.mode == "train_u":
            return self._unlabeled_views(img, self._rng(index))
        if self.mode == "val":
            return to_tensor_normalized(img), mask_to_tensor(mask), entry.image

        rng = self._rng(index)
        img, mask = resize_long_side(img, mask, rng=rng)
        img, mask = pad_crop(img, mask, self.crop_size, IGNORE, rng=rng)
        img, mask = hflip(img, mask, rng=rng)
        return to_tensor_normalized(img), mask_to_tensor(mask)

    def _unlabeled_views(self, img: Image.Image, rng: random.Random) -> UnlabeledViews:
        # The unlabeled mask is unknown: crop an all-zero dummy alongside the image so
        # the padded area can be found afterwards.
        companion = Image.new("L", img.size, 0)
        img, companion = resize_long_side(img, companion, rng=rng)
        img, companion = pad_crop(img, companion, self.crop_size, _PAD_MARKER, rng=rng)
        img, companion = hflip(img, companion, rng=rng)

        # Draw order is part of the reproducible stream: view, box, view, box.
        strong1 = strong_view(img, self.strong_ops, rng=rng)
        box1 = cutmix_box(self.crop_size, rng=rng)
        strong2 = strong_view(img, self.strong_ops, rng=rng)
        box2 = cutmix_box(self.crop_size, rng=rng)

        padded = np.asarray(companion) == _PAD_MARKER
        ignore = torch.from_numpy(np.where(padded, IGNORE, 0).astype(np.int64))
        return UnlabeledViews(
            weak=to_tensor_normalized(img),
            strong1=to_tensor_normalized(strong1),
            strong2=to_tensor_normalized(strong2),
            ignore=ignore,
            box1=box1,
            box2=box2,
        )
