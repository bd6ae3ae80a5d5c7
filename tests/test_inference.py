"""Using a trained network: released weights, evaluation options, prediction, export."""

from __future__ import annotations

import argparse
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dssn.apps.inference import load_for_inference
from dssn.cli import main
from dssn.config import load_config
from dssn.engine.evaluate import predict, predict_tta
from dssn.engine.trainer import train
from dssn.models import build_model
from nets import PixelwiseNet

TINY = ["model.backbone=resnet18", "model.backbone_width=8", "model.decoder_channels=8", "data.crop_size=32",
        "data.num_workers=0", "train.batch_size=2", "train.batch_size_unlabeled=4", "train.eval_every=100",
        "train.progress=false", "train.threads=1", "train.report=false", "diag.panels=0"]


@pytest.fixture(scope="module")
def run(data_root, tmp_path_factory):
    """A DSSN checkpoint (student and teacher) after 2 steps."""
    run_dir = tmp_path_factory.mktemp("run") / "run"
    train(load_config("synthetic", [f"data.root={data_root}", f"run_dir={run_dir}", *TINY, "train.iters=2"]))
    return run_dir


@pytest.fixture(scope="module")
def released(data_root, tmp_path_factory):
    """A file in the authors' released layout: {"model": {"module." + key: tensor}, ...}."""
    torch.manual_seed(0)
    model = build_model(load_config("synthetic", TINY)).eval()
    with torch.no_grad():  # non-trivial BN statistics, so that a load that skipped them would show
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("released") / "dssn_pascal_732.pth"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 79,
                "previous_best": 80.61}, path)
    return path, model


# ---------------------------------------------------------------- released weights


