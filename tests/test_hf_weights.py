"""Encoder weights in the Hugging Face ``transformers`` layout (docs/training.md, encoder weights), converted exactly.

The truth: ``shared/reference/hf``, transformers 5.23.0's hidden states of four tiny random
models (DINOv2, DINOv2 with registers, DINOv3 with MLP and with SwiGLU) and the key lists and
shapes of the full-size repositories' ``model.safetensors``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from dssn import load_weights
from dssn.models import DPT, WeightsError
from dssn.models.hf_layout import convert_transformers
from dssn.models.vit import (
    DinoV3VisionTransformer,
    DinoVisionTransformer,
    VisionTransformer,
    build_dinov2,
    build_dinov3,
    load_encoder_weights,
)
from shared_reference import reference_or_skip, reference_vectors, single_thread  # noqa: F401 (autouse)

TINY: dict[str, Callable[[], VisionTransformer]] = {
    "dinov2": lambda: DinoVisionTransformer(48, 4, 3, img_size=98, out_indices=(0, 1, 2, 3)),
    "dinov2reg": lambda: DinoVisionTransformer(48, 4, 3, img_size=98, num_register_tokens=4, interpolate_offset=0.0,
                                               interpolate_antialias=True, out_indices=(0, 1, 2, 3)),
    "dinov3": lambda: DinoV3VisionTransformer(64, 4, 4, out_indices=(0, 1, 2, 3)),
    "dinov3swiglu": lambda: DinoV3VisionTransformer(64, 4, 4, ffn="swiglu", mlp_ratio=6.0, out_indices=(0, 1, 2, 3)),
}
FULL = {
    "dinov2-small": lambda: build_dinov2("s"),
    "dinov2-base": lambda: build_dinov2("b"),
    "dinov2-with-registers-small": lambda: build_dinov2("s", registers=4),
    "dinov3-vits16-pretrain-lvd1689m": lambda: build_dinov3("s"),
    "dinov3-vits16plus-pretrain-lvd1689m": lambda: build_dinov3("splus"),
    "dinov3-vitb16-pretrain-lvd1689m": lambda: build_dinov3("b"),
}


@pytest.fixture(scope="module")
def reference() -> Path:
    return reference_or_skip("hf")


@pytest.fixture(scope="module")
def vectors() -> dict[str, Tensor]:
    return reference_vectors("hf")


def hf_state(vectors: dict[str, Tensor], tag: str) -> dict[str, Tensor]:
    prefix = f"{tag}.weights."
    return {k.removeprefix(prefix): v for k, v in vectors.items() if k.startswith(prefix)}


def all_tokens(encoder: VisionTransformer, x: Tensor, norm: bool) -> list[Tensor]:
    """Every block's tokens as transformers orders them: class, registers, patches."""
    layers = encoder.get_intermediate_layers(x, list(range(encoder.depth)), norm=norm, return_class_token=True,
                                             return_extra_tokens=True)
    return [torch.cat([cls[:, None], extra, patches], dim=1) for patches, cls, extra in layers]


@pytest.mark.parametrize("tag", sorted(TINY))
def test_tiny_models_reproduce_transformers(vectors, tag: str, tmp_path: Path, caplog) -> None:
    folder = tmp_path / tag
    folder.mkdir()
    save_file(hf_state(vectors, tag), str(folder / "model.safetensors"))
    encoder = TINY[tag]().eval()
    with caplog.at_level(logging.INFO, logger="dssn.models.weights"):
        report = load_encoder_weights(encoder, folder)  # the model folder, as the Hub lays it out
    assert report.ok
    assert "transformers layout" in caplog.text and "q/k/v joined into qkv in 4 blocks" in caplog.text
    x = vectors[f"{tag}.input"]
    with torch.no_grad():
        hidden, normed = all_tokens(encoder, x, norm=False), all_tokens(encoder, x, norm=True)
        embedded, _ = encoder.embed(x)
    torch.testing.assert_close(embedded, vectors[f"{tag}.hidden0"], rtol=0, atol=1e-5)
    for j, tokens in enumerate(hidden, start=1):
        torch.testing.assert_close(tokens, vectors[f"{tag}.hidden{j}"], rtol=0, atol=1e-5)
    torch.testing.assert_close(normed[-1], vectors[f"{tag}.last_hidden_state"], rtol=0, atol=1e-5)


def test_conversion_is_exact_renaming(vectors) -> None:
    """Every value of the file arrives unchanged: q, k, v stacked in that order, DINOv3's k bias
    zero, the mask token only reshaped."""
    state = hf_state(vectors, "dinov3")
    converted, info = convert_transformers(state, TINY["dinov3"]().state_dict())
    qkv = converted["blocks.2.attn.qkv.weight"]
    for part, name in zip(qkv.chunk(3), ("q", "k", "v")):
        assert torch.equal(part, state[f"model.layer.2.attention.{name}_proj.weight"])
    q_bias, k_bias, v_bias = converted["blocks.2.attn.qkv.bias"].chunk(3)
    assert torch.equal(q_bias, state["model.layer.2.attention.q_proj.bias"]) and not k_bias.any()
    assert torch.equal(v_bias, state["model.layer.2.attention.v_proj.bias"])
    assert torch.equal(converted["mask_token"].flatten(), state["embeddings.mask_token"].flatten())
    assert torch.equal(converted["storage_tokens"], state["embeddings.register_tokens"])
    assert torch.equal(converted["blocks.0.ls2.gamma"], state["model.layer.0.layer_scale2.lambda1"])
    assert info.zero_k_bias == 4 and info.prefix == ""


