"""Tests for the DINOv2 encoder and the DPT head (docs/method.md §2.2-§2.4).

The truth is the official code: tiny DINOv2 and DPT models with random weights, run by
``facebookresearch/dinov2`` and ``LiheYoung/UniMatch-V2``, and the key lists of the released
models, all under ``shared/reference/dinov2``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor

from dssn.models import DPT, DeepLabV3Plus, WeightsError
from dssn.models.perturb import comp_drop_masks, stream_keep_masks
from dssn.models.vit import DinoVisionTransformer, build_dinov2, load_dinov2_weights

NUM_CLASSES = 5
TINY_DIM = 48
TINY_FEATURES = 16
TINY_OUT_CHANNELS = (8, 16, 32, 64)
REFERENCE_GRID = (7, 9)  # the reference input is 98x126
SIZES = ("s", "b", "l", "g")
DPT_KEY_SETS = {"s": "unimatch_v2_dpt_small", "b": "unimatch_v2_dpt_base",
                "l": "unimatch_v2_dpt_large"}


def _find_reference() -> Path | None:
    """``$DSSN_SHARED/reference/dinov2``, else the first ``shared/reference/dinov2`` beside a
    folder above this file (the main checkout and worktrees sit at different depths)."""
    if os.environ.get("DSSN_SHARED"):
        return Path(os.environ["DSSN_SHARED"]) / "reference" / "dinov2"
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "shared" / "reference" / "dinov2"
        if candidate.is_dir():
            return candidate
    return None


REFERENCE = _find_reference()


@pytest.fixture(scope="module")
def reference() -> Path:
    if REFERENCE is None or not REFERENCE.is_dir():
        pytest.skip("reference outputs of the official code not found: set DSSN_SHARED to the "
                    "folder holding reference/dinov2")
    return REFERENCE


@pytest.fixture(scope="module")
def vectors(reference: Path) -> dict[str, Tensor]:
    return load_file(reference / "vectors.safetensors")


@pytest.fixture(scope="module")
def official_keys(reference: Path) -> dict[str, dict[str, list[int]]]:
    keys = json.loads((reference / "dinov2_keys.json").read_text())
    keys.update(json.loads((reference / "unimatch_v2_dpt_keys.json").read_text()))
    return keys


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    """Tiny inputs gain nothing from intra-op threads on a shared machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_encoder(registers: int = 0) -> DinoVisionTransformer:
    """The reference's tiny models: as the hub builds the plain and the ``_reg4`` models."""
    return DinoVisionTransformer(
        TINY_DIM, 4, 3,
        num_register_tokens=registers,
        interpolate_offset=0.0 if registers else 0.1,
        interpolate_antialias=bool(registers),
        out_indices=(0, 1, 2, 3),
    )


def tiny_dpt(**kwargs) -> DPT:
    return DPT(NUM_CLASSES, backbone=tiny_encoder(), features=TINY_FEATURES,
               out_channels=TINY_OUT_CHANNELS, **kwargs)


def weights(vectors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k.removeprefix(prefix): v for k, v in vectors.items() if k.startswith(prefix)}


def shapes(state: dict[str, Tensor]) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in state.items()}


def close_at_scale(actual: Tensor, expected: Tensor, tol: float = 1e-5) -> None:
    """Within ``tol`` of the reference's largest magnitude (the DPT logits reach ~1e3, where
    float32 steps are ~1e-4, and the reference was computed with another thread count)."""
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual, expected, rtol=0, atol=tol * scale)


def capture_inputs(module: torch.nn.Module) -> list[tuple]:
    """Positional inputs of every call to ``module``, recorded by a forward pre-hook."""
    calls: list[tuple] = []
    module.register_forward_pre_hook(lambda _, args: calls.append(args))
    return calls


@pytest.fixture
def images() -> Tensor:
    return torch.randn(2, 3, 98, 126)


# ---------------------------------------------------------------- against the official outputs


@pytest.mark.parametrize("registers", [0, 4])
def test_encoder_matches_official(vectors, registers: int, tmp_path: Path) -> None:
    """Loaded from a file through the key-exact loader, the tiny encoder returns the official
    ``get_intermediate_layers(x, [0, 1, 2, 3], norm=True)`` and the normed class token."""
    name = f"reg{registers}"
    path = tmp_path / "encoder.pth"
    torch.save(weights(vectors, f"{name}.weights."), path)
    encoder = tiny_encoder(registers).eval()
    report = load_dinov2_weights(encoder, path)
    assert report.ok and report.loaded == len(encoder.state_dict())

    x = vectors[f"{name}.input"]
    with torch.no_grad():
        layers = encoder.get_intermediate_layers(x, [0, 1, 2, 3], return_class_token=True)
        tokens = encoder(x)
    for i, ((patch_tokens, class_token), level) in enumerate(zip(layers, tokens)):
        torch.testing.assert_close(patch_tokens, vectors[f"{name}.layer{i}"], rtol=0, atol=1e-5)
        assert torch.equal(level, patch_tokens)
    torch.testing.assert_close(class_token, vectors[f"{name}.cls"], rtol=0, atol=1e-5)


