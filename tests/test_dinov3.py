"""The DINOv3 ViT/16 encoder (docs/method.md §2.5, docs/method.md §2.5) against the official code.

The truth: ``shared/reference/dinov3``, two tiny official ``DinoVisionTransformer``s (GELU MLP
and SwiGLU) run by ``facebookresearch/dinov3`` on two non-square inputs, and the key lists and
shapes of every released backbone.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

import dssn
from dssn.apps.export import export_onnx
from dssn.cli import main
from dssn.config import ConfigError, load_config
from dssn.models import DPT, WeightsError, build_model
from dssn.models.vit import (
    DINOV3_SIZES,
    DinoV3VisionTransformer,
    RopePositionEmbedding,
    build_dinov3,
    build_encoder,
    load_dinov2_weights,
)
from shared_reference import reference_or_skip, reference_vectors, single_thread  # noqa: F401 (autouse)

# The released hub names of each size (dinov3_keys.json).
OFFICIAL_NAMES = {"s": "dinov3_vits16", "splus": "dinov3_vits16plus", "b": "dinov3_vitb16",
                  "l": "dinov3_vitl16", "l_sat": "dinov3_vitl16_sat493m", "hplus": "dinov3_vith16plus",
                  "7b": "dinov3_vit7b16"}
TINY = {"mlp": {"ffn": "mlp", "mlp_ratio": 4.0}, "swiglu": {"ffn": "swiglu", "mlp_ratio": 6.0}}


@pytest.fixture(scope="module")
def reference() -> Path:
    return reference_or_skip("dinov3")


@pytest.fixture(scope="module")
def vectors() -> dict[str, Tensor]:
    return reference_vectors("dinov3")


def tiny_v3(ffn: str, **kwargs) -> DinoV3VisionTransformer:
    """reference/dinov3's tiny models: width 64, depth 4, 4 heads, 4 storage tokens."""
    return DinoV3VisionTransformer(64, 4, 4, out_indices=(0, 1, 2, 3), **TINY[ffn], **kwargs)


def weights(vectors: dict[str, Tensor], tag: str) -> dict[str, Tensor]:
    prefix = f"{tag}.weights."
    return {k.removeprefix(prefix): v for k, v in vectors.items() if k.startswith(prefix)}


def shapes(state: dict[str, Tensor]) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in state.items()}


@pytest.mark.parametrize("ffn", ["mlp", "swiglu"])
def test_tiny_official_models_are_reproduced(vectors, ffn: str, tmp_path: Path) -> None:
    path = tmp_path / "tiny.pth"
    torch.save(weights(vectors, ffn), path)
    encoder = tiny_v3(ffn).eval()
    report = load_dinov2_weights(encoder, path)  # the official file format, key-exactly
    assert report.ok and report.loaded == len(weights(vectors, ffn))
    for i in (0, 1):
        x = vectors[f"{ffn}.input{i}"]
        rows, cols = x.shape[-2] // 16, x.shape[-1] // 16
        with torch.no_grad():
            layers = encoder.get_intermediate_layers(x, [0, 1, 2, 3], return_class_token=True,
                                                     return_extra_tokens=True)
            prenorm = encoder.get_intermediate_layers(x, [3], norm=False)[0]
            sin, cos = encoder.rope_embed(rows, cols)
        expect = f"{ffn}.input{i}"
        for j, (patches, cls, storage) in enumerate(layers):
            grid = patches.transpose(1, 2).reshape(x.shape[0], 64, rows, cols)
            torch.testing.assert_close(grid, vectors[f"{expect}.layer{j}"], rtol=0, atol=1e-5)
            torch.testing.assert_close(cls, vectors[f"{expect}.cls{j}"], rtol=0, atol=1e-5)
            torch.testing.assert_close(storage, vectors[f"{expect}.storage{j}"], rtol=0, atol=1e-5)
        torch.testing.assert_close(prenorm, vectors[f"{expect}.prenorm3"], rtol=0, atol=1e-5)
        torch.testing.assert_close(sin, vectors[f"{expect}.rope_sin"], rtol=0, atol=1e-5)
        torch.testing.assert_close(cos, vectors[f"{expect}.rope_cos"], rtol=0, atol=1e-5)
        # forward: the normed patch tokens of out_indices, as the DPT head reads them
        with torch.no_grad():
            assert all(torch.equal(a, b[0]) for a, b in zip(encoder(x), layers))


