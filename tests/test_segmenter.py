"""``dssn.load``: a trained run as a segmenter from Python, equal to ``dssn predict``."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import dssn
from dssn.apps.inference import ONLY_NETWORK, choose_network
from dssn.apps.predict import overlay as side_by_side
from dssn.cli import main
from dssn.config import load_config
from dssn.engine.trainer import train
from dssn.errors import DssnError
from dssn.models import build_model
from test_inference import TINY

README = Path(__file__).resolve().parents[1] / "README.md"
DINO_TINY = ["data.num_workers=0", "train.batch_size=2", "train.batch_size_unlabeled=2", "train.eval_every=100",
             "train.progress=false", "train.threads=1", "train.report=false", "diag.panels=0"]
EVAL_MODES = {
    "whole": [],
    "sliding": ["eval.mode=sliding"],  # crop 32 on images up to 50 pixels: overlapping windows
    "sliding+scales+flip": ["eval.mode=sliding", "eval.scales=[0.75,1.0]", "eval.flip=true"],
}


def _train(data_root, folder: Path, preset: str, options: list[str]) -> Path:
    train(load_config(preset, [f"data.root={data_root}", f"run_dir={folder}", *options]))
    return folder


def _scores(checkpoint: Path) -> dict[str, float]:
    state = torch.load(checkpoint, weights_only=True)
    return {name: summary["miou"] for name, summary in state["eval"].items()}


@pytest.fixture(scope="module")
def teacher_run(data_root, tmp_path_factory):
    """Two DSSN steps: the EMA teacher scores above the student (13.3 against 12.1)."""
    run = _train(data_root, tmp_path_factory.mktemp("teacher") / "run", "synthetic", [*TINY, "train.iters=2"])
    scores = _scores(run / "last.pt")
    assert scores["teacher"] > scores["student"], f"this run was meant to have the teacher win: {scores}"
    return run


@pytest.fixture(scope="module")
def student_run(data_root, tmp_path_factory):
    """Four steps at a high learning rate: the student moves, the teacher lags (9.5 against 2.2)."""
    run = _train(data_root, tmp_path_factory.mktemp("student") / "run", "synthetic",
                 [*TINY, "train.iters=4", "train.lr=0.05"])
    scores = _scores(run / "last.pt")
    assert scores["student"] > scores["teacher"], f"this run was meant to have the student win: {scores}"
    return run


@pytest.fixture(scope="module")
def dpt_run(data_root, tmp_path_factory):
    """One step of the synthetic-dinov2 preset: DPT on a tiny ViT."""
    return _train(data_root, tmp_path_factory.mktemp("dpt") / "run", "synthetic-dinov2", [*DINO_TINY, "train.iters=1"])


def _random_rgb(size: tuple[int, int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """PNGs of three sizes (two alike, for batches), one JPEG, one greyscale, one RGBA."""
    folder = tmp_path_factory.mktemp("images")
    Image.fromarray(_random_rgb((45, 30), 0)).save(folder / "a.png")
    Image.fromarray(_random_rgb((45, 30), 1)).save(folder / "b.png")
    Image.fromarray(_random_rgb((33, 50), 2)).save(folder / "c.png")
    Image.fromarray(_random_rgb((40, 36), 3)).save(folder / "d.jpg")
    Image.fromarray(_random_rgb((45, 30), 4)).convert("L").save(folder / "grey.png")
    rgba = np.concatenate([_random_rgb((37, 41), 5), np.full((41, 37, 1), 90, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    return folder


def _cli_masks(checkpoint: Path, folder: Path, out: Path, settings: list[str], *extra: str) -> dict[str, np.ndarray]:
    args = ["predict", str(folder), "--checkpoint", str(checkpoint), "--out", str(out), "--quiet",
            "--batch-size", "2", *extra]
    for setting in settings:
        args += ["--set", setting]
    assert main(args) == 0
    return {p.stem: np.asarray(Image.open(p)) for p in sorted((out / "masks").glob("*.png"))}


# ---------------------------------------------------------------- the same masks as dssn predict


@pytest.mark.parametrize("mode", list(EVAL_MODES))
def test_predict_gives_the_masks_dssn_predict_writes_for_every_input_type(teacher_run, images, tmp_path, mode):
    checkpoint = teacher_run / "last.pt"
    written = _cli_masks(checkpoint, images, tmp_path / "out", EVAL_MODES[mode])
    files = sorted(images.iterdir())
    assert sorted(written) == sorted(p.stem for p in files)
    seg = dssn.load(checkpoint, overrides=EVAL_MODES[mode], verbose=False)

    for path in files:
        expected = written[path.stem]
        with Image.open(path) as img:
            pil = img.copy()
        array = np.asarray(pil)  # [H, W] for the greyscale file, [H, W, 4] for the RGBA one
        for given in (path, str(path), pil, array):
            mask = seg.predict(given)
            assert mask.dtype == np.uint8 and mask.shape == expected.shape
            assert np.array_equal(mask, expected), (path.name, type(given).__name__)
        tensor = seg.predict(path, return_tensors=True)
        assert tensor.dtype == torch.int64 and torch.equal(tensor.cpu(), torch.from_numpy(expected.copy()).long())

    # A list: images of one size batched, two at a time, results in the order given.
    mixed = [files[0], np.asarray(Image.open(files[1])), Image.open(files[2]), *files[3:]]
    for mask, path in zip(seg.predict(mixed, batch_size=2), files):
        assert np.array_equal(mask, written[path.stem]), path.name
    assert len(seg(mixed)) == len(files)  # calling the segmenter is predict
    if mode != "whole":  # the eval settings reach the segmenter: other masks than whole-image inference
        whole = dssn.load(checkpoint, verbose=False)
        assert any(not np.array_equal(whole.predict(path), written[path.stem]) for path in files)


def test_probabilities_are_per_class_at_the_image_size(teacher_run, images):
    for settings in EVAL_MODES.values():
        seg = dssn.load(teacher_run / "last.pt", overrides=settings, verbose=False)
        mask, probs = seg.predict(images / "c.png", return_probs=True)
        assert probs.shape == (7, 50, 33) and probs.dtype == np.float32
        assert np.allclose(probs.sum(0), 1, atol=1e-5) and probs.min() >= 0
        assert (probs.argmax(0) == mask).mean() > 0.99  # ties of rounded probabilities aside
        (_, probs_t), = seg.predict([images / "c.png"], return_probs=True, return_tensors=True)
        assert torch.allclose(probs_t.cpu(), torch.from_numpy(probs)) and not probs_t.requires_grad


def test_dpt_models_segment_like_dssn_predict(dpt_run, images, tmp_path):
    settings = ["eval.mode=sliding", "eval.crop_size=28"]  # 28 = two 14-pixel patches a side
    written = _cli_masks(dpt_run / "last.pt", images, tmp_path / "out", settings)
    seg = dssn.load(dpt_run / "last.pt", overrides=settings, verbose=False)
    assert seg.config.model.name == "dpt" and seg.config.model.backbone == "dinov2_tiny"
    for path in sorted(images.iterdir()):
        assert np.array_equal(seg.predict(path), written[path.stem]), path.name
    whole = dssn.load(dpt_run / "last.pt", overrides=["eval.mode=whole"], verbose=False)
    assert whole.predict(images / "c.png").shape == (50, 33)


def test_the_segmenter_is_in_eval_mode_without_gradients_and_moves(teacher_run, images):
    seg = dssn.load(teacher_run / "last.pt", device="cpu", verbose=False)
    assert not seg.model.training and seg.device == torch.device("cpu")
    seg.model.train()  # a user's slip: predict still runs the network in eval mode
    expected = dssn.load(teacher_run / "last.pt", verbose=False).predict(images / "a.png")
    assert np.array_equal(seg.predict(images / "a.png"), expected) and not seg.model.training
    assert seg.to("cpu") is seg
    mask = seg.predict(images / "a.png", return_tensors=True)
    mask[mask == 0] = 1  # ordinary tensors: in-place edits work outside inference mode
    assert seg.classes[0] == "background" and len(seg.classes) == seg.num_classes == 7
    state = torch.load(teacher_run / "last.pt", weights_only=True)
    assert seg.palette == [tuple(state["palette"][3 * c: 3 * c + 3]) for c in range(7)]
    assert "teacher" in repr(seg) and "7 classes" in repr(seg)


def test_overlay_is_the_blend_dssn_predict_draws(teacher_run, images):
    seg = dssn.load(teacher_run / "last.pt", verbose=False)
    rgb = np.asarray(Image.open(images / "a.png"))
    mask = seg.predict(rgb)
    drawn = seg.overlay(images / "a.png", mask)
    assert isinstance(drawn, Image.Image) and drawn.mode == "RGB" and drawn.size == (45, 30)
    colours = np.asarray(seg.palette, dtype=np.float32)[mask]
    expected = (rgb.astype(np.float32) * 0.5 + colours * 0.5).round().astype(np.uint8)
    assert np.array_equal(np.asarray(drawn), expected)
    assert np.array_equal(side_by_side(rgb, mask, seg.png_palette)[:, 45:], expected)  # predict's right half
    assert np.array_equal(np.asarray(seg.overlay(rgb, torch.from_numpy(mask), alpha=0)), rgb)


# ---------------------------------------------------------------- which network


def test_choose_network_rule():
    both = ["student", "teacher"]
    assert choose_network(both, {"student": 67.65, "teacher": 64.83}).name == "student"
    choice = choose_network(both, {"student": 64.83, "teacher": 67.65})
    assert choice.name == "teacher"
    assert choice.reason == "best mIoU on the last evaluation: teacher 67.65, student 64.83"
    assert choose_network(both, {"student": 60.0, "teacher": 60.0}).name == "teacher"  # a tie
    assert choose_network(both, {}).name == "teacher" and "no evaluation scores" in choose_network(both, {}).reason
    assert choose_network(both, {"student": 70.0}).name == "teacher"  # not every network was scored
    assert choose_network(["model"], {}).reason == ONLY_NETWORK
    assert choose_network(both, {"student": 70.0, "teacher": 60.0}, "teacher").reason == "as asked"
    with pytest.raises(DssnError, match=r"x.pth has no 'teacher' network; it has: model"):
        choose_network(["model"], {}, "teacher", "x.pth")


@pytest.mark.parametrize("winner", ["student", "teacher"])
def test_auto_takes_the_better_scoring_network_in_load_predict_and_export(winner, student_run, teacher_run,
                                                                         images, tmp_path, capsys):
    run = student_run if winner == "student" else teacher_run
    loser = "teacher" if winner == "student" else "student"
    checkpoint = run / "last.pt"
    seg = dssn.load(checkpoint)
    assert seg.network == winner and seg.network_reason.startswith(f"best mIoU on the last evaluation: {winner}")
    assert f"using the {winner} (best mIoU" in capsys.readouterr().out
    forced = dssn.load(checkpoint, network=loser)
    assert forced.network == loser and forced.network_reason == "as asked" and capsys.readouterr().out == ""

    written = _cli_masks(checkpoint, images, tmp_path / "auto", [])
    assert f"segmented with the {winner} (best mIoU" in capsys.readouterr().out
    files = {path.stem: path for path in images.iterdir()}
    assert all(np.array_equal(seg.predict(files[stem]), mask) for stem, mask in written.items())

    pytest.importorskip("safetensors")
    out = tmp_path / "model.safetensors"
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "safetensors", "--out", str(out)]) == 0
    assert f"network: {winner} (best mIoU" in capsys.readouterr().out
    exported = dssn.load(out)  # one network: nothing to choose, nothing printed
    assert exported.network == winner and exported.network_reason == ONLY_NETWORK
    assert capsys.readouterr().out == ""
    assert np.array_equal(exported.predict(images / "c.png"), seg.predict(images / "c.png"))


# ---------------------------------------------------------------- released weights and bad inputs


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> Path:
    """The authors' layout: {"model": {"module." + key: tensor}}."""
    torch.manual_seed(0)
    model = build_model(load_config("synthetic", TINY))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("released") / "dssn_synthetic.pth"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