def test_dpt_head_matches_official(vectors) -> None:
    model = tiny_dpt().eval()
    model.head.load_state_dict(weights(vectors, "dpt.weights."), strict=True)
    token_maps = [vectors[f"reg0.layer{i}"] for i in range(4)]
    with torch.no_grad():
        logits = model.head(token_maps, REFERENCE_GRID)
    logits = F.interpolate(logits, (98, 126), mode="bilinear", align_corners=True)
    close_at_scale(logits, vectors["dpt.logits"])


def test_full_dpt_matches_official(vectors) -> None:
    """Encoder and head together: the reference logits come from the reference encoder's maps."""
    model = tiny_dpt().eval()
    model.backbone.load_state_dict(weights(vectors, "reg0.weights."), strict=True)
    model.head.load_state_dict(weights(vectors, "dpt.weights."), strict=True)
    with torch.no_grad():
        logits = model(vectors["reg0.input"])
    close_at_scale(logits, vectors["dpt.logits"])


# ---------------------------------------------------------------- names and shapes


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("size", SIZES)
def test_encoder_keys_are_official(official_keys, size: str, registers: int) -> None:
    with torch.device("meta"):
        encoder = build_dinov2(size, registers)
    official = official_keys[f"dinov2_vit{size}14" + ("_reg4" if registers else "")]
    assert shapes(encoder.state_dict()) == official


@pytest.mark.parametrize("size", sorted(DPT_KEY_SETS))
def test_dpt_keys_are_unimatch_v2s(official_keys, size: str) -> None:
    with torch.device("meta"):
        model = DPT(21, backbone=f"dinov2_{size}")
    assert shapes(model.state_dict()) == official_keys[DPT_KEY_SETS[size]]


def test_unknown_names_are_refused() -> None:
    with pytest.raises(ValueError, match="dinov2_b"):
        DPT(3, backbone="dinov2_x")
    with pytest.raises(ValueError, match="registers"):
        build_dinov2("s", registers=2)
    with pytest.raises(ValueError, match="feature_dropout"):
        tiny_dpt(feature_dropout="sometimes")


def test_pos_embed_unchanged_on_the_pretraining_grid() -> None:
    encoder = tiny_encoder()
    assert encoder.interpolate_pos_encoding((37, 37), torch.float32) is encoder.pos_embed


# ---------------------------------------------------------------- input sizes


def test_multiple_of_14_passes_through(images: Tensor) -> None:
    model = tiny_dpt().eval()
    seen = capture_inputs(model.backbone)
    with torch.no_grad():
        logits = model(images)
        expected = F.interpolate(model.head(model.backbone(images), (7, 9)), (98, 126),
                                 mode="bilinear", align_corners=True)
    assert seen[0][0] is images
    assert torch.equal(logits, expected)


def test_other_sizes_go_to_the_nearest_multiple_and_back() -> None:
    model = tiny_dpt().eval()
    seen = capture_inputs(model.backbone)
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 100, 130))
    assert seen[0][0].shape[-2:] == (98, 126)  # int(100/14 + 0.5) = 7, int(130/14 + 0.5) = 9
    assert logits.shape == (2, NUM_CLASSES, 100, 130)


# ---------------------------------------------------------------- perturbed streams


