"""``dssn prepare``: turn raw Cityscapes, COCO and ADE20K annotations into class-index masks.

All are resumable and safe: an output that already exists is skipped (never
rewritten) unless ``overwrite``; each output is written to a temporary file and
renamed, so an interrupted run never leaves a half-written mask behind that a
later run would skip.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from dssn.constants import IGNORE
from dssn.data.ade20k import ADE20K_PALETTE, ade20k_class_ids
from dssn.data.classes import COCO_CATEGORY_IDS
from dssn.data.datasets import DataError, MaskError, open_image
from dssn.data.colors import voc_palette
from dssn.files import atomic_path

# The official Cityscapes label table (cityscapesScripts, helpers/labels.py): trainId of
# each labelId 0..33; 255 = ignored in training and evaluation. (The 'license plate'
# label has id -1 and is never drawn into *_labelIds.png.) Carried here rather than
# depending on cityscapesScripts, whose install pulls matplotlib, requests, pyquaternion,
# coloredlogs and a `typing` backport for this one table.
CITYSCAPES_TRAIN_IDS: tuple[int, ...] = (
    255, 255, 255, 255, 255, 255, 255,  # 0-6: unlabeled, ego vehicle, rectification border, out of roi,
                                        #      static, dynamic, ground
    0, 1, 255, 255,                     # 7-10: road, sidewalk, parking, rail track
    2, 3, 4, 255, 255, 255,             # 11-16: building, wall, fence, guard rail, bridge, tunnel
    5, 255, 6, 7,                       # 17-20: pole, polegroup, traffic light, traffic sign
    8, 9, 10,                           # 21-23: vegetation, terrain, sky
    11, 12,                             # 24-25: person, rider
    13, 14, 15, 255, 255, 16, 17, 18,   # 26-33: car, truck, bus, caravan, trailer, train, motorcycle, bicycle
)


@dataclass
class PrepareReport:
    written: int = 0
    skipped: int = 0

    def __str__(self) -> str:
        return f"{self.written} written, {self.skipped} already there (skipped)"


def _save_atomic(mask: np.ndarray, path: Path, palette: list[int] | None = None) -> None:
    """Save a class-index mask as a palette PNG (indices are the class ids) via a temp file."""
    img = Image.fromarray(mask.astype(np.uint8), "L").convert("P")
    img.putpalette(palette or voc_palette(256))
    with atomic_path(path, durable=False) as tmp:
        img.save(tmp, format="PNG")


def _write_all(jobs: Iterable[tuple[Path, Callable[[], np.ndarray]]], total: int, overwrite: bool,
               desc: str, progress: bool, palette: list[int] | None = None) -> PrepareReport:
    report = PrepareReport()
    for out, make in tqdm(jobs, total=total, desc=desc, unit="mask", disable=not progress):
        if out.exists() and not overwrite:
            report.skipped += 1
            continue
        _save_atomic(make(), out, palette)
        report.written += 1
    return report


# --------------------------------------------------------------------------- Cityscapes


def cityscapes_lut() -> np.ndarray:
    """labelId (0..255) -> trainId; ids outside the official table map to 255."""
    lut = np.full(256, IGNORE, dtype=np.uint8)
    lut[: len(CITYSCAPES_TRAIN_IDS)] = CITYSCAPES_TRAIN_IDS
    return lut


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    return cityscapes_lut()[label_ids]


def prepare_cityscapes(root: Path, overwrite: bool = False, progress: bool = True) -> PrepareReport:
    """Write ``*_gtFine_labelTrainIds.png`` next to every ``gtFine/**/*_gtFine_labelIds.png``."""
    sources = sorted((root / "gtFine").rglob("*_gtFine_labelIds.png"))
    if not sources:
        raise DataError(f"no gtFine/<split>/<city>/*_gtFine_labelIds.png under {root}: download "
                        "gtFine_trainvaltest.zip from the Cityscapes website and unpack it there (next to leftImg8bit/)")
    lut = cityscapes_lut()

    def convert(src: Path) -> Callable[[], np.ndarray]:
        def make() -> np.ndarray:
            ids = open_image(src)
            if ids.mode not in ("L", "P"):
                raise DataError(f"{src}: expected a single-channel labelIds PNG, got mode {ids.mode!r}")
            return lut[np.asarray(ids)]
        return make

    jobs = ((src.with_name(src.name.replace("_labelIds.png", "_labelTrainIds.png")), convert(src))
            for src in sources)
    return _write_all(jobs, len(sources), overwrite, "cityscapes train ids", progress)


# --------------------------------------------------------------------------- COCO


def _coco_api():  # noqa: ANN202 - pycocotools has no type hints
    try:
        from pycocotools.coco import COCO
    except ImportError:
        raise DataError("`dssn prepare coco` needs pycocotools: pip install 'dssn[coco]' "
                        "(or pip install pycocotools)") from None
    return COCO


def coco_class_of(categories: list[dict], source: Path) -> dict[int, int]:
    """COCO category id -> class id 1..80 (increasing category id; 0 is background)."""
    ids = sorted(int(c["id"]) for c in categories)
    if tuple(ids) != COCO_CATEGORY_IDS:
        extra = sorted(set(ids) - set(COCO_CATEGORY_IDS))
        missing = sorted(set(COCO_CATEGORY_IDS) - set(ids))
        raise DataError(f"{source}: the categories are not COCO's 80 (unexpected ids {extra}, missing ids {missing}); "
                        "for other COCO-format data, export masks and use the 'folder' dataset kind")
    return {cat: i + 1 for i, cat in enumerate(ids)}


def coco_mask(coco, image_id: int, class_of: dict[int, int]) -> np.ndarray:  # noqa: ANN001
    """Class-index mask of one image: instances painted largest first, so smaller objects
    stay visible where they overlap; crowd regions get their class like any instance."""
    info = coco.imgs[image_id]
    mask = np.zeros((info["height"], info["width"]), dtype=np.uint8)
    anns = sorted(coco.loadAnns(coco.getAnnIds(imgIds=image_id)), key=lambda a: -a["area"])
    for ann in anns:
        mask[coco.annToMask(ann) > 0] = class_of[ann["category_id"]]
    return mask


def prepare_coco(root: Path, splits: tuple[str, ...] = ("train2017", "val2017"), out: str = "masks",
                 overwrite: bool = False, progress: bool = True) -> dict[str, PrepareReport]:
    """Write ``ROOT/<out>/<image stem>.png`` (81 classes) from
    ``ROOT/annotations/instances_<split>.json`` for every image the JSON lists.

    One flat folder for all splits (COCO image ids are unique across them), as the
    authors' split files expect: ``train2017/X.jpg masks/X.png``."""
    COCO = _coco_api()
    reports = {}
    for split in splits:
        source = root / "annotations" / f"instances_{split}.json"
        if not source.is_file():
            raise DataError(f"{source} not found: download annotations_trainval2017.zip from cocodataset.org and "
                            f"unpack it into {root}")
        coco = COCO(str(source))
        class_of = coco_class_of(list(coco.cats.values()), source)
        image_ids = sorted(coco.imgs)

        def job(image_id: int) -> tuple[Path, Callable[[], np.ndarray]]:
            name = Path(coco.imgs[image_id]["file_name"]).stem
            return root / out / f"{name}.png", lambda: coco_mask(coco, image_id, class_of)

        reports[split] = _write_all(map(job, image_ids), len(image_ids), overwrite, f"coco {split}", progress)
    return reports


