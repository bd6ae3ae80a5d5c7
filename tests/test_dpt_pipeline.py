"""The DINOv2 + DPT path end to end (docs/method.md §2.2-2.4, §5.3, §8): each ``*-dinov2``
and ``*-dinov3`` preset trains a step on its dataset layout with AdamW's two learning rates, a DINOv2-format
encoder file loads through the config, a trained DPT goes through ``dssn eval``, ``predict``
and ``export``, ``model.lock_backbone`` trains the head alone, and a backbone the network
cannot take is refused before anything is written.

Every run uses ``dinov2_tiny`` (4 blocks of width 48) on crops of 28 pixels (two patches), or for
the DINOv3 presets ``dinov3_tiny`` (4 blocks of width 64) on crops of 32 (two patches of 16).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from data_fixtures import make_ade20k_raw, make_cityscapes_raw, make_coco_raw, make_voc
from dssn.apps.export import export_onnx
from dssn.apps.inference import load_for_inference
from dssn.cli import main
from dssn.config import ConfigError, load_config
from dssn.data.batch import UnlabeledViews
from dssn.engine.checkpoint import load_checkpoint
from dssn.engine.trainer import build_optimizer, build_training, optimizer_step
from dssn.method import Batch
from dssn.models import DPT, build_model
from dssn.models.vit import build_dinov2
from shared_reference import reference_or_skip

CROP = 28
TINY_DPT = ["model.backbone=dinov2_tiny", "model.pretrained=null", f"data.crop_size={CROP}",
            f"eval.crop_size={CROP}", "data.num_workers=0", "train.iters=1", "train.batch_size=1",
            "train.batch_size_unlabeled=1", "train.progress=false", "train.report=false", "diag.panels=0",
            # float32 whatever the CPU: the checks below compare weights and outputs as numbers
            "train.precision=fp32",
            # one thread: on a busy 2-core machine more threads only make tiny steps slower
            "train.threads=1"]

TINY_DINOV3 = [*TINY_DPT, "model.backbone=dinov3_tiny", "data.crop_size=32", "eval.crop_size=32"]

# pycocotools (as of 2.0.11) trips a NumPy 2 deprecation inside its RLE decoding
coco_warnings = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    threads = torch.get_num_threads()  # train.threads=1 is a process-wide setting
    yield
    torch.set_num_threads(threads)


def _splits(dataset: str, root: Path, labeled: str) -> list[str]:
    out = root / "splits" / "x"
    assert main(["splits", dataset, str(root), "--labeled", labeled, "--out", str(out)]) == 0
    return [f"data.labeled_split={out}/labeled.txt", f"data.unlabeled_split={out}/unlabeled.txt",
            f"data.val_split={out}/val.txt"]


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> list[str]:
    """A tiny PASCAL VOC folder: the overrides that point a config at it."""
    root = make_voc(tmp_path_factory.mktemp("voc") / "VOC2012")
    return [f"data.root={root}", *_splits("pascal", root, "2")]


def _layout(preset: str, tmp_path: Path, voc: list[str]) -> list[str]:
    """Data overrides for a tiny fixture in ``preset``'s layout."""
    if preset.startswith("pascal-"):
        return voc
    if preset.startswith("cityscapes-"):
        root = make_cityscapes_raw(tmp_path / "cityscapes")
        assert main(["prepare", "cityscapes", str(root), "--quiet"]) == 0
        # OHEM keeps at least min_kept pixels; the preset's 200000 is more than a tiny crop holds.
        return [f"data.root={root}", *_splits("cityscapes", root, "1/2"), "train.ohem_min_kept=10"]
    if preset.startswith("ade20k-"):
        root = make_ade20k_raw(tmp_path / "ADEChallengeData2016")
        return [f"data.root={root}", *_splits("ade20k", root, "2")]
    pytest.importorskip("pycocotools")
    root = make_coco_raw(tmp_path / "coco")
    assert main(["prepare", "coco", str(root), "--quiet"]) == 0
    return [f"data.root={root}", *_splits("coco", root, "2")]


def _train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == "train"]


# ---------------------------------------------------------------- one step of every preset