def test_streams_share_one_head_pass_and_differ(images: Tensor) -> None:
    model = tiny_dpt().eval()
    head_inputs = capture_inputs(model.head)
    with torch.no_grad():
        clean, perturbed = model(images, n_perturb=2)
        plain = model(images)
    assert len(head_inputs) == 2  # one for the three streams, one for the plain call
    assert all(t.shape[0] == 3 * images.shape[0] for t in head_inputs[0][0])
    assert len(perturbed) == 2 and all(p.shape == clean.shape for p in perturbed)
    torch.testing.assert_close(clean, plain, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(perturbed[0], clean)
    assert not torch.allclose(perturbed[1], clean)
    assert not torch.allclose(perturbed[0], perturbed[1])


def test_n_perturb_zero_is_plain_forward(images: Tensor) -> None:
    model = tiny_dpt().eval()
    with torch.no_grad():
        assert torch.equal(model(images, n_perturb=0), model(images))
    with pytest.raises(ValueError, match="n_perturb"):
        model(images, n_perturb=-1)


@pytest.mark.parametrize("mode", ["independent", "complementary"])
def test_stream_masks_drop_whole_channels(images: Tensor, mode: str) -> None:
    """Each stream's token maps are the clean ones with channels zeroed or doubled, one mask
    per image shared by the four levels; complementary streams keep disjoint channels."""
    model = tiny_dpt(feature_dropout=mode).eval()
    head_inputs = capture_inputs(model.head)
    with torch.no_grad():
        model(images, n_perturb=2)
    levels = [level.chunk(3) for level in head_inputs[0][0]]
    keep_masks = []
    for clean, first, second in levels:
        # Per image and channel: zero at every position, or exactly twice the clean value.
        dropped = (first == 0).all(dim=1)
        doubled = (first == 2 * clean).all(dim=1)
        assert torch.equal(dropped, ~doubled)
        assert 0.3 < doubled.float().mean().item() < 0.7
        keep_masks.append(doubled)
        if mode == "complementary":
            assert torch.equal(first + second, 2 * clean)
    for other in keep_masks[1:]:
        assert torch.equal(other, keep_masks[0])  # one mask shared by the four levels
    clean, first, second = levels[0]
    assert torch.equal(first + second, 2 * clean) == (mode == "complementary")


def test_keep_masks_helper() -> None:
    masks = stream_keep_masks(4, 3, 64, "complementary")
    assert masks.shape == (4, 3, 64)
    assert torch.equal(masks[0] + masks[1], torch.full((3, 64), 2.0))
    assert torch.equal(masks[2] + masks[3], torch.full((3, 64), 2.0))
    assert set(masks.unique().tolist()) == {0.0, 2.0}
    independent = stream_keep_masks(2, 3, 64)
    assert not torch.equal(independent[0] + independent[1], torch.full((3, 64), 2.0))


def test_comp_drop_leaves_half_the_pairs_alone() -> None:
    """On ``cat(s, s)`` the two halves see complementary masks, except for int(pairs * 0.5)
    random pairs whose masks are all ones (UniMatch V2's student pass)."""
    model = tiny_dpt().eval()
    views = torch.randn(4, 3, 98, 126)
    head_inputs = capture_inputs(model.head)
    with torch.no_grad():
        clean_logits = model(views)
        seen_unperturbed = set()
        for _ in range(4):
            logits = model(torch.cat([views, views]), comp_drop=True)
            clean = head_inputs[0][0][0]
            first, second = head_inputs[-1][0][0].chunk(2)
            unperturbed = [i for i in range(4) if torch.equal(first[i], second[i])]
            assert len(unperturbed) == 2
            seen_unperturbed.update(unperturbed)
            for i in range(4):
                if i in unperturbed:
                    torch.testing.assert_close(first[i], clean[i])
                    torch.testing.assert_close(logits[i], clean_logits[i], rtol=1e-5, atol=1e-4)
                    torch.testing.assert_close(logits[4 + i], clean_logits[i], rtol=1e-5, atol=1e-4)
                else:
                    assert not torch.allclose(first[i], clean[i])
                    torch.testing.assert_close(first[i] + second[i], 2 * clean[i])
    assert len(seen_unperturbed) > 2  # the pairs left alone are drawn anew each call
    assert logits.shape == (8, NUM_CLASSES, 98, 126)
    with pytest.raises(ValueError, match="two equal halves"):
        model(torch.randn(3, 3, 98, 126), comp_drop=True)
    with pytest.raises(ValueError, match="cannot be combined"):
        model(views, n_perturb=1, comp_drop=True)


def test_comp_drop_masks_helper() -> None:
    first_level, second_level = comp_drop_masks(10, [16, 24])
    assert first_level.shape == (10, 16) and second_level.shape == (10, 24)
    for mask in (first_level, second_level):
        torch.testing.assert_close(mask[:5] + mask[5:], torch.full_like(mask[:5], 2.0))
    ones_first = {i for i in range(5) if bool((first_level[i] == 1).all())}
    ones_second = {i for i in range(5) if bool((second_level[i] == 1).all())}
    assert len(ones_first) == int(5 * 0.5) and ones_first == ones_second


def test_deeplab_comp_drop() -> None:
    """The same rule on DeepLabV3+'s c1 and c4, the pairs left alone shared by both."""
    model = DeepLabV3Plus(NUM_CLASSES, backbone="resnet18", decoder_channels=16).eval()
    c1_inputs, c4_inputs = capture_inputs(model.reduce), capture_inputs(model.head)
    views = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        model(views)
        logits = model(torch.cat([views, views]), comp_drop=True)
    assert logits.shape == (8, NUM_CLASSES, 32, 32)
    unperturbed_sets = []
    for inputs in (c1_inputs, c4_inputs):
        clean = inputs[0][0]
        first, second = inputs[1][0].chunk(2)
        unperturbed = {i for i in range(4) if torch.equal(first[i], second[i])}
        assert len(unperturbed) == 2
        unperturbed_sets.append(unperturbed)
        torch.testing.assert_close(first + second, 2 * clean)
    assert unperturbed_sets[0] == unperturbed_sets[1]


# ---------------------------------------------------------------- training switches


def test_param_groups_split_encoder_and_head() -> None:
    model = tiny_dpt()
    encoder, head = model.param_groups()
    assert {id(p) for p in encoder} == {
        id(p) for n, p in model.backbone.named_parameters() if n != "mask_token"}
    head_params = dict(model.head.named_parameters())
    unused = {n for n in head_params if n.startswith("scratch.refinenet4.resConfUnit1.")}
    assert len(unused) == 4
    assert {id(p) for p in head} == {id(p) for n, p in head_params.items() if n not in unused}


def test_every_trainable_parameter_gets_a_gradient(images: Tensor) -> None:
    """The frozen ones (mask_token, the deepest fusion block's lateral unit) are exactly those
    the forward never reads, so DDP needs no search for unused parameters."""
    model = tiny_dpt().train()
    model(images).sum().backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == param.requires_grad, name


def test_lock_backbone(images: Tensor) -> None:
    model = tiny_dpt(lock_backbone=True).train()
    encoder, head = model.param_groups()
    assert encoder == [] and head
    assert not any(p.requires_grad for p in model.backbone.parameters())
    model(images).sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in head)
    model.lock_backbone = False
    assert len(model.param_groups()[0]) == len(list(model.backbone.parameters())) - 1
    assert not model.backbone.mask_token.requires_grad


