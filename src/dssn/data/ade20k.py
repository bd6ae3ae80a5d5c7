"""ADE20K (ADEChallengeData2016, the SceneParsing benchmark): classes, colours and mask mapping.

The official annotations are single-channel PNGs holding 0 for "other" (no benchmark class)
and 1..150 for the classes. Training and evaluation use ``0 -> 255`` (ignore) and
``k -> k - 1``, so class ids are 0..149. ``Ade20kDecoder`` applies that mapping while the
dataset loads a mask; ``dssn prepare ade20k`` writes the mapped masks out instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from dssn.constants import IGNORE
from dssn.data.datasets import MaskDecoder, MaskError

ADE20K_NUM_CLASSES = 150
ADE20K_RAW_MAX = ADE20K_NUM_CLASSES
"""The largest value an official annotation holds."""

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel",
    "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
# The benchmark's colour of each class id (0..149), as its toolkits draw them.
ADE20K_PALETTE = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80), (140, 140, 140),
    (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7), (150, 5, 61), (120, 120, 70),
    (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3), (0, 102, 200),
    (61, 230, 250), (255, 6, 51), (11, 102, 255), (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220),
    (255, 9, 92), (112, 9, 255), (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10),
    (7, 255, 255), (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255), (140, 140, 140),
    (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0), (0, 0, 255),
    (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255), (11, 200, 200), (255, 82, 0), (0, 255, 245),
    (0, 61, 255), (0, 255, 112), (0, 255, 133), (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0),
    (0, 143, 255), (51, 255, 0), (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0),
    (0, 255, 153), (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194), (0, 255, 82),
    (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255), (0, 255, 163), (255, 153, 0),
    (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255), (163, 255, 0), (255, 235, 0), (8, 184, 170),
    (133, 0, 255), (0, 255, 92), (184, 0, 255), (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112),
    (92, 255, 0), (0, 224, 255), (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0),
    (255, 0, 163), (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255), (255, 255, 0),
    (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0), (173, 0, 255), (0, 245, 255),
    (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255), (184, 255, 0), (0, 133, 255), (255, 214, 0),
    (25, 194, 194), (102, 255, 0), (92, 0, 255),
)

_MAPPED_HINT = ("; masks already holding class ids 0..149 and 255 (UniMatch V2's pre-processed annotations, or "
                "what `dssn prepare ade20k` writes) are read with data.ade20k_masks=mapped")


def ade20k_lut() -> np.ndarray:
    """Official value (0..150) -> class id: 0 ("other") -> 255, k -> k - 1."""
    return np.concatenate(([IGNORE], np.arange(ADE20K_NUM_CLASSES))).astype(np.uint8)


_LUT = ade20k_lut()


def ade20k_class_ids(raw: np.ndarray) -> np.ndarray:
    """Class ids (``uint8``, 255 = ignore) of an official annotation; ``MaskError`` naming any
    value that is not 0..150."""
    bad = (raw < 0) | (raw > ADE20K_RAW_MAX)
    if bad.any():
        values = np.unique(raw[bad])
        shown = ", ".join(str(int(v)) for v in values[:8]) + (f" and {len(values) - 8} more" if len(values) > 8 else "")
        raise MaskError(f"value(s) {shown} in {int(bad.sum())} pixel(s): ADE20K annotations hold 0 (other) and "
                        f"1..{ADE20K_RAW_MAX} (the classes){_MAPPED_HINT}")
    return _LUT[raw.astype(np.intp, copy=False)]


@dataclass(frozen=True)
class Ade20kDecoder(MaskDecoder):
    """Reads the official annotations, mapping them as they load (``ade20k_class_ids``)."""

    num_classes: int | None = ADE20K_NUM_CLASSES

    def decode(self, img: Image.Image) -> np.ndarray:
        if img.mode not in ("L", "P") and not img.mode.startswith("I"):
            raise MaskError(f"mask mode {img.mode!r}: ADE20K annotations are single-channel PNGs "
                            f"(0 = other, 1..{ADE20K_RAW_MAX} = classes)")
        return ade20k_class_ids(np.asarray(img))
