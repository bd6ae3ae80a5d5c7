"""`dssn check-data` and the fast check before training: one test per kind of bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_fixtures import H, W, make_folder, make_voc, tiny_config, write_image, write_index_mask
from dssn.cli import main
from dssn.data import DataError, build_val_dataset
from dssn.data.check import check_full
from dssn.engine.trainer import train


@pytest.fixture()
def voc(tmp_path: Path) -> Path:
    root = make_voc(tmp_path / "VOC2012", n_train=4, n_val=2)
    splits = root / "splits"
    splits.mkdir()
    pair = "JPEGImages/2007_{0:06d}.jpg SegmentationClass/2007_{0:06d}.png\n"
    (splits / "labeled.txt").write_text(pair.format(0) + pair.format(1))
    (splits / "unlabeled.txt").write_text(pair.format(2) + pair.format(3))
    (splits / "val.txt").write_text(pair.format(4) + pair.format(5))
    return root


def _config(root: Path, tmp_path: Path, *extra: str):
    return tiny_config("pascal", root, tmp_path / "run", "data.labeled_split=splits/labeled.txt",
                       "data.unlabeled_split=splits/unlabeled.txt", "data.val_split=splits/val.txt", *extra)


def _check_data_cli(root: Path, tmp_path: Path, capsys, *extra: str) -> tuple[int, str]:
    code = main(["check-data", "pascal", f"data.root={root}", "data.labeled_split=splits/labeled.txt",
                 "data.unlabeled_split=splits/unlabeled.txt", "data.val_split=splits/val.txt",
                 "--plot", str(tmp_path / "freq.png"), "--quiet", *extra])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _only_problem(root: Path, tmp_path: Path, *extra: str) -> str:
    problems = check_full(_config(root, tmp_path, *extra)).problems
    assert len(problems) == 1, problems
    return str(problems[0])


def _val_error(root: Path, tmp_path: Path, index: int) -> str:
    with pytest.raises(DataError) as info:
        build_val_dataset(_config(root, tmp_path))[index]
    return str(info.value)


def test_clean_data_reports_counts_frequencies_and_a_plot(voc: Path, tmp_path: Path, capsys):
    code, out = _check_data_cli(voc, tmp_path, capsys)
    assert code == 0 and "no problems found" in out
    assert "labeled" in out and "aeroplane" in out and "ignore (255)" in out
    assert Image.open(tmp_path / "freq.png").size[0] > 100
    report = check_full(_config(voc, tmp_path))
    assert report.pixel_counts["labeled"].sum() == 2 * W * H
    assert report.class_share("val").sum() == pytest.approx(1.0)


def test_missing_file(voc: Path, tmp_path: Path, capsys):
    (voc / "SegmentationClass" / "2007_000001.png").unlink()
    problem = _only_problem(voc, tmp_path)
    assert problem.startswith(f"{voc / 'splits' / 'labeled.txt'}, line 2: mask SegmentationClass/2007_000001.png: "
                              "not found")
    with pytest.raises(DataError) as info:  # train stops first, with the same words, before any run folder
        train(_config(voc, tmp_path))
    assert problem in str(info.value) and "nothing was trained" in str(info.value)
    assert not (tmp_path / "run").exists()
    code, out = _check_data_cli(voc, tmp_path, capsys)
    assert code == 1 and "1 problem(s)" in out and problem in out


def test_undecodable_file(voc: Path, tmp_path: Path):
    (voc / "JPEGImages" / "2007_000004.jpg").write_bytes(b"not a jpeg at all")
    problem = _only_problem(voc, tmp_path)
    assert problem.startswith(f"{voc / 'splits' / 'val.txt'}, line 1: image JPEGImages/2007_000004.jpg: "
                              "cannot be decoded")
    assert problem in _val_error(voc, tmp_path, 0)


def test_size_mismatch(voc: Path, tmp_path: Path):
    write_image(voc / "JPEGImages" / "2007_000005.jpg", 5, size=(W + 2, H))
    problem = _only_problem(voc, tmp_path)
    assert problem == (f"{voc / 'splits' / 'val.txt'}, line 2: image JPEGImages/2007_000005.jpg is {W + 2}x{H} "
                       f"but mask SegmentationClass/2007_000005.png is {W}x{H} (width x height)")
    assert problem in _val_error(voc, tmp_path, 1)


def test_unknown_mask_value(voc: Path, tmp_path: Path):
    labels = np.zeros((H, W), np.uint8)
    labels[3, 3], labels[4, 4] = 21, 200
    write_index_mask(voc / "SegmentationClass" / "2007_000004.png", labels)
    problem = _only_problem(voc, tmp_path)
    assert problem == (f"{voc / 'splits' / 'val.txt'}, line 1: mask SegmentationClass/2007_000004.png: unknown mask "
                       "value(s) 21, 200 (classes are 0..20, 255 = ignore); data.num_classes is 21")
    assert problem in _val_error(voc, tmp_path, 0)


def test_unknown_rgb_colour(tmp_path: Path):
    root = make_folder(tmp_path / "mine", colour=True)
    mask = np.asarray(Image.open(root / "masks" / "img2.png")).copy()
    mask[5, 5] = (1, 2, 3)
    Image.fromarray(mask, "RGB").save(root / "masks" / "img2.png")
    cfg = tiny_config("folder", root, tmp_path / "run", "data.num_classes=3")
    problems = check_full(cfg).problems
    assert [str(p) for p in problems] == [
        f"{root / 'images'} (images with a mask): mask masks/img2.png: unknown colour (1, 2, 3) in 1 pixels: "
        f"not in the palette; the classes are declared in {root / 'dataset.yaml'}"]


def test_malformed_split_line(voc: Path, tmp_path: Path, capsys):
    with (voc / "splits" / "unlabeled.txt").open("a") as f:
        f.write("JPEGImages/a b.jpg SegmentationClass/a.png\n")
    problem = _only_problem(voc, tmp_path)
    assert problem.startswith(f"{voc / 'splits' / 'unlabeled.txt'}, line 3: expected 'image_path [mask_path]'")
    with pytest.raises(DataError, match="line 3: expected 'image_path"):
        train(_config(voc, tmp_path))


def test_missing_root(tmp_path: Path, capsys):
    code, out = _check_data_cli(tmp_path / "nowhere", tmp_path, capsys)
    assert code == 2 and f"data root '{tmp_path / 'nowhere'}' does not exist (data.root)" in out
    with pytest.raises(DataError, match=r"nowhere.*does not exist \(data\.root\)"):
        train(_config(tmp_path / "nowhere", tmp_path))


def test_missing_split_file_and_val_image_in_training(voc: Path, tmp_path: Path):
    (voc / "splits" / "unlabeled.txt").write_text("JPEGImages/2007_000004.jpg\n")
    (voc / "splits" / "labeled.txt").unlink()
    problems = [str(p) for p in check_full(_config(voc, tmp_path)).problems]
    assert problems == [
        f"{voc / 'splits' / 'labeled.txt'}: split file not found (data.labeled_split; relative paths are under "
        "data.root)",
        f"{voc / 'splits' / 'unlabeled.txt'}, line 1: image JPEGImages/2007_000004.jpg is also in the validation "
        "split: a validation image must never be used for training"]


def test_binary_masks_without_a_value_map_get_a_hint(tmp_path: Path, capsys):
    root = make_folder(tmp_path / "mine", binary=True)
    (root / "dataset.yaml").write_text("classes: [background, thing]\nval_images: val/images\nval_masks: val/masks\n")
    code = main(["check-data", "folder", f"data.root={root}", "data.num_classes=2", "--plot", "none", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and "values: {0: 0, 255: 1}" in out


def test_fast_mode_decodes_nothing(voc: Path, tmp_path: Path, capsys):
    (voc / "JPEGImages" / "2007_000004.jpg").write_bytes(b"broken, but --fast does not look inside")
    code, out = _check_data_cli(voc, tmp_path, capsys, "--fast")
    assert code == 0 and "no problems found" in out and not (tmp_path / "freq.png").exists()
