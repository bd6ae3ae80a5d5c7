"""Tests for the built-in synthetic dataset (dssn.apps.synthetic)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dssn.config import load_config
from dssn.constants import IGNORE
from dssn.apps import synthetic
from dssn.apps.synthetic import (
    CLASS_NAMES,
    GENERATOR_VERSION,
    NUM_CLASSES,
    class_frequencies,
    make_synthetic,
    render_sample,
    resolve_synthetic,
)
from dssn.data import data_root
from dssn.data.colors import voc_palette
from dssn.data.splits import split_name

SMALL = {"num_train": 64, "num_val": 16, "size": 64}
TINY = {"num_train": 4, "num_val": 1, "size": 32}
# Digests of every generated file (see ``_digest``), for parameters -> digest. Any change
# to them means the images, masks or splits changed: bump GENERATOR_VERSION and update.
REFERENCE_DIGESTS = {
    (0, 64, 16, 64, 1 / 16): "feaa9a96940cbaf96e2adf9ed6ef3f92de5ec4fcd30e703a10aba8369864900d",
    (3, 8, 2, 96, 0.25): "6d417580392e5884360d7c2f4343d1f2b3b7e687b247cbcc7359519cd29cf0e7",
}


def _files(root: Path) -> dict[str, bytes]:
    """All generated image/mask/split files, by relative path."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix in {".jpg", ".png", ".txt"}
    }


def _digest(root: Path) -> str:
    """SHA-256 over the relative paths and contents of all generated files."""
    h = hashlib.sha256()
    for name, content in _files(root).items():
        h.update(name.encode() + b"\0" + content)
    return h.hexdigest()


