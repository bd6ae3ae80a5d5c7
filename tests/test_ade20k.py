"""ADE20K (ADEChallengeData2016): the 0 -> 255, k -> k - 1 mapping, `dssn prepare ade20k`,
`dssn splits ade20k`, the dataset's masks and one training step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_fixtures import H, W, ade20k_raw_labels, make_ade20k_raw, tiny_config
from dssn.cli import main
from dssn.data import DataError, build_train_datasets, build_val_dataset, class_names_for, decoder_for, palette_for
from dssn.data.ade20k import ADE20K_CLASSES, ADE20K_PALETTE, Ade20kDecoder, ade20k_class_ids
from dssn.data.datasets import MaskError, load_split
from dssn.data.prepare import prepare_ade20k
from dssn.engine.trainer import train

ADE = ["data.dataset=ade20k", "data.num_classes=150"]


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    threads = torch.get_num_threads()  # the tiny configs set train.threads=1, a process-wide setting
    yield
    torch.set_num_threads(threads)


def _splits(root: Path, *options: str) -> list[str]:
    out = root / "splits" / "x"
    assert main(["splits", "ade20k", str(root), "--labeled", "2", "--out", str(out), *options]) == 0
    return [f"data.labeled_split={out}/labeled.txt", f"data.unlabeled_split={out}/unlabeled.txt",
            f"data.val_split={out}/val.txt"]


def test_mapping_by_hand():
    raw = np.array([[0, 1, 2, 3], [75, 149, 150, 0]], dtype=np.uint8)
    expected = [[255, 0, 1, 2], [74, 148, 149, 255]]
    assert ade20k_class_ids(raw).tolist() == expected and ade20k_class_ids(raw).dtype == np.uint8
    assert ade20k_class_ids(raw.astype(np.uint16)).tolist() == expected  # 16-bit PNGs read the same
    assert Ade20kDecoder().decode(Image.fromarray(raw, "L")).tolist() == expected
    assert len(ADE20K_CLASSES) == len(ADE20K_PALETTE) == 150
    assert (ADE20K_CLASSES[0], ADE20K_CLASSES[12], ADE20K_CLASSES[149]) == ("wall", "person", "flag")
    assert (ADE20K_PALETTE[0], ADE20K_PALETTE[149]) == ((120, 120, 120), (92, 0, 255))


def test_values_above_150_are_errors_naming_value_and_file(tmp_path: Path):
    with pytest.raises(MaskError, match=r"value\(s\) 151, 200 in 3 pixel\(s\).*0 \(other\) and 1..150"):
        ade20k_class_ids(np.array([[0, 151, 200, 200]], dtype=np.uint8))
    with pytest.raises(MaskError, match=r"value\(s\) 255 .*data.ade20k_masks=mapped"):
        ade20k_class_ids(np.array([[3, 255]], dtype=np.uint8))  # already-mapped masks are not read as raw
    with pytest.raises(MaskError, match="single-channel"):
        Ade20kDecoder().decode(Image.new("RGB", (2, 2)))

    root = make_ade20k_raw(tmp_path / "ADEChallengeData2016", n_train=3, n_val=2)
    bad = root / "annotations/validation/ADE_val_00000002.png"
    labels = ade20k_raw_labels(7)
    labels[5, 5] = 151
    Image.fromarray(labels, "L").save(bad)
    cfg = tiny_config("pascal", root, tmp_path / "run", *ADE, *_splits(root))
    val = build_val_dataset(cfg)
    with pytest.raises(MaskError, match=r"val.txt, line 2: mask annotations/validation/ADE_val_00000002.png: "
                                        r"value\(s\) 151 in 1 pixel\(s\)"):
        val[1]
    with pytest.raises(MaskError, match=rf"{bad}: value\(s\) 151 in 1 pixel\(s\)"):
        prepare_ade20k(root, progress=False)
    # Everything before the bad file was written completely; a rerun after fixing it resumes.
    Image.fromarray(ade20k_raw_labels(7), "L").save(bad)
    reports = prepare_ade20k(root, progress=False)
    assert (reports["training"].written, reports["training"].skipped) == (0, 3)
    assert (reports["validation"].written, reports["validation"].skipped) == (1, 1)


def test_prepare_is_resumable_and_never_overwrites(tmp_path: Path):
    root = make_ade20k_raw(tmp_path, n_train=3, n_val=2)
    first = prepare_ade20k(root, progress=False)
    assert {k: (r.written, r.skipped) for k, r in first.items()} == {"training": (3, 0), "validation": (2, 0)}
    out = root / "annotations_mapped/training/ADE_train_00000002.png"
    raw = np.asarray(Image.open(root / "annotations/training/ADE_train_00000002.png"))
    mapped = np.asarray(Image.open(out))
    assert mapped.tolist() == np.where(raw == 0, 255, raw.astype(int) - 1).tolist()
    assert mapped[0, :3].tolist() == [255, 0, 149]
    assert not list(root.rglob("*.tmp"))  # written through temporary files, none left behind

    Image.new("L", (W, H), 7).save(out)  # a user's edit survives a rerun
    (root / "annotations_mapped/validation/ADE_val_00000001.png").unlink()  # as if interrupted
    again = prepare_ade20k(root, progress=False)
    assert {k: (r.written, r.skipped) for k, r in again.items()} == {"training": (0, 3), "validation": (1, 1)}
    assert np.asarray(Image.open(out)).max() == 7
    assert prepare_ade20k(root, overwrite=True, progress=False)["training"].written == 3
    assert np.asarray(Image.open(out)).tolist() == mapped.tolist()
    with pytest.raises(DataError, match="official annotations' folder"):
        prepare_ade20k(root, out="annotations", overwrite=True, progress=False)


def test_prepare_cli_and_missing_annotations(tmp_path: Path, capsys):
    assert main(["prepare", "ade20k", str(tmp_path), "--quiet"]) == 2
    assert "no annotations/{training,validation}/*.png" in capsys.readouterr().err
    root = make_ade20k_raw(tmp_path / "ade", n_train=2, n_val=1)
    assert main(["prepare", "ade20k", str(root), "--quiet", "--out", "mine"]) == 0
    assert "ade20k training: 2 written, 0 already there" in capsys.readouterr().out
    assert sorted(p.name for p in (root / "mine/validation").iterdir()) == ["ADE_val_00000001.png"]


def test_splits_and_dataset_yield_mapped_masks(tmp_path: Path):
    root = make_ade20k_raw(tmp_path / "ADEChallengeData2016", n_train=4, n_val=2)
    overrides = _splits(root)
    val_lines = (root / "splits/x/val.txt").read_text().splitlines()
    assert val_lines == [f"images/validation/ADE_val_0000000{i}.jpg annotations/validation/ADE_val_0000000{i}.png"
                         for i in (1, 2)]
    labeled = load_split(root / "splits/x/labeled.txt").entries
    assert len(labeled) == 2 and all(e.image.startswith("images/training/ADE_train_") for e in labeled)
    assert all(e.mask == e.image.replace("images/", "annotations/").replace(".jpg", ".png") for e in labeled)

    cfg = tiny_config("pascal", root, tmp_path / "run", *ADE, *overrides)
    assert class_names_for(cfg)[0] == "wall" and palette_for(cfg)[:6] == [120, 120, 120, 180, 120, 120]
    assert isinstance(decoder_for(cfg), Ade20kDecoder)
    _, mask, name = build_val_dataset(cfg)[0]
    raw = ade20k_raw_labels(100)
    assert name == "images/validation/ADE_val_00000001.jpg"
    assert mask.tolist() == np.where(raw == 0, 255, raw.astype(int) - 1).tolist()
    labeled_set, _ = build_train_datasets(cfg)
    _, crop_mask = labeled_set[0]
    assert crop_mask.max() <= 255 and set(crop_mask.unique().tolist()) <= set(range(150)) | {255}

    # Prepared masks, listed in the split files and read with ade20k_masks=mapped, give the same.
    prepare_ade20k(root, progress=False)
    val = root / "splits/x/val_mapped.txt"
    val.write_text("".join(line.replace(" annotations/", " annotations_mapped/") + "\n" for line in val_lines))
    mapped_cfg = tiny_config("pascal", root, tmp_path / "run", *ADE, *overrides, f"data.val_split={val}",
                             "data.ade20k_masks=mapped")
    assert torch.equal(build_val_dataset(mapped_cfg)[0][1], mask)


def test_ade20k_needs_150_classes(tmp_path: Path):
    root = make_ade20k_raw(tmp_path, n_train=2, n_val=1)
    cfg = tiny_config("pascal", root, tmp_path / "run", "data.dataset=ade20k", *_splits(root))
    with pytest.raises(DataError, match="ade20k class list has 150 classes but data.num_classes is 21"):
        decoder_for(cfg)


def test_ade20k_trains_one_step(tmp_path: Path):
    root = make_ade20k_raw(tmp_path / "ADEChallengeData2016")
    result = train(tiny_config("pascal", root, tmp_path / "run", *ADE, *_splits(root), "train.report=false"))
    assert result.iters == 1 and (tmp_path / "run" / "last.pt").is_file()