def test_a_released_pth_loads_with_its_config(released, images):
    seg = dssn.load(released, config="synthetic", overrides=TINY)
    assert seg.network == "model" and seg.network_reason == ONLY_NETWORK
    assert seg.predict(images / "c.png").shape == (50, 33)
    with pytest.raises(DssnError, match=r"carries no config; say what network it holds with config=") as err:
        dssn.load(released)
    assert str(released) in str(err.value) and "dssn.load(path, config='pascal'" in str(err.value)
    with pytest.raises(DssnError, match=r"has no 'teacher' network; it has: model"):
        dssn.load(released, network="teacher", config="synthetic", overrides=TINY)


def test_files_that_are_not_checkpoints_are_named(images, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not weights")
    picture = tmp_path / "photo.pt"
    picture.write_bytes((images / "a.png").read_bytes())
    for path in (text, picture):
        with pytest.raises(DssnError, match=re.escape(f"{path} is not a PyTorch checkpoint")):
            dssn.load(path)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        dssn.load(tmp_path / "missing.pt")
    with pytest.raises(DssnError, match=r"network='best': choose one of auto, student, teacher, model"):
        dssn.load(text, network="best")


def test_bad_images_and_arrays_say_which_argument_and_why(teacher_run, images, tmp_path, capsys):
    seg = dssn.load(teacher_run / "last.pt", verbose=False)
    good = np.asarray(Image.open(images / "a.png"))
    broken = tmp_path / "broken.png"
    broken.write_bytes((images / "a.png").read_bytes()[:200])  # truncated
    cases = {
        str(broken): re.escape(f"image '{broken}' cannot be decoded"),
        str(tmp_path / "nowhere.png"): r"images\[1\]: image file '.*nowhere.png' does not exist",
        str(tmp_path): r"images\[1\]: '.*' is a folder",
    }
    for given, message in cases.items():
        with pytest.raises(DssnError, match=message):
            seg.predict([good, given])
    arrays = {
        "two channels": (good[:, :, :2], r"images\[1\]: an array of shape \(30, 45, 2\); expected \[H, W, 3\]"),
        "channels first": (good.transpose(2, 0, 1), r"images\[1\]: .*channels first\? use array.transpose"),
        "floats": (good.astype(np.float32) / 255, r"images\[1\]: a float32 array; give uint8"),
        "a batch": (good[None], r"images\[1\]: an array of shape \(1, 30, 45, 3\)"),
        "empty": (good[:0], r"images\[1\]: an empty image"),
        "a tensor": (torch.zeros(3, 8, 8), r"images\[1\]: a torch tensor"),
        "a number": (3, r"images\[1\]: int is not an image"),
    }
    for given, message in arrays.values():
        with pytest.raises(DssnError, match=message):
            seg.predict([good, given])
    with pytest.raises(DssnError, match=r"^image: an array of shape \(30, 45, 2\)"):
        seg.predict(good[:, :, :2])
    with pytest.raises(DssnError, match=r"batch_size must be a positive integer, got 0"):
        seg.predict(good, batch_size=0)
    with pytest.raises(DssnError, match=r"mask: shape \(50, 33\) does not match the image's 30x45"):
        seg.overlay(good, seg.predict(images / "c.png"))
    # The command line reports an undecodable file the same way, without a traceback.
    folder = tmp_path / "inputs"
    folder.mkdir()
    (folder / "bad.png").write_bytes(broken.read_bytes())
    assert main(["predict", str(folder), "--checkpoint", str(teacher_run / "last.pt"), "--out",
                 str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"image '{folder / 'bad.png'}' cannot be" in err and "Traceback" not in err


def test_greyscale_and_rgba_are_converted_not_refused(teacher_run, images):
    seg = dssn.load(teacher_run / "last.pt", verbose=False)
    grey = np.asarray(Image.open(images / "grey.png"))
    assert grey.ndim == 2
    as_rgb = np.repeat(grey[:, :, None], 3, axis=2)
    for given in (grey, grey[:, :, None], Image.open(images / "grey.png"), images / "grey.png"):
        assert np.array_equal(seg.predict(given), seg.predict(as_rgb))
    rgba = np.asarray(Image.open(images / "rgba.png"))
    assert rgba.shape[2] == 4
    assert np.array_equal(seg.predict(rgba), seg.predict(rgba[:, :, :3]))
    assert np.array_equal(seg.predict(Image.open(images / "rgba.png")), seg.predict(rgba[:, :, :3]))


# ---------------------------------------------------------------- the README


def test_the_readme_example_runs_as_written(teacher_run, tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    example = [b for b in blocks if "dssn.load(" in b]
    assert len(example) == 1, "the README should show dssn.load in one python block"
    code = example[0]
    assert len([line for line in code.splitlines() if line.strip() and not line.startswith("import")]) == 5
    (tmp_path / "runs" / "NAME").mkdir(parents=True)
    (tmp_path / "runs" / "NAME" / "best.pt").write_bytes((teacher_run / "best.pt").read_bytes())
    for seed, name in enumerate(("photo.jpg", "a.jpg", "b.jpg")):
        Image.fromarray(_random_rgb((50, 40), seed)).save(tmp_path / name)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the README's own code
    assert namespace["mask"].shape == (40, 50) and namespace["probs"].shape == (7, 40, 50)
    assert len(namespace["masks"]) == 2 and Image.open(tmp_path / "overlay.png").size == (50, 40)
    assert "dssn.load: runs/NAME/best.pt: using the teacher" in capsys.readouterr().out


def test_load_is_public_and_documented():
    assert "load" in dssn.__all__ and "Segmenter" in dssn.__all__
    doc = dssn.load.__doc__
    for words in ('network: ``"auto"``', "device:", "config:", "overrides:", ".safetensors", "best.pt"):
        assert words in doc, words
    assert "return_probs" in dssn.Segmenter.predict.__doc__
