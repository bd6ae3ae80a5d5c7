"""Tests for the glyph-sign task generator (dssn.apps.glyphs), the dataset of `dssn demo --task glyphs`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dssn.apps import glyphs
from dssn.apps.glyphs import (CLASS_NAMES, GENERATOR_VERSION, GlyphDataError, make_glyphs, render_sample,
                              resolve_glyphs)
from dssn.config import load_config
from dssn.constants import IGNORE
from dssn.data import build_val_dataset, class_names_for
from dssn.errors import DssnError

TINY = {"num_train": 16, "num_val": 4, "size": 48, "labeled_fraction": 0.25}
# Digest of every generated file for seed 0 and TINY. Any change means the images, masks
# or splits changed: bump GENERATOR_VERSION and update it.
REFERENCE_DIGEST = "232e53829e220b097cf2e9397fee7abdb7218c40f61e52f222855cc9468cc842"


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.suffix in {".jpg", ".png", ".txt"}}


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for name, content in _files(root).items():
        h.update(name.encode() + b"\0" + content)
    return h.hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_glyphs(tmp_path_factory.mktemp("glyphs"), seed=0, **TINY)


def test_segment_distance_by_hand() -> None:
    xx = np.array([[0.0, 2.0, 5.0, -3.0]], dtype=np.float32)
    yy = np.array([[1.0, 0.0, 4.0, 0.0]], dtype=np.float32)
    a, b = np.array([0.0, 0.0]), np.array([2.0, 0.0])
    # Above the segment's start, on its end, beyond its end (3-4-5), before its start.
    np.testing.assert_allclose(glyphs._segment_distance(xx, yy, a, b), [[1.0, 0.0, 5.0, 3.0]], atol=1e-6)


def test_outer_band_is_the_ring_of_four_neighbours() -> None:
    mask = np.zeros((5, 5), dtype=bool)
    mask[2, 2] = True
    band = glyphs._outer_band(mask)
    assert sorted(zip(*np.nonzero(band))) == [(1, 2), (2, 1), (2, 3), (3, 2)]


def test_render_sample_values_and_signs() -> None:
    for index in range(20):
        image, mask = render_sample(np.random.default_rng([7, 0, index]), 64)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert mask.shape == (64, 64) and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= set(range(len(CLASS_NAMES))) | {IGNORE}
        # Every image has at least one sign, and only the outline band is ignored.
        assert (mask != IGNORE).any() and ((mask > 0) & (mask != IGNORE)).any()
        assert (mask == IGNORE).mean() < 0.2


def test_classes_are_balanced_as_documented() -> None:
    """Each sign's digit is uniform over the four classes: sign pixel shares near 1/4."""
    counts = np.zeros(256, dtype=np.int64)
    for index in range(300):
        counts += np.bincount(render_sample(np.random.default_rng([0, 0, index]), 32)[1].ravel(), minlength=256)
    shares = counts[1:len(CLASS_NAMES)] / counts[1:len(CLASS_NAMES)].sum()
    # 300 images hold about 550 signs; a class's share of ~140 signs of varied size moves by ~0.03.
    np.testing.assert_allclose(shares, 1 / 4, atol=0.06)


def test_deterministic_per_seed(tiny: Path, tmp_path: Path) -> None:
    again = make_glyphs(tmp_path / "again", seed=0, **TINY)
    other = make_glyphs(tmp_path / "other", seed=1, **TINY)
    assert _files(again) == _files(tiny)
    differing = [k for k, v in _files(other).items() if k.endswith(".png") and v != _files(tiny)[k]]
    assert len(differing) >= 0.9 * (TINY["num_train"] + TINY["num_val"])


def test_files_match_the_versions_reference(tiny: Path) -> None:
    assert GENERATOR_VERSION == 4
    assert _digest(tiny) == REFERENCE_DIGEST, "the generator's output changed: bump GENERATOR_VERSION"