# --------------------------------------------------------------------------- ADE20K

ADE20K_SPLITS = ("training", "validation")


def prepare_ade20k(root: Path, out: str = "annotations_mapped", overwrite: bool = False,
                   progress: bool = True) -> dict[str, PrepareReport]:
    """Write ``ROOT/<out>/<split>/<name>.png`` (class ids 0..149, 255 = "other") from every
    official ``ROOT/annotations/<split>/<name>.png`` (0 = other, 1..150 = classes).

    Training does not need this (the ``ade20k`` dataset maps the official masks as it loads
    them); it makes masks in the mapped encoding that UniMatch V2's pre-processed annotations
    use, for tools that expect it or for ``data.ade20k_masks=mapped``. A value above 150 stops
    the run with the file and the value; masks written before it stay (complete) and are
    skipped when the run is repeated."""
    if (root / out).resolve() == (root / "annotations").resolve():
        raise DataError(f"the output folder {root / out} is the official annotations' folder; choose another")
    sources = {split: sorted((root / "annotations" / split).glob("*.png")) for split in ADE20K_SPLITS}
    if not any(sources.values()):
        raise DataError(f"no annotations/{{training,validation}}/*.png under {root}: download "
                        "ADEChallengeData2016.zip and unpack it so that ROOT holds images/ and annotations/")
    palette = [c for rgb in ADE20K_PALETTE for c in rgb]
    palette += voc_palette(256)[len(palette):]

    def convert(src: Path) -> Callable[[], np.ndarray]:
        def make() -> np.ndarray:
            raw = open_image(src)
            if raw.mode not in ("L", "P") and not raw.mode.startswith("I"):
                raise DataError(f"{src}: expected a single-channel ADE20K annotation PNG, got mode {raw.mode!r}")
            try:
                return ade20k_class_ids(np.asarray(raw))
            except MaskError as err:
                raise MaskError(f"{src}: {err}") from None
        return make

    reports = {}
    for split, files in sources.items():
        if not files:
            continue
        jobs = ((root / out / split / src.name, convert(src)) for src in files)
        reports[split] = _write_all(jobs, len(files), overwrite, f"ade20k {split}", progress, palette)
    return reports


@dataclass(frozen=True)
class PrepareOptions:
    """What ``dssn prepare`` was told, for every dataset's prepare step."""

    out: str | None = None
    """Output folder under the root (None: the dataset's default)."""
    splits: tuple[str, ...] = ("train2017", "val2017")
    """COCO: the annotation splits to convert."""
    overwrite: bool = False
    progress: bool = True


def cityscapes_step(root: Path, options: PrepareOptions) -> list[str]:
    return [f"cityscapes: {prepare_cityscapes(root, options.overwrite, options.progress)}"]


def coco_step(root: Path, options: PrepareOptions) -> list[str]:
    out = options.out or "masks"
    reports = prepare_coco(root, options.splits, out, options.overwrite, options.progress)
    return [f"coco {split}: {report} in {root / out}" for split, report in reports.items()]


def ade20k_step(root: Path, options: PrepareOptions) -> list[str]:
    out = options.out or "annotations_mapped"
    reports = prepare_ade20k(root, out, options.overwrite, options.progress)
    return [f"ade20k {split}: {report} in {root / out / split}" for split, report in reports.items()]