def _leftovers(folder: Path) -> list[str]:
    """Temporary folders next to a dataset folder."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name.endswith(".tmp"))


def _mask(path: Path) -> np.ndarray:
    with Image.open(path) as mask:
        return np.asarray(mask)


def _split(root: Path, name: str) -> list[tuple[str, str]]:
    return [tuple(line.split()) for line in (root / "splits" / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("a") / "synthetic", seed=0, **SMALL)


@pytest.fixture(scope="module")
def default_size_samples() -> tuple[np.ndarray, np.ndarray]:
    """256 default-size training samples, rendered exactly as make_synthetic does."""
    pairs = [render_sample(np.random.default_rng([0, 0, i]), 96) for i in range(256)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def test_voc_palette() -> None:
    palette = np.array(voc_palette()).reshape(-1, 3)
    assert palette.shape == (256, 3)
    assert palette[0].tolist() == [0, 0, 0]
    assert palette[1].tolist() == [128, 0, 0]
    assert palette[2].tolist() == [0, 128, 0]
    assert palette[15].tolist() == [192, 128, 128]  # "person"
    assert palette[255].tolist() == [224, 224, 192]  # the void outline colour
    assert len(voc_palette(21)) == 63


def test_split_name() -> None:
    assert split_name(1 / 16) == "1_16"
    assert split_name(0.125) == "1_8"
    assert split_name(0.3) == "3_10"
    assert split_name(1.0) == "full"
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError):
            split_name(bad)


def test_render_sample_shapes() -> None:
    image, mask = render_sample(np.random.default_rng(0), 80)
    assert image.shape == (80, 80, 3) and image.dtype == np.uint8
    assert mask.shape == (80, 80) and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= set(range(NUM_CLASSES)) | {IGNORE}


def test_deterministic(small: Path, tmp_path: Path) -> None:
    again = make_synthetic(tmp_path / "again", seed=0, **SMALL)
    other = make_synthetic(tmp_path / "other", seed=1, **SMALL)
    reference = _files(small)
    assert _files(again) == reference
    other_files = _files(other)
    assert other_files.keys() == reference.keys()
    differing = [k for k in reference if k.endswith(".png") and reference[k] != other_files[k]]
    assert len(differing) > 0.9 * (SMALL["num_train"] + SMALL["num_val"])


def test_images_do_not_depend_on_dataset_size(small: Path, tmp_path: Path) -> None:
    fewer = make_synthetic(tmp_path / "fewer", seed=0, num_train=8, num_val=2, size=64)
    for sample_id in ("train_00000", "train_00007", "val_00001"):
        for rel in (f"JPEGImages/{sample_id}.jpg", f"SegmentationClass/{sample_id}.png"):
            assert (fewer / rel).read_bytes() == (small / rel).read_bytes()


def test_layout(small: Path) -> None:
    labeled = _split(small, "1_16/labeled.txt")
    unlabeled = _split(small, "1_16/unlabeled.txt")
    full = _split(small, "full/labeled.txt")
    val = _split(small, "val.txt")
    assert len(labeled) == 4 and len(unlabeled) == 60 and len(full) == 64 and len(val) == 16
    for image_path, mask_path in labeled + unlabeled + full + val:
        assert image_path.startswith("JPEGImages/") and image_path.endswith(".jpg")
        assert mask_path == "SegmentationClass/" + Path(image_path).stem + ".png"
        assert (small / image_path).is_file() and (small / mask_path).is_file()
    assert set(labeled).isdisjoint(unlabeled)
    assert set(labeled) | set(unlabeled) == set(full)
    assert set(val).isdisjoint(full)
    assert len(list((small / "JPEGImages").iterdir())) == 80
    assert _leftovers(small) == []


def test_masks_are_voc_palette_pngs(small: Path) -> None:
    palette = voc_palette()
    seen: set[int] = set()
    for _, mask_path in _split(small, "full/labeled.txt"):
        with Image.open(small / mask_path) as mask:
            assert mask.mode == "P" and mask.size == (64, 64)
            assert mask.getpalette()[: 3 * NUM_CLASSES] == palette[: 3 * NUM_CLASSES]
            seen |= set(np.unique(np.asarray(mask)).tolist())
    assert seen <= set(range(NUM_CLASSES)) | {IGNORE}
    assert {0, 1, IGNORE} <= seen
    with Image.open(small / "JPEGImages/train_00000.jpg") as image:
        assert image.format == "JPEG" and image.mode == "RGB" and image.size == (64, 64)


def test_manifest(small: Path) -> None:
    manifest = json.loads((small / "dataset.json").read_text())
    assert manifest["params"] == {"seed": 0, "labeled_fraction": 1 / 16, **SMALL}
    assert manifest["class_names"] == list(CLASS_NAMES)
    counts = np.zeros(256, dtype=np.int64)
    for _, mask_path in _split(small, "full/labeled.txt"):
        counts += np.bincount(_mask(small / mask_path).ravel(), minlength=256)
    assert manifest["train_pixel_counts"] == {n: int(counts[i]) for i, n in enumerate(CLASS_NAMES)}
    assert manifest["train_ignored_pixels"] == counts[IGNORE]
    frequencies = class_frequencies(small)
    assert list(frequencies) == list(CLASS_NAMES)
    assert sum(frequencies.values()) == pytest.approx(1.0)
    assert sum(class_frequencies(small, foreground=True).values()) == pytest.approx(1.0)


def test_at_least_one_labeled_image(tmp_path: Path) -> None:
    root = make_synthetic(tmp_path / "tiny", num_train=8, num_val=1, size=32)
    assert len(_split(root, "1_16/labeled.txt")) == 1
    assert len(_split(root, "1_16/unlabeled.txt")) == 7


def test_long_tail(default_size_samples: tuple[np.ndarray, np.ndarray]) -> None:
    _, masks = default_size_samples
    counts = np.bincount(masks.ravel(), minlength=256)[1:NUM_CLASSES]
    assert (counts > 0).all(), "every object class appears"
    share = counts / counts.sum()
    assert share.min() < 0.05
    assert share.max() > 5 * share.min()
    foreground = counts.sum() / masks.size
    assert 0.05 < foreground < 0.5


def test_colour_is_not_the_class(default_size_samples: tuple[np.ndarray, np.ndarray]) -> None:
    """Per-instance colours come from a shared palette, so (1) per-class mean
    colours nearly coincide compared with the colour spread inside a class, and
    (2) a per-pixel colour-histogram classifier over object classes, scored on
    held-out images, does barely better than always answering the commonest class."""
    images, masks = default_size_samples
    pixels = images.reshape(-1, 3).astype(np.float64)
    labels = masks.ravel()
    objects = range(1, NUM_CLASSES)
    means = np.array([pixels[labels == k].mean(0) for k in objects])
    within = np.array([pixels[labels == k].std(0) for k in objects]).mean(0)
    assert (means.std(0) < 0.15 * within).all()

    # Fit the colour-bin classifier on half the images and score it on the other half, so
    # that memorising a few large instances' colours does not count as a colour cue.
    half = len(images) // 2
    bins = (pixels // 32).astype(np.int64) @ np.array([64, 8, 1])
    fit, held_out = np.arange(len(bins)) < half * images[0].size // 3, np.arange(len(bins)) >= half * images[0].size // 3

    def histograms(rows):
        return np.stack([np.bincount(bins[rows & (labels == k)], minlength=512) for k in objects])

    predicted = histograms(fit).argmax(0)
    scored = histograms(held_out)
    accuracy = scored[predicted, np.arange(512)].sum() / scored.sum()
    majority = scored[histograms(fit).sum(1).argmax()].sum() / scored.sum()
    assert accuracy < majority + 0.05


def test_texture_survives_a_grey_view(default_size_samples: tuple[np.ndarray, np.ndarray]) -> None:
    """The strong views turn 20% of images grey and halve contrast, so the class texture
    must live in brightness, not hue: within each object class's region the luma (what a
    greyscale conversion keeps) spreads by at least 20 levels between its 10th and 90th
    percentiles (a texture of e.g. red on green would fail this)."""
    images, masks = default_size_samples
    luma = images.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    spreads = []
    for image_luma, mask in zip(luma, masks):
        for k in range(1, NUM_CLASSES):
            region = image_luma[mask == k]
            if region.size >= 40:
                low, high = np.percentile(region, [10, 90])
                spreads.append(high - low)
    assert len(spreads) > 300
    assert np.mean(np.array(spreads) < 20) < 0.01


def test_files_match_the_reference(small: Path, tmp_path: Path) -> None:
    """The files for given parameters never change within one GENERATOR_VERSION."""
    assert _digest(small) == REFERENCE_DIGESTS[(0, *SMALL.values(), 1 / 16)]
    other = make_synthetic(tmp_path, seed=3, num_train=8, num_val=2, size=96, labeled_fraction=0.25)
    assert _digest(other) == REFERENCE_DIGESTS[(3, 8, 2, 96, 0.25)]


def test_cache_folder_names_version_and_parameters(small: Path, tmp_path: Path) -> None:
    assert small.name == f"v{GENERATOR_VERSION}-64px-train64-val16-1_16-seed0"
    one = make_synthetic(tmp_path, seed=0, **TINY)
    two = make_synthetic(tmp_path, seed=1, **TINY)
    three = make_synthetic(tmp_path, seed=0, **TINY, labeled_fraction=0.5)
    assert [one.name, two.name, three.name] == [
        f"v{GENERATOR_VERSION}-32px-train4-val1-1_16-seed0",
        f"v{GENERATOR_VERSION}-32px-train4-val1-1_16-seed1",
        f"v{GENERATOR_VERSION}-32px-train4-val1-1_2-seed0",
    ]
    assert all(folder.parent == tmp_path and (folder / "dataset.json").is_file() for folder in (one, two, three))
    assert _files(one) != _files(two)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([one.name, two.name, three.name])


def test_cache_reused_without_rewriting(small: Path) -> None:
    manifest = small / "dataset.json"
    image = small / "JPEGImages/train_00000.jpg"
    before = (manifest.stat().st_mtime_ns, image.stat().st_mtime_ns)
    start = time.perf_counter()
    assert make_synthetic(small.parent, seed=0, **SMALL) == small
    assert time.perf_counter() - start < 0.5
    assert (manifest.stat().st_mtime_ns, image.stat().st_mtime_ns) == before


def _generate_in_step(root: Path, barrier, results) -> None:
    """make_synthetic in a child process that renames its copy only once the other child
    has written its own, so that exactly one of the two renames fails."""
    write = synthetic._write_dataset

    def write_then_wait(*args) -> None:
        write(*args)
        barrier.wait(timeout=60)

    synthetic._write_dataset = write_then_wait
    results.put(str(make_synthetic(root, seed=3, num_train=8, num_val=2, size=96, labeled_fraction=0.25)))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_two_processes_generating_the_same_dataset(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    children = [ctx.Process(target=_generate_in_step, args=(tmp_path, barrier, results)) for _ in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=120)
    assert [child.exitcode for child in children] == [0, 0]
    folders = {Path(results.get(timeout=5)) for _ in children}
    assert len(folders) == 1
    folder = folders.pop()
    assert _digest(folder) == REFERENCE_DIGESTS[(3, 8, 2, 96, 0.25)]
    assert [p.name for p in tmp_path.iterdir()] == [folder.name], "the losing copy is removed"


def test_foreign_folders_are_refused_and_left_untouched(tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match=r"mine holds thesis\.tex.*new or empty"):
        make_synthetic(foreign, **TINY)
    assert [p.name for p in foreign.iterdir()] == ["thesis.tex"]

    # A folder of the dataset's own name, without our manifest.
    cache = tmp_path / "cache"
    squatter = cache / f"v{GENERATOR_VERSION}-32px-train4-val1-1_16-seed0"
    squatter.mkdir(parents=True)
    (squatter / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=f"{squatter.name} exists but holds no synthetic dataset"):
        make_synthetic(cache, **TINY)
    assert [p.name for p in squatter.iterdir()] == ["notes.txt"]
    assert [p.name for p in cache.iterdir()] == [squatter.name]

    empty = tmp_path / "empty"
    empty.mkdir()
    assert (make_synthetic(empty, **TINY) / "dataset.json").is_file()


def test_a_killed_run_does_not_confuse_the_next(tmp_path: Path) -> None:
    reference = _files(make_synthetic(tmp_path / "reference", **TINY))
    key = f"v{GENERATOR_VERSION}-32px-train4-val1-1_16-seed0"
    killed = tmp_path / "cache" / f".{key}.0123456789abcdef.tmp"
    (killed / "JPEGImages").mkdir(parents=True)
    (killed / "JPEGImages/train_00000.jpg").write_bytes(b"")
    folder = make_synthetic(tmp_path / "cache", **TINY)
    assert _files(folder) == reference
    assert _leftovers(folder) == [killed.name], "another run's temporary folder is not touched"


def test_a_failed_run_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(folder: Path, params: dict, progress: bool) -> None:
        (folder / "JPEGImages").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "_write_dataset", fail)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic(tmp_path, **TINY)
    assert list(tmp_path.iterdir()) == []


def test_resolve_synthetic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``data.root`` names a dataset folder, or a cache folder whose default dataset is used."""
    for key, value in TINY.items():  # small stand-ins for the defaults
        monkeypatch.setitem(make_synthetic.__kwdefaults__, key, value)
    default = make_synthetic(tmp_path / "cache")
    assert resolve_synthetic(tmp_path / "cache") == default
    assert resolve_synthetic(tmp_path / "new") == make_synthetic(tmp_path / "new")
    other = make_synthetic(tmp_path / "cache", seed=1)
    assert resolve_synthetic(other) == other
    cfg = load_config("synthetic", [f"data.root={tmp_path / 'cache'}"])
    assert data_root(cfg) == default
    assert data_root(load_config("synthetic", [f"data.root={other}"])) == other

    manifest = json.loads((other / "dataset.json").read_text())
    manifest["version"] = GENERATOR_VERSION - 1
    (other / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(FileExistsError, match=f"generator version {GENERATOR_VERSION - 1}"):
        resolve_synthetic(other)