def test_layout_and_manifest(tiny: Path) -> None:
    split = {name: (tiny / "splits" / name).read_text().splitlines()
             for name in ("1_4/labeled.txt", "1_4/unlabeled.txt", "full/labeled.txt", "val.txt")}
    assert [len(v) for v in split.values()] == [4, 12, 16, 4]
    assert set(split["1_4/labeled.txt"]).isdisjoint(split["1_4/unlabeled.txt"])
    assert set(split["1_4/labeled.txt"]) | set(split["1_4/unlabeled.txt"]) == set(split["full/labeled.txt"])
    manifest = json.loads((tiny / "dataset.json").read_text())
    assert manifest["version"] == GENERATOR_VERSION and manifest["class_names"] == list(CLASS_NAMES)
    # The manifest's pixel counts are the training masks' own.
    counts = np.zeros(256, dtype=np.int64)
    for line in split["full/labeled.txt"]:
        with Image.open(tiny / line.split()[1]) as mask:
            counts += np.bincount(np.asarray(mask).ravel(), minlength=256)
    assert manifest["train_pixel_counts"] == {n: int(counts[i]) for i, n in enumerate(CLASS_NAMES)}


def test_cache_is_keyed_by_version(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert tiny.name == f"glyphs-v{GENERATOR_VERSION}-48px-train16-val4-1_4-seed0"
    assert make_glyphs(tiny.parent, seed=0, **TINY) == tiny  # reused
    monkeypatch.setattr(glyphs, "GENERATOR_VERSION", GENERATOR_VERSION + 1)
    newer = make_glyphs(tiny.parent, seed=0, **TINY)
    assert newer != tiny and newer.name.startswith(f"glyphs-v{GENERATOR_VERSION + 1}-")
    assert json.loads((newer / "dataset.json").read_text())["version"] == GENERATOR_VERSION + 1
    assert not [p for p in tiny.parent.iterdir() if p.name.endswith(".tmp")]


def test_a_foreign_folder_under_the_key_is_not_written_into(tmp_path: Path) -> None:
    key = f"glyphs-v{GENERATOR_VERSION}-48px-train16-val4-1_4-seed0"
    (tmp_path / key).mkdir()
    (tmp_path / key / "notes.txt").write_text("mine")
    with pytest.raises(GlyphDataError, match=key) as error:
        make_glyphs(tmp_path, seed=0, **TINY)
    assert isinstance(error.value, DssnError)
    assert (tmp_path / key / "notes.txt").read_text() == "mine"


def test_the_glyphs_preset_reads_it(tiny: Path) -> None:
    """data.dataset=glyphs (the glyphs preset) and the pascal loader with the class names read the same masks."""
    names = "[" + ",".join(CLASS_NAMES) + "]"
    with Image.open(tiny / "SegmentationClass" / "val_00000.png") as mask:
        expected = np.asarray(mask)
    for cfg in (load_config("glyphs", [f"data.root={tiny}"]),
                load_config("synthetic", ["data.dataset=pascal", f"data.root={tiny}",
                                          f"data.num_classes={len(CLASS_NAMES)}", f"data.class_names={names}"])):
        assert class_names_for(cfg) == list(CLASS_NAMES)
        val = build_val_dataset(cfg)
        assert len(val) == TINY["num_val"]
        sample = val[0]
        target = next(v for v in (sample if isinstance(sample, (tuple, list)) else sample.values())
                      if hasattr(v, "shape") and tuple(v.shape) == expected.shape)
        np.testing.assert_array_equal(np.asarray(target), expected)


def test_resolve_glyphs_keeps_a_dataset_and_refuses_another_version(tiny: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_glyphs(tiny) == tiny
    called = []
    monkeypatch.setattr(glyphs, "make_glyphs", lambda root, progress: called.append(root) or root / "made")
    assert resolve_glyphs(tmp_path) == tmp_path / "made" and called == [tmp_path]  # no dataset: the default
    old = tmp_path / "old"
    old.mkdir()
    manifest = json.loads((tiny / "dataset.json").read_text())
    (old / "dataset.json").write_text(json.dumps({**manifest, "version": GENERATOR_VERSION - 1}))
    with pytest.raises(GlyphDataError, match=f"version {GENERATOR_VERSION - 1}.*data.root"):
        resolve_glyphs(old)