@coco_warnings
@pytest.mark.parametrize("preset, method", [
    ("pascal-dinov2", "dssn"),
    ("pascal-dinov2", "unimatch_v2"),
    ("cityscapes-dinov2", "dssn"),
    ("ade20k-dinov2", "dssn"),
    ("coco-dinov2", "dssn"),
    ("pascal-dinov3", "dssn"),
    ("pascal-dinov3", "unimatch_v2"),
    ("cityscapes-dinov3", "dssn"),
    ("ade20k-dinov3", "dssn"),
    ("coco-dinov3", "dssn"),
])
def test_dinov2_preset_trains_one_step(preset: str, method: str, voc, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["train", preset, f"run_dir={run_dir}", f"method.name={method}", *_layout(preset, tmp_path, voc),
            *(TINY_DINOV3 if preset.endswith("-dinov3") else TINY_DPT)]
    assert main(args) == 0
    cfg = load_config(str(run_dir / "config.yaml"))
    assert (cfg.model.name, cfg.train.optimizer, cfg.method.ema_rule) == ("dpt", "adamw", "ramp")
    assert cfg.model.backbone == ("dinov3_tiny" if preset.endswith("-dinov3") else "dinov2_tiny")

    (record,) = _train_records(run_dir)
    losses = {k: v for k, v in record.items() if k not in ("kind", "step")}
    assert "loss" in losses and all(math.isfinite(v) for v in losses.values()), losses

    assert (run_dir / "last.pt").is_file()
    state = load_checkpoint(run_dir / "last.pt")
    assert state["step"] == 1 and set(state["models"]) == {"student", "teacher"}
    # AdamW (its two moments per parameter) with the encoder at lr and the head at lr * lr_multi.
    groups = state["optimizer"]["param_groups"]
    t = cfg.train
    assert [g["base_lr"] for g in groups] == pytest.approx([t.lr, t.lr * t.lr_multi])
    assert all(tuple(g["betas"]) == t.betas and g["weight_decay"] == t.weight_decay for g in groups)
    model = build_model(cfg)
    encoder, head = model.param_groups()
    assert [len(g["params"]) for g in groups] == [len(encoder), len(head)]
    moments = state["optimizer"]["state"].values()
    assert len(moments) == len(encoder) + len(head) and all({"exp_avg", "exp_avg_sq"} <= set(m) for m in moments)
    assert isinstance(build_optimizer(model, cfg), torch.optim.AdamW)


# ---------------------------------------------------------------- a DINOv2 encoder file


def _encoder_file(path: Path, seed: int = 1) -> dict[str, torch.Tensor]:
    """A ``dinov2_tiny`` encoder's state dict in the released files' format; ``mask_token``
    (frozen, never updated) made recognisable."""
    torch.manual_seed(seed)
    state = build_dinov2("tiny").state_dict()
    state["mask_token"] = torch.full_like(state["mask_token"], 0.5)
    torch.save(state, path)
    return state


def test_pretrained_encoder_file_loads_through_the_config(voc, tmp_path: Path, capsys) -> None:
    weights = tmp_path / "dinov2_vit_tiny14_pretrain.pth"
    source = _encoder_file(weights)
    run_dir = tmp_path / "run"
    assert main(["train", "pascal-dinov2", *voc, f"run_dir={run_dir}", *TINY_DPT, "model.backbone=dinov2_tiny",
                 f"model.pretrained={weights}"]) == 0
    student = load_checkpoint(run_dir / "last.pt")["models"]["student"]
    encoder = {k.removeprefix("backbone."): v for k, v in student.items() if k.startswith("backbone.")}
    assert encoder.keys() == source.keys()
    assert torch.equal(encoder["mask_token"], source["mask_token"])
    # One AdamW step at lr 5e-6 moves a weight by about 5e-6; a random encoder differs by ~0.02.
    for key, value in source.items():
        torch.testing.assert_close(encoder[key], value, rtol=0, atol=1e-4, msg=key)

    wrong = dict(source)
    wrong["blocks.0.norm_1.weight"] = wrong.pop("blocks.0.norm1.weight")
    torch.save(wrong, weights)
    capsys.readouterr()
    assert main(["train", "pascal-dinov2", *voc, f"run_dir={tmp_path / 'run2'}", *TINY_DPT,
                 f"model.pretrained={weights}"]) == 2
    err = capsys.readouterr().err
    assert "blocks.0.norm1.weight" in err and "blocks.0.norm_1.weight" in err and "Traceback" not in err


def test_transformers_layout_dinov3_folder_trains_through_the_config(voc, tmp_path: Path) -> None:
    """``model.pretrained`` pointing at a Hugging Face model folder of a DINOv3 (reference/hf's
    tiny one, the shape of ``dinov3_tiny``): converted to the official names and trained."""
    vectors = load_file(reference_or_skip("hf") / "vectors.safetensors")
    hf = {k.removeprefix("dinov3.weights."): v for k, v in vectors.items() if k.startswith("dinov3.weights.")}
    folder = tmp_path / "dinov3-tiny-hf"
    folder.mkdir()
    save_file(hf, str(folder / "model.safetensors"))
    run_dir = tmp_path / "run"
    assert main(["train", "pascal-dinov3", *voc, f"run_dir={run_dir}", *TINY_DINOV3,
                 f"model.pretrained={folder}"]) == 0
    student = load_checkpoint(run_dir / "last.pt")["models"]["student"]
    # One AdamW step at lr 5e-6 moves a weight by about 5e-6.
    torch.testing.assert_close(student["backbone.blocks.1.attn.qkv.weight"],
                               torch.cat([hf[f"model.layer.1.attention.{p}_proj.weight"] for p in "qkv"]),
                               rtol=0, atol=1e-4)
    torch.testing.assert_close(student["backbone.storage_tokens"], hf["embeddings.register_tokens"], rtol=0, atol=1e-4)


# ---------------------------------------------------------------- eval, predict, export


@pytest.fixture(scope="module")
def dpt_run(data_root, tmp_path_factory) -> Path:
    """A 2-step synthetic-dinov2 run (DSSN: student and teacher)."""
    run_dir = tmp_path_factory.mktemp("dpt") / "run"
    assert main(["train", "synthetic-dinov2", f"data.root={data_root}", f"run_dir={run_dir}", *TINY_DPT,
                 "train.iters=2"]) == 0
    return run_dir


def _scores(out: Path) -> dict[str, dict]:
    return json.loads((out / "scores.json").read_text())


def test_eval_whole_and_sliding(dpt_run: Path, tmp_path: Path) -> None:
    for mode in ("whole", "sliding"):
        out = tmp_path / mode
        assert main(["eval", str(dpt_run / "last.pt"), f"eval.mode={mode}", f"eval.crop_size={CROP}",
                     "--out", str(out)]) == 0
        scores = _scores(out)
        assert set(scores) == {"student", "teacher"}
        assert all(0 <= s["miou"] <= 100 for s in scores.values())


def test_predict_writes_masks_at_the_original_size(dpt_run: Path, tmp_path: Path) -> None:
    sizes = {"a": (45, 30), "b": (33, 50)}  # neither side a multiple of the patch
    for i, (name, (w, h)) in enumerate(sizes.items()):
        pixels = np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{name}.png")
    out = tmp_path / "out"
    assert main(["predict", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--checkpoint",
                 str(dpt_run / "last.pt"), "--out", str(out), "--quiet"]) == 0
    for name, size in sizes.items():
        mask = Image.open(out / "masks" / f"{name}.png")
        assert mask.size == size and np.asarray(mask).max() < 7


def test_onnx_export_follows_the_input_size(dpt_run: Path, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "dpt.onnx"
    # The exporter itself checks onnxruntime against PyTorch at another size than traced.
    assert main(["export", "--checkpoint", str(dpt_run / "last.pt"), "--format", "onnx", "--out", str(out),
                 "--size", str(CROP), str(2 * CROP), "--model", "teacher"]) == 0
    teacher = load_for_inference(dpt_run / "last.pt", device="cpu").models["teacher"]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for shape in ((3, 3, 45, 29), (1, 3, 70, 98)):  # rounded to the patch grid and back; a new grid
        x = torch.randn(*shape)
        with torch.no_grad():
            expected = teacher(x).numpy()
        got = session.run(None, {"image": x.numpy()})[0]
        assert got.shape == expected.shape and np.abs(got - expected).max() <= 1e-4


def test_safetensors_export_is_read_back_by_eval(dpt_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    out = tmp_path / "dpt.safetensors"
    assert main(["export", "--checkpoint", str(dpt_run / "last.pt"), "--format", "safetensors", "--out", str(out),
                 "--model", "student"]) == 0
    assert main(["eval", str(out), "--out", str(tmp_path / "exported")]) == 0
    assert main(["eval", str(dpt_run / "last.pt"), "--out", str(tmp_path / "original")]) == 0
    exported, original = _scores(tmp_path / "exported"), _scores(tmp_path / "original")
    assert list(exported) == ["student"]
    assert exported["student"] == original["student"]


@pytest.mark.parametrize("registers", [0, 4])
def test_traced_position_embeddings_match_eager(registers: int) -> None:
    """The exporter's resampling matrices reproduce F.interpolate's bicubic (with the offset of
    the plain models, with antialias for the register models), the pretraining grid unchanged."""
    torch.manual_seed(0)
    encoder = build_dinov2("tiny", registers)
    for grid in [(37, 37), (1, 1), (2, 3), (5, 7), (37, 40), (50, 38), (80, 90)]:
        eager = encoder.interpolate_pos_encoding(grid, torch.float32)
        traced = encoder._traced_pos_encoding(grid, torch.float32)
        assert traced.shape == eager.shape
        torch.testing.assert_close(traced, eager, rtol=0, atol=2e-6)


@pytest.mark.parametrize("registers", [0, 4])
def test_onnx_of_a_register_model_at_the_pretraining_grid(registers: int, tmp_path: Path) -> None:
    """Traced on a small image, run at 518 x 518 (the pretraining grid, where the position
    embeddings pass unchanged) and at a size the trace never saw."""
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = DPT(5, backbone="dinov2_tiny", registers=registers).eval()
    path = tmp_path / "dpt.onnx"
    assert export_onnx(model, path, (CROP, 2 * CROP), {}) <= 1e-4
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for size in ((518, 518), (60, 30)):
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            expected = model(x).numpy()
        assert np.abs(session.run(None, {"image": x.numpy()})[0] - expected).max() <= 1e-4


# ---------------------------------------------------------------- lock_backbone


def _batch(n: int, size: int, classes: int) -> Batch:
    g = torch.Generator().manual_seed(0)

    def views() -> UnlabeledViews:
        box = torch.zeros(n, size, size, dtype=torch.bool)
        box[:, : size // 2, : size // 2] = True
        images = (torch.randn(n, 3, size, size, generator=g) for _ in range(3))
        return UnlabeledViews(*images, ignore=torch.zeros(n, size, size, dtype=torch.long), box1=box,
                              box2=box.flip(-1))

    labels = torch.randint(0, classes, (n, size, size), generator=g)
    return Batch((torch.randn(n, 3, size, size, generator=g), labels), views(), views())


@pytest.mark.parametrize("method", ["dssn", "unimatch_v2"])
def test_lock_backbone_trains_the_head_alone(method: str) -> None:
    cfg = load_config("pascal-dinov2", [*TINY_DPT, "model.lock_backbone=true", f"method.name={method}"])
    torch.manual_seed(0)
    parts = build_training(cfg, torch.device("cpu"), iters_per_epoch=1)
    student = parts.method.student_net
    before = {k: v.clone() for k, v in student.state_dict().items()}
    losses = optimizer_step(parts.method, parts.optimizer, [_batch(2, CROP, cfg.data.num_classes)], 0, parts.scaler)
    assert math.isfinite(losses[0]["loss"].item())
    after = student.state_dict()
    for key, value in before.items():
        if key.startswith("backbone."):
            assert torch.equal(after[key], value), key
    assert any(not torch.equal(after[k], v) for k, v in before.items() if k.startswith("head."))
    encoder_ids = {id(p) for p in student.backbone.parameters()}
    assert parts.optimizer.param_groups[0]["params"] == []
    assert parts.optimizer.state and not encoder_ids & {id(p) for p in parts.optimizer.state}


# ---------------------------------------------------------------- config errors


@pytest.mark.parametrize("preset, overrides, message", [
    ("pascal", ["model.name=dpt", "model.backbone=resnet50"],
     r"model\.backbone 'resnet50' does not fit model\.name 'dpt'; it takes dinov2_b"),
    ("pascal-dinov2", ["model.name=deeplabv3plus"],
     r"model\.backbone 'dinov2_s' does not fit model\.name 'deeplabv3plus'; it takes resnet101"),
    ("pascal", ["model.lock_backbone=true"], r"model\.lock_backbone is for the DINOv2 and DINOv3 encoders"),
], ids=["dpt-on-resnet50", "deeplabv3plus-on-dinov2", "deeplabv3plus-locked"])
def test_a_backbone_the_network_cannot_take_is_refused(preset: str, overrides: list[str], message: str, voc,
                                                       tmp_path: Path, capsys) -> None:
    cfg = load_config(preset, overrides)
    with pytest.raises(ConfigError, match=message):
        build_model(cfg)
    run_dir = tmp_path / "run"
    assert main(["train", preset, *voc, f"run_dir={run_dir}", *overrides]) == 2
    err = capsys.readouterr().err
    assert "model." in err and "Traceback" not in err
    assert not run_dir.exists()  # refused before the run folder was made