def test_transformers_4_names_convert_the_same(vectors) -> None:
    """The files on the Hub were written by transformers 4.x: ``attention.attention.query`` and
    ``attention.output.dense`` instead of ``q_proj`` and ``o_proj``."""
    state = hf_state(vectors, "dinov2")
    old = {}
    for key, value in state.items():
        for new, legacy in (("q_proj", "attention.query"), ("k_proj", "attention.key"), ("v_proj", "attention.value"),
                            ("o_proj", "output.dense")):
            key = key.replace(f"attention.{new}.", f"attention.{legacy}.")
        old[key] = value
    assert "encoder.layer.0.attention.attention.query.weight" in old
    target = TINY["dinov2"]().state_dict()
    new_names, _ = convert_transformers(state, target)
    old_names, _ = convert_transformers(old, target)
    assert new_names.keys() == old_names.keys() == target.keys()
    assert all(torch.equal(new_names[k], old_names[k]) for k in new_names)


@pytest.mark.parametrize("name", sorted(FULL))
def test_full_size_key_sets_match_ours(reference: Path, name: str) -> None:
    layout = json.loads((reference / "hf_keys.json").read_text())["models"][name]
    with torch.device("meta"):
        encoder = FULL[name]()
        state = {k: torch.empty(shape) for k, shape in layout.items()}
    converted, _ = convert_transformers(state, encoder.state_dict())
    ours = {k: list(v.shape) for k, v in encoder.state_dict().items()}
    theirs = {k: list(v.shape) for k, v in converted.items()}
    assert theirs.keys() == ours.keys()
    if name == "dinov2-with-registers-small":
        # hf_keys.json lists this one with patch 16 and a 32x32 position table, not the released
        # repository's patch 14 and 37x37: the other shapes must still agree.
        for key in ("patch_embed.proj.weight", "pos_embed"):
            ours.pop(key), theirs.pop(key)
    assert theirs == ours


def test_prefix_and_bin_load_the_same(vectors, tmp_path: Path, caplog) -> None:
    """A task model's file (``dinov3.`` before every encoder key, a classifier beside it) as a
    ``pytorch_model.bin`` loads the same tensors as the bare ``model.safetensors``."""
    state = hf_state(vectors, "dinov3")
    plain, prefixed = tmp_path / "plain", tmp_path / "prefixed"
    plain.mkdir(), prefixed.mkdir()
    save_file(state, str(plain / "model.safetensors"))
    task = {f"dinov3.{k}": v for k, v in state.items()}
    task["classifier.weight"] = torch.zeros(10, 128)
    task["classifier.bias"] = torch.zeros(10)
    torch.save(task, prefixed / "pytorch_model.bin")
    first, second = TINY["dinov3"](), TINY["dinov3"]()
    load_encoder_weights(first, plain)
    with caplog.at_level(logging.INFO, logger="dssn.models.weights"):
        report = load_encoder_weights(second, prefixed / "pytorch_model.bin")
    assert sorted(report.ignored) == ["classifier.bias", "classifier.weight"]
    assert "prefix 'dinov3.' removed" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    # dssn.load_weights takes the same file for an encoder
    third = TINY["dinov3"]()
    assert load_weights(third, plain).ok
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), third.state_dict().values()))


def test_a_file_of_another_size_is_refused_by_name(vectors, tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file(hf_state(vectors, "dinov3swiglu"), str(path))
    with pytest.raises(WeightsError, match=r"blocks\.0\.mlp\.w1\.weight"):
        load_encoder_weights(TINY["dinov3"](), path)
    # a DPT built on a name takes the same folder through pretrained=
    with pytest.raises(WeightsError, match="does not match"):
        DPT(3, backbone="dinov3_tiny", pretrained=path)


def test_a_folder_without_weights_is_named(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(WeightsError, match="model.safetensors"):
        load_encoder_weights(TINY["dinov3"](), tmp_path)


def test_a_sharded_checkpoint_loads_like_one_file(vectors, tmp_path: Path) -> None:
    """Large repositories (the 7B) split ``model.safetensors`` into shards named by an index."""
    state = hf_state(vectors, "dinov3")
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for shard, names in shards.items():
        save_file({k: state[k] for k in names}, str(tmp_path / shard))
    weight_map = {k: shard for shard, names in shards.items() for k in names}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    sharded, whole = TINY["dinov3"](), TINY["dinov3"]()
    load_encoder_weights(sharded, tmp_path)
    save_file(state, str(tmp_path / "whole.safetensors"))
    load_encoder_weights(whole, tmp_path / "whole.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(sharded.state_dict().values(), whole.state_dict().values()))