def test_rope_tables_by_hand() -> None:
    """docs/method.md §2.5's formula on a 1x2 grid with head width 8: periods 100^(0, 1/2) = (1, 10);
    column centres -1/2 and 1/2, the single row's 0."""
    rope = RopePositionEmbedding(8)
    torch.testing.assert_close(rope.periods, torch.tensor([1.0, 10.0]))
    sin, cos = rope(1, 2)
    angles = torch.tensor([[0.0, 0.0, -math.pi, -math.pi / 10], [0.0, 0.0, math.pi, math.pi / 10]])
    torch.testing.assert_close(sin, angles.tile(2).sin())
    torch.testing.assert_close(cos, angles.tile(2).cos())


def test_rope_rescale_only_in_training() -> None:
    """``rescale=2``: in training, one factor f in [1/2, 2] multiplies every coordinate; in eval,
    and with the default (None) always, the tables are the true positions'."""
    rope, plain = RopePositionEmbedding(8, rescale=2.0), RopePositionEmbedding(8)
    # (tests run with gradients enabled, as a student's forward does)
    true_sin, true_cos = plain(1, 2)
    assert all(torch.equal(a, b) for a, b in zip(rope.eval()(1, 2), (true_sin, true_cos)))
    assert all(torch.equal(a, b) for a, b in zip(plain.train()(1, 2), (true_sin, true_cos)))
    rope.train()
    torch.manual_seed(0)
    factors = []
    for _ in range(20):
        sin, cos = rope(1, 2)
        # column 1's angle for period 10 is 2 pi * 0.5 * f / 10, below pi / 2 for f <= 2
        factor = torch.asin(sin[1, 3]).item() / (0.1 * math.pi)
        assert 0.5 - 1e-6 <= factor <= 2 + 1e-6
        angles = torch.tensor([[0.0, 0.0, -math.pi, -math.pi / 10], [0.0, 0.0, math.pi, math.pi / 10]])
        torch.testing.assert_close(sin, (angles * factor).tile(2).sin())
        torch.testing.assert_close(cos, (angles * factor).tile(2).cos())
        factors.append(factor)
    assert min(factors) < 0.9 and max(factors) > 1.1  # drawn anew each forward, both ways


@pytest.mark.parametrize("size", sorted(OFFICIAL_NAMES))
def test_every_size_has_the_official_keys(reference: Path, size: str) -> None:
    official = json.loads((reference / "dinov3_keys.json").read_text())[OFFICIAL_NAMES[size]]
    with torch.device("meta"):
        encoder = build_dinov3(size)
    assert shapes(encoder.state_dict()) == official


def test_encoder_names() -> None:
    assert set(DINOV3_SIZES) >= {"s", "splus", "b", "l", "hplus", "7b"}
    with torch.device("meta"):
        assert isinstance(build_encoder("dinov3_b"), DinoV3VisionTransformer)
        with pytest.raises(ValueError, match="registers"):
            build_encoder("dinov3_s", registers=4)
        with pytest.raises(ValueError, match="rope_rescale"):
            build_encoder("dinov2_s", rope_rescale=2.0)


def test_a_file_of_another_size_is_refused(vectors, tmp_path: Path) -> None:
    path = tmp_path / "swiglu.pth"
    torch.save(weights(vectors, "swiglu"), path)
    with pytest.raises(WeightsError, match="blocks.0.mlp.w1.weight"):
        load_dinov2_weights(tiny_v3("mlp"), path)


def test_checkpointed_blocks_give_the_same_gradients(vectors) -> None:
    encoder = tiny_v3("mlp")
    encoder.load_state_dict(weights(vectors, "mlp"))
    x = vectors["mlp.input1"]
    grads = []
    for flag in (False, True):
        encoder.zero_grad()
        encoder.checkpoint_blocks = flag
        sum(t.square().sum() for t in encoder(x)).backward()
        grads.append(encoder.patch_embed.proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


# ---------------------------------------------------------------- DPT on patch 16 (docs/method.md §2.5)


@pytest.mark.parametrize("size, head", [("s", "small"), ("b", "base")])
def test_dpt_keys_are_the_official_encoder_and_unimatch_v2s_head(reference: Path, size: str, head: str) -> None:
    """The full network: the released encoder's keys under ``backbone.``, and UniMatch V2's head
    of the matching DINOv2 size (its released key lists, 21 classes)."""
    encoder = json.loads((reference / "dinov3_keys.json").read_text())[OFFICIAL_NAMES[size]]
    unimatch = json.loads((reference.parent / "dinov2" / "unimatch_v2_dpt_keys.json").read_text())
    heads = {k: v for k, v in unimatch[f"unimatch_v2_dpt_{head}"].items() if k.startswith("head.")}
    with torch.device("meta"):
        model = DPT(21, backbone=f"dinov3_{size}")
    assert shapes(model.state_dict()) == {**{f"backbone.{k}": v for k, v in encoder.items()}, **heads}


def test_dpt_sides_round_to_multiples_of_16() -> None:
    """A 40x70 image runs at 48x64 (int(side / 16 + 0.5) * 16) and its logits come back at 40x70."""
    torch.manual_seed(0)
    model = DPT(3, backbone="dinov3_tiny").eval()
    seen = []
    model.backbone.patch_embed.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[-2:]))
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 40, 70))
    assert seen == [(48, 64)] and logits.shape == (1, 3, 40, 70)


