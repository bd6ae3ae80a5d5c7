"""Real layouts (PASCAL VOC, Cityscapes, COCO, folder): prepare, splits, one training step each."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_fixtures import (
    H,
    W,
    make_cityscapes_raw,
    make_coco_raw,
    make_folder,
    make_voc,
    tiny_config,
    write_image,
)
from dssn.cli import main
from dssn.data import COCO_CATEGORY_IDS, COCO_CLASSES, DataError, build_train_datasets, build_val_dataset
from dssn.data.datasets import MaskDecoder, MaskError, load_split, parse_split, to_rgb
from dssn.data.layouts import load_folder_meta, scan_pool
from dssn.data.prepare import CITYSCAPES_TRAIN_IDS, label_ids_to_train_ids, prepare_cityscapes, prepare_coco
from dssn.data.splits import make_splits, parse_amount
from dssn.engine.trainer import train

REFERENCE_SPLITS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "splits"

# The Cityscapes label table as published (labelId -> trainId, 255 = ignore), written
# out independently of dssn's own table.
PUBLISHED_TRAIN_IDS = {
    0: 255, 1: 255, 2: 255, 3: 255, 4: 255, 5: 255, 6: 255, 7: 0, 8: 1, 9: 255, 10: 255, 11: 2, 12: 3, 13: 4,
    14: 255, 15: 255, 16: 255, 17: 5, 18: 255, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
    27: 14, 28: 15, 29: 255, 30: 255, 31: 16, 32: 17, 33: 18,
}

# pycocotools (as of 2.0.11) trips a NumPy 2 deprecation inside its RLE decoding
coco_warnings = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    threads = torch.get_num_threads()  # the tiny configs set train.threads=1, a process-wide setting
    yield
    torch.set_num_threads(threads)


def _train_one_step(preset: str, root: Path, tmp_path: Path, *extra: str) -> None:
    result = train(tiny_config(preset, root, tmp_path / "run", *extra))
    assert result.iters == 1
    assert (tmp_path / "run" / "last.pt").is_file()


def _splits(dataset: str, root: Path, *options: str) -> list[str]:
    assert main(["splits", dataset, str(root), *options]) == 0
    out = root / "splits" / "x"
    return [f"data.labeled_split={out}/labeled.txt", f"data.unlabeled_split={out}/unlabeled.txt",
            f"data.val_split={out}/val.txt"]


# --------------------------------------------------------------------------- one step per layout


def test_pascal_trains_one_step(tmp_path: Path):
    root = make_voc(tmp_path / "VOC2012")
    overrides = _splits("pascal", root, "--labeled", "2", "--out", str(root / "splits" / "x"))
    assert len(load_split(root / "splits" / "x" / "val.txt").entries) == 2  # the official val list
    _train_one_step("pascal", root, tmp_path, *overrides)


def test_cityscapes_prepare_then_train_one_step(tmp_path: Path):
    root = make_cityscapes_raw(tmp_path / "cityscapes")
    assert main(["prepare", "cityscapes", str(root), "--quiet"]) == 0
    overrides = _splits("cityscapes", root, "--labeled", "1/2", "--out", str(root / "splits" / "x"))
    _train_one_step("cityscapes", root, tmp_path, *overrides, "train.ohem_min_kept=10")


@coco_warnings
def test_coco_prepare_then_train_one_step(tmp_path: Path):
    pytest.importorskip("pycocotools")
    root = make_coco_raw(tmp_path / "coco")
    assert main(["prepare", "coco", str(root), "--quiet"]) == 0
    overrides = _splits("coco", root, "--labeled", "2", "--out", str(root / "splits" / "x"))
    _train_one_step("coco", root, tmp_path, *overrides)


@pytest.mark.parametrize("kind", ["index", "colour", "binary"])
def test_folder_trains_one_step_without_split_files(tmp_path: Path, kind: str):
    root = make_folder(tmp_path / "mine", colour=kind == "colour", binary=kind == "binary")
    classes = 2 if kind == "binary" else 3
    _train_one_step("folder", root, tmp_path, f"data.num_classes={classes}")


# --------------------------------------------------------------------------- folder format


def test_folder_lists_labeled_unlabeled_and_val(tmp_path: Path):
    root = make_folder(tmp_path / "mine")
    cfg = tiny_config("folder", root, tmp_path / "run", "data.num_classes=3")
    labeled, unlabeled = build_train_datasets(cfg)
    assert [e.image for e in labeled.entries] == ["images/img0.png", "images/img1.png", "images/img2.png"]
    assert [e.mask for e in unlabeled.entries] == [None] * 4
    val = build_val_dataset(cfg)
    image, mask, name = val[0]
    assert name == "val/images/v0.jpg" and image.shape == (3, H, W) and mask.max() <= 255


def test_folder_class_count_must_match(tmp_path: Path):
    root = make_folder(tmp_path / "mine")
    with pytest.raises(DataError, match=r"dataset.yaml.*3 classes.*data.num_classes is 2; set data.num_classes=3"):
        train(tiny_config("folder", root, tmp_path / "run"))


def test_folder_meta_errors_name_the_key(tmp_path: Path):
    meta = tmp_path / "dataset.yaml"
    meta.write_text("classes: [a, b]\nvalues: {0: 0, 255: 7}\n")
    with pytest.raises(DataError, match=r"dataset.yaml: key 'values': 255: 7 is not a class id 0..1 or 255"):
        load_folder_meta(meta)
    meta.write_text("classes: [a, b]\npalete: [[0, 0, 0], [1, 1, 1]]\n")
    with pytest.raises(DataError, match=r"unknown key 'palete'; did you mean 'palette'"):
        load_folder_meta(meta)


def test_rgb_masks_convert_through_the_palette():
    decoder = MaskDecoder(3, palette=[(0, 0, 0), (128, 64, 128), (0, 128, 0)], ignore_color=(255, 255, 255))
    rgb = np.array([[[0, 0, 0], [128, 64, 128]], [[0, 128, 0], [255, 255, 255]]], dtype=np.uint8)
    assert decoder.decode(Image.fromarray(rgb, "RGB")).tolist() == [[0, 1], [2, 255]]
    rgba = np.concatenate([rgb, np.full((2, 2, 1), 255, np.uint8)], axis=2)
    assert decoder.decode(Image.fromarray(rgba, "RGBA")).tolist() == [[0, 1], [2, 255]]


def test_value_map_and_index_masks():
    binary = MaskDecoder(2, value_map={0: 0, 255: 1})
    assert binary.decode(Image.fromarray(np.array([[0, 255]], np.uint8), "L")).tolist() == [[0, 1]]
    index = MaskDecoder(3)
    assert index.decode(Image.fromarray(np.array([[0, 2, 255]], np.uint8), "L")).tolist() == [[0, 2, 255]]
    sixteen = Image.fromarray(np.array([[0, 2, 255]], np.uint16))
    assert index.decode(sixteen).tolist() == [[0, 2, 255]]
    with pytest.raises(MaskError, match="unknown mask value"):
        index.decode(Image.fromarray(np.array([[0, 300]], np.uint16)))


def test_grayscale_and_16_bit_images_load_as_rgb():
    gray = to_rgb(Image.fromarray(np.full((2, 3), 90, np.uint8), "L"))
    assert gray.mode == "RGB" and np.asarray(gray)[0, 0].tolist() == [90, 90, 90]
    deep = to_rgb(Image.fromarray(np.array([[0, 65535, 32896]], np.uint16)))
    assert deep.mode == "RGB" and np.asarray(deep)[0, :, 0].tolist() == [0, 255, 128]


# --------------------------------------------------------------------------- prepare


def test_cityscapes_table_matches_the_published_ids():
    assert dict(enumerate(CITYSCAPES_TRAIN_IDS)) == PUBLISHED_TRAIN_IDS
    ids = np.arange(256, dtype=np.uint8).reshape(16, 16)
    converted = label_ids_to_train_ids(ids).ravel().tolist()
    assert converted[:34] == [PUBLISHED_TRAIN_IDS[i] for i in range(34)] and set(converted[34:]) == {255}
    assert sorted(set(CITYSCAPES_TRAIN_IDS) - {255}) == list(range(19))


def test_cityscapes_table_matches_cityscapesscripts_when_installed():
    labels = pytest.importorskip("cityscapesscripts.helpers.labels")
    official = {label.id: (255 if label.trainId in (-1, 255) else label.trainId)
                for label in labels.labels if label.id >= 0}
    assert dict(enumerate(CITYSCAPES_TRAIN_IDS)) == official


def test_prepare_cityscapes_is_resumable_and_never_overwrites(tmp_path: Path):
    root = make_cityscapes_raw(tmp_path, {"train": 2})
    first = prepare_cityscapes(root, progress=False)
    assert (first.written, first.skipped) == (2, 0)
    out = root / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png"
    raw = np.asarray(Image.open(str(out).replace("labelTrainIds", "labelIds")))
    assert np.asarray(Image.open(out)).tolist() == label_ids_to_train_ids(raw).tolist()
    Image.new("L", (W, H), 7).save(out)  # a user's edit must survive a rerun
    again = prepare_cityscapes(root, progress=False)
    assert (again.written, again.skipped) == (0, 2) and np.asarray(Image.open(out)).max() == 7
    assert prepare_cityscapes(root, overwrite=True, progress=False).written == 2
    assert np.asarray(Image.open(out)).tolist() == label_ids_to_train_ids(raw).tolist()


@coco_warnings
def test_prepare_coco_masks_use_the_81_class_mapping(tmp_path: Path):
    pytest.importorskip("pycocotools")
    assert len(COCO_CLASSES) == 81 and len(COCO_CATEGORY_IDS) == 80
    assert (COCO_CLASSES[1], COCO_CLASSES[80], COCO_CLASSES[COCO_CATEGORY_IDS.index(44) + 1]) == (
        "person", "toothbrush", "bottle")
    root = make_coco_raw(tmp_path, n_train=1, n_val=1)
    reports = prepare_coco(root, progress=False)
    assert reports["train2017"].written == 1
    mask = np.asarray(Image.open(root / "masks/000000000001.png"))
    assert mask.shape == (H, W) and mask[0, 0] == 0
    assert mask[4, 4] == 1 and mask[8, 8] == 80  # person (id 1) -> 1; toothbrush (id 90) -> 80, on top
    assert prepare_coco(root, progress=False)["val2017"].skipped == 1


@coco_warnings
def test_prepare_coco_rejects_other_categories(tmp_path: Path):
    pytest.importorskip("pycocotools")
    root = make_coco_raw(tmp_path, n_train=1, n_val=0)
    path = root / "annotations/instances_train2017.json"
    path.write_text(path.read_text().replace('"id": 90,', '"id": 91,'))
    with pytest.raises(DataError, match=r"not COCO's 80 \(unexpected ids \[91\], missing ids \[90\]\)"):
        prepare_coco(root, splits=("train2017",), progress=False)


# --------------------------------------------------------------------------- splits


def test_splits_are_reproducible_and_keep_val_out_of_training(tmp_path: Path):
    root = make_folder(tmp_path / "mine", n_labeled=20, n_unlabeled=3, n_val=0)
    pool = scan_pool("folder", root, load_folder_meta(root / "dataset.yaml"))
    plan = make_splits(pool, parse_amount("1/4"), parse_amount("20%"), seed=3)
    assert (len(plan.val), len(plan.labeled), len(plan.unlabeled)) == (4, 4, 12 + 3)
    training = {image for image, _ in plan.labeled + plan.unlabeled}
    assert not training & {image for image, _ in plan.val}
    assert make_splits(pool, parse_amount("1/4"), parse_amount("20%"), seed=3) == plan
    assert make_splits(pool, parse_amount("1/4"), parse_amount("20%"), seed=4).labeled != plan.labeled
    with pytest.raises(DataError, match="no official validation set"):
        make_splits(pool, 2)
    with pytest.raises(DataError, match="asked for 99 labeled images but only 16"):
        make_splits(pool, 99, 4)


def test_splits_cli_writes_authors_format_and_refuses_to_overwrite(tmp_path: Path, capsys):
    root = make_voc(tmp_path / "VOC2012")
    assert main(["splits", "pascal", str(root), "--labeled", "3"]) == 0
    out = root / "splits" / "3"
    lines = (out / "labeled.txt").read_text().splitlines()
    assert len(lines) == 3 and all(line.startswith("JPEGImages/") and " SegmentationClass/" in line for line in lines)
    assert "dssn train pascal" in capsys.readouterr().out
    before = (out / "labeled.txt").read_text()
    assert main(["splits", "pascal", str(root), "--labeled", "3", "--seed", "9"]) == 2
    assert "already exist" in capsys.readouterr().err and (out / "labeled.txt").read_text() == before
    assert main(["splits", "pascal", str(root), "--labeled", "3", "--seed", "9", "--overwrite"]) == 0


@pytest.mark.skipif(not REFERENCE_SPLITS.is_dir(), reason="reference splits not available")
def test_every_reference_split_file_parses():
    files = sorted(REFERENCE_SPLITS.rglob("*.txt"))
    assert len(files) >= 8
    for path in files:
        split, problems = parse_split(path)
        assert not problems and len(split.entries) > 80
        assert all(entry.mask is not None for entry in split.entries)


def test_split_files_outside_root_and_image_only_lines(tmp_path: Path):
    root = make_voc(tmp_path / "VOC2012")
    unlabeled = tmp_path / "u.txt"
    unlabeled.write_text("".join(f"JPEGImages/2007_{i:06d}.jpg\n" for i in range(4)))
    write_image(root / "JPEGImages" / "extra.jpg", 99)
    cfg = tiny_config("pascal", root, tmp_path / "run", f"data.unlabeled_split={unlabeled}",
                      "data.labeled_split=ImageSets/l.txt", "data.val_split=ImageSets/l.txt")
    (root / "ImageSets" / "l.txt").write_text("JPEGImages/2007_000005.jpg SegmentationClass/2007_000005.png\n"
                                              "JPEGImages/2007_000006.jpg SegmentationClass/2007_000006.png\n")
    labeled, unlabeled_ds = build_train_datasets(cfg)
    assert len(unlabeled_ds) == 4 and len(labeled) == 4  # labeled repeated to the unlabeled length


def test_prepare_coco_without_pycocotools_says_what_to_install(tmp_path: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)  # makes the import fail
    with pytest.raises(DataError, match=r"needs pycocotools: pip install 'dssn\[coco\]'"):
        prepare_coco(tmp_path, progress=False)