def test_released_checkpoint_loads_with_no_missing_key_and_evaluates(data_root, released, tmp_path, capsys):
    path, reference = released
    loaded = load_for_inference(path, "synthetic", TINY, device="cpu")
    assert list(loaded.models) == ["model"]
    model = loaded.models["model"]
    assert model.state_dict().keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))

    out = tmp_path / "scores"
    args = ["eval", str(path), "--config", "synthetic", f"data.root={data_root}", *TINY, "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "background" in printed
    scores = json.loads((out / "scores.json").read_text())
    rows = list(csv.reader((out / "per_class_iou.csv").open()))
    assert rows[0] == ["class", "model"] and rows[-1][0] == "mIoU" and len(rows) == 7 + 2
    assert float(rows[-1][1]) == pytest.approx(scores["model"]["miou"], abs=1e-3)


def test_released_checkpoint_without_config_says_what_to_do(released, capsys):
    assert main(["eval", str(released[0])]) == 2
    err = capsys.readouterr().err
    assert "carries no config" in err and "--config" in err and "Traceback" not in err


def test_pickled_objects_are_refused_with_the_reason(released, tmp_path, capsys):
    path = tmp_path / "pickled.pth"
    state = released[1].state_dict()
    torch.save({"model": state, "args": argparse.Namespace(lr=0.1)}, path)
    assert main(["eval", str(path), "--config", "synthetic", *TINY]) == 2
    err = capsys.readouterr().err
    assert "pickled Python objects" in err and "Namespace" in err and "Traceback" not in err
    out = tmp_path / "pred"
    img = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(img)
    assert main(["predict", str(img), "--checkpoint", str(path), "--config", "synthetic", "--out", str(out)]) == 2
    assert "pickled Python objects" in capsys.readouterr().err


def test_eval_of_a_dssn_checkpoint_scores_student_and_teacher(run, tmp_path, capsys):
    out = tmp_path / "scores"
    assert main(["eval", str(run / "best.pt"), "eval.scales=[0.75,1.0,1.25]", "eval.flip=true", "--out", str(out)]) == 0
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header == ["class", "student", "teacher"]
    assert set(json.loads((out / "scores.json").read_text())) == {"student", "teacher"}


# ---------------------------------------------------------------- multi-scale and flip



def test_flip_and_scale_averaging():
    net = PixelwiseNet().eval()
    image = torch.randn(2, 3, 23, 37)
    with torch.no_grad():
        plain = net(image).softmax(1)
        # A pixel-wise network is flip-equivariant: flip averaging changes nothing.
        assert torch.allclose(predict_tta(net, image, 4, flip=True), plain, atol=1e-6)
        multi = predict_tta(net, image, 4, scales=[0.5, 1.0, 1.5], flip=True)
        assert multi.shape == plain.shape and torch.allclose(multi.sum(1), torch.ones(2, 23, 37), atol=1e-5)
        # Sliding windows at several scales are normalised per pixel before averaging.
        slid = predict_tta(net, image, 4, "sliding", crop_size=16, scales=[1.0, 0.75])
        assert torch.allclose(slid.sum(1), torch.ones(2, 23, 37), atol=1e-5)
        assert torch.equal(predict_tta(net, image, 4), predict(net, image, 4))


# ---------------------------------------------------------------- prediction


def _image(path, size, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def test_predict_writes_masks_at_the_original_size_with_the_checkpoint_palette(run, tmp_path, capsys):
    inputs = tmp_path / "inputs"
    _image(inputs / "a.jpg", (45, 30), 0)
    _image(inputs / "b.png", (45, 30), 1)
    _image(inputs / "sub" / "c.png", (33, 50), 2)
    single = tmp_path / "single.png"
    _image(single, (20, 17), 3)
    out = tmp_path / "out"
    # No dataset needed: point data.root nowhere.
    args = ["predict", str(inputs), str(single), "--checkpoint", str(run / "last.pt"), "--out", str(out),
            "--batch-size", "2", "--quiet", "--set", "data.root=/nonexistent"]
    assert main(args) == 0
    assert "with the teacher" in capsys.readouterr().out
    state = torch.load(run / "last.pt", weights_only=True)
    for name, size in {"a": (45, 30), "b": (45, 30), "sub/c": (33, 50), "single": (20, 17)}.items():
        mask = Image.open(out / "masks" / f"{name}.png")
        assert mask.mode == "P" and mask.size == size
        assert mask.getpalette() == state["palette"][:768]
        assert json.loads(mask.text["dssn:classes"]) == state["class_names"]
        assert np.asarray(mask).max() < 7
        assert Image.open(out / "overlays" / f"{name}.jpg").size == (2 * size[0], size[1])

    before = (out / "masks" / "a.png").stat().st_mtime_ns
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already exist" in err and "--overwrite" in err
    assert (out / "masks" / "a.png").stat().st_mtime_ns == before
    assert main([*args, "--skip-existing"]) == 0
    assert "0 image(s)" in capsys.readouterr().out
    assert main([*args, "--overwrite", "--model", "student"]) == 0
    assert "with the student" in capsys.readouterr().out


def test_predict_batches_equal_single_images(run, tmp_path):
    for i in range(3):
        _image(tmp_path / "in" / f"{i}.png", (40, 36), i)
    for bs, out in ((3, "b3"), (1, "b1")):
        assert main(["predict", str(tmp_path / "in"), "--checkpoint", str(run / "last.pt"),
                     "--out", str(tmp_path / out), "--batch-size", str(bs), "--quiet"]) == 0
    for i in range(3):
        a = np.asarray(Image.open(tmp_path / "b3" / "masks" / f"{i}.png"))
        b = np.asarray(Image.open(tmp_path / "b1" / "masks" / f"{i}.png"))
        assert np.array_equal(a, b)


# ---------------------------------------------------------------- export


def test_onnx_export_matches_pytorch(run, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(run / "last.pt"), "--format", "onnx", "--out", str(out),
                 "--size", "32", "40"]) == 0
    teacher = load_for_inference(run / "last.pt", device="cpu").models["teacher"]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["class_names"])[0] == "background" and meta["network"] == "teacher"
    x = torch.randn(3, 3, 45, 29)
    with torch.no_grad():
        expected = teacher(x).numpy()
    got = session.run(None, {"image": x.numpy()})[0]
    assert got.shape == expected.shape and np.abs(got - expected).max() <= 1e-4
    assert main(["export", "--checkpoint", str(run / "last.pt"), "--format", "onnx", "--out", str(out)]) == 2


def test_safetensors_export_round_trips(run, tmp_path):
    pytest.importorskip("safetensors")
    out = tmp_path / "model.safetensors"
    assert main(["export", "--checkpoint", str(run / "last.pt"), "--format", "safetensors", "--out", str(out),
                 "--model", "student"]) == 0
    assert (tmp_path / "model.yaml").is_file()
    loaded = load_for_inference(out, device="cpu")
    original = load_for_inference(run / "last.pt", device="cpu").models["student"]
    assert list(loaded.models) == ["student"] and loaded.class_names[0] == "background"
    for key, value in original.state_dict().items():
        assert torch.equal(loaded.models["student"].state_dict()[key], value)