def test_checkpointing_changes_nothing(images: Tensor) -> None:
    model = tiny_dpt().train()
    x = images.requires_grad_(True)

    def run() -> tuple[Tensor, dict[str, Tensor], Tensor]:
        model.zero_grad()
        x.grad = None
        out = model(x)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.detach(), grads, x.grad.clone()

    block_calls = capture_inputs(model.backbone.blocks[0])
    plain = run()
    assert len(block_calls) == 1
    model.backbone.checkpoint_blocks = True
    checkpointed = run()
    assert len(block_calls) == 3  # run again in the backward pass: checkpointing is on
    torch.testing.assert_close(checkpointed[0], plain[0], rtol=0, atol=0)
    assert checkpointed[1].keys() == plain[1].keys()
    for name in plain[1]:
        torch.testing.assert_close(checkpointed[1][name], plain[1][name], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(checkpointed[2], plain[2], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- loading


def _edited_file(tmp_path: Path, drop: str | None = None, add: str | None = None) -> Path:
    state = tiny_encoder().state_dict()
    if drop:
        del state[drop]
    if add:
        state[add] = torch.zeros(TINY_DIM)
    path = tmp_path / "edited.pth"
    torch.save(state, path)
    return path


def test_missing_key_is_named(tmp_path: Path) -> None:
    path = _edited_file(tmp_path, drop="blocks.2.ls1.gamma")
    with pytest.raises(WeightsError, match=r"missing keys \(1\): blocks\.2\.ls1\.gamma"):
        load_dinov2_weights(tiny_encoder(), path)
    with pytest.raises(WeightsError, match=r"blocks\.2\.ls1\.gamma"):
        DPT(NUM_CLASSES, backbone=tiny_encoder(), pretrained=path, features=TINY_FEATURES,
            out_channels=TINY_OUT_CHANNELS)


def test_unexpected_key_is_named(tmp_path: Path) -> None:
    path = _edited_file(tmp_path, add="blocks.4.norm1.weight")
    with pytest.raises(WeightsError, match=r"unexpected keys \(1\): blocks\.4\.norm1\.weight"):
        load_dinov2_weights(tiny_encoder(), path)


def test_register_mismatch_is_named(tmp_path: Path) -> None:
    path = tmp_path / "reg4.pth"
    torch.save(tiny_encoder(registers=4).state_dict(), path)
    with pytest.raises(WeightsError, match="register_tokens"):
        load_dinov2_weights(tiny_encoder(registers=0), path)


def test_pretrained_loads_into_the_encoder(tmp_path: Path) -> None:
    source = tiny_encoder()
    path = tmp_path / "encoder.pth"
    torch.save(source.state_dict(), path)
    model = DPT(NUM_CLASSES, backbone=tiny_encoder(), pretrained=path, features=TINY_FEATURES,
                out_channels=TINY_OUT_CHANNELS)
    for key, value in source.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key