def test_rope_rescale_changes_training_never_eval(vectors) -> None:
    """On, it changes the forward of a network in training mode with gradients (a student's);
    never eval, and never a no-grad pass (an EMA teacher in training mode predicts its pseudo
    labels at the true positions)."""
    torch.manual_seed(0)
    plain = DPT(3, backbone="dinov3_tiny")
    plain.backbone.load_state_dict(weights(vectors, "mlp"))  # trained-like scales: positions matter
    rescaled = DPT(3, backbone="dinov3_tiny", rope_rescale=2.0)
    rescaled.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), rescaled.eval()(x))
        assert torch.equal(plain.train()(x), rescaled.train()(x))  # training mode without gradients
    torch.manual_seed(1)
    train_plain = plain.train()(x)
    assert torch.equal(train_plain, plain(x))  # off: the training forward is deterministic
    torch.manual_seed(1)
    assert not torch.equal(rescaled.train()(x), train_plain)
    torch.manual_seed(1)
    tokens_plain, tokens_rescaled = plain.backbone(x)[-1], rescaled.backbone(x)[-1]
    assert (tokens_rescaled - tokens_plain).abs().max() > 1e-3  # float noise is ~1e-6
    cfg = load_config("pascal-dinov3", ["model.backbone=dinov3_tiny", "model.pretrained=null",
                                         "model.rope_rescale=2"])
    assert build_model(cfg).backbone.rope_embed.rescale == 2.0
    with pytest.raises(ConfigError, match="rope_rescale is for the DINOv3"):
        build_model(load_config("pascal-dinov2", ["model.pretrained=null", "model.rope_rescale=2"]))
    with pytest.raises(ConfigError, match="registers"):
        build_model(load_config("pascal-dinov3", ["model.pretrained=null", "model.registers=4"]))


def test_onnx_export_follows_the_input_size(tmp_path: Path) -> None:
    """The RoPE tables are built from the traced patch grid, so the exported graph runs at sizes
    it was not traced at (rounded to multiples of 16 and back)."""
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = DPT(5, backbone="dinov3_tiny").eval()
    path = tmp_path / "dpt.onnx"
    assert export_onnx(model, path, (32, 64), {}) <= 1e-4
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for size in ((48, 80), (60, 30)):
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            expected = model(x)
        got = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


# ---------------------------------------------------------------- a trained DINOv3 network, end to end


def test_a_dinov3_run_evaluates_predicts_loads_and_exports(data_root, tmp_path: Path) -> None:
    """Two DSSN steps on the built-in dataset with ``dinov3_tiny``, then every way out of a run:
    ``dssn eval`` in each mode, ``dssn.load`` + predict at a size that is no multiple of 16, and a
    safetensors export that ``dssn eval`` reads back with the same scores."""
    run_dir = tmp_path / "run"
    assert main(["train", "synthetic-dinov2", f"data.root={data_root}", f"run_dir={run_dir}",
                 "model.backbone=dinov3_tiny", "model.pretrained=null", "data.crop_size=32", "eval.crop_size=32",
                 "data.num_workers=0", "train.iters=2", "train.batch_size=1", "train.batch_size_unlabeled=1",
                 "train.progress=false", "train.report=false", "diag.panels=0", "train.precision=fp32"]) == 0
    scores = {}
    for mode in ("whole", "sliding", "center_crop"):
        assert main(["eval", str(run_dir / "last.pt"), f"eval.mode={mode}", "--out", str(tmp_path / mode)]) == 0
        scores[mode] = json.loads((tmp_path / mode / "scores.json").read_text())
        assert set(scores[mode]) == {"student", "teacher"}
    segmenter = dssn.load(run_dir / "last.pt", verbose=False)
    mask = segmenter.predict(np.random.default_rng(0).integers(0, 256, (37, 50, 3), dtype=np.uint8))
    assert mask.shape == (37, 50) and mask.max() < segmenter.config.data.num_classes
    exported = tmp_path / "student.safetensors"
    assert main(["export", "--checkpoint", str(run_dir / "last.pt"), "--format", "safetensors", "--out",
                 str(exported), "--model", "student"]) == 0
    assert main(["eval", str(exported), "--out", str(tmp_path / "exported")]) == 0
    assert json.loads((tmp_path / "exported" / "scores.json").read_text())["student"] == scores["whole"]["student"]
