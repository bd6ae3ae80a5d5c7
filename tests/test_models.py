"""Tests for dssn.models: shapes, released parameter names, perturbed streams, weight loading."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from dssn.models import (
    DeepLabV3Plus,
    LoadReport,
    WeightsError,
    build_backbone,
    load_backbone_weights,
    load_weights,
)

NUM_CLASSES = 5


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    """Tiny inputs gain nothing from intra-op threads, and on a busy machine the
    threads' spin-waiting makes these tests several times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def r101_model() -> DeepLabV3Plus:
    """Only its names and shapes are inspected; never run forward (too slow on CPU)."""
    return DeepLabV3Plus(21, backbone="resnet101")


def small_model(**kwargs) -> DeepLabV3Plus:
    return DeepLabV3Plus(NUM_CLASSES, backbone="resnet18", decoder_channels=32, **kwargs)


def assert_state_dicts_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("size", [(33, 33), (64, 48), (31, 40)])
def test_logits_at_input_size(size: tuple[int, int]) -> None:
    model = small_model().eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, NUM_CLASSES, *size)


@pytest.mark.parametrize("output_stride", [16, 8])
def test_backbone_feature_strides(output_stride: int) -> None:
    backbone = build_backbone("resnet18", output_stride=output_stride).eval()
    with torch.no_grad():
        c1, c4 = backbone(torch.randn(1, 3, 64, 64))
    assert c1.shape == (1, backbone.low_channels, 16, 16)
    side = 64 // output_stride
    assert c4.shape == (1, backbone.high_channels, side, side)


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [
        ("resnet18", 64, 512),
        ("resnet34", 64, 512),
        ("resnet50", 256, 2048),
        ("resnet101", 256, 2048),
    ],
)
def test_backbone_channels(name: str, low: int, high: int) -> None:
    backbone = build_backbone(name)
    assert (backbone.low_channels, backbone.high_channels) == (low, high)


def test_unknown_backbone_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="resnet18.*resnet34.*resnet50.*resnet101"):
        build_backbone("resnet152")


def test_output_stride_8_model_runs_and_doubles_aspp_rates() -> None:
    model = small_model(output_stride=8).eval()
    assert [model.head.b1[0].dilation, model.head.b2[0].dilation, model.head.b3[0].dilation] == [
        (12, 12),
        (24, 24),
        (36, 36),
    ]
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, NUM_CLASSES, 32, 32)


# ---------------------------------------------------------------- dilation


def _conv3x3s(layer: nn.Module) -> list[nn.Conv2d]:
    return [m for m in layer.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]


def test_layer4_dilated_at_output_stride_16() -> None:
    backbone = build_backbone("resnet101", output_stride=16)
    convs = _conv3x3s(backbone.layer4)
    assert len(convs) == 3
    assert all(c.stride == (1, 1) for c in convs)
    assert backbone.layer4[0].downsample[0].stride == (1, 1)
    # As released (torchvision convention): the first block of a dilated stage
    # keeps the previous dilation, the following ones use the new one.
    assert [c.dilation for c in convs] == [(1, 1), (2, 2), (2, 2)]
    assert [c.padding for c in convs] == [(1, 1), (2, 2), (2, 2)]
    assert all(c.dilation == (1, 1) for c in _conv3x3s(backbone.layer3))
    assert backbone.layer3[0].conv2.stride == (2, 2)


def test_output_stride_8_dilates_layer3_and_layer4() -> None:
    backbone = build_backbone("resnet50", output_stride=8)
    assert [c.dilation[0] for c in _conv3x3s(backbone.layer3)] == [1] + [2] * 5
    assert [c.dilation[0] for c in _conv3x3s(backbone.layer4)] == [2, 4, 4]
    assert all(c.stride == (1, 1) for c in _conv3x3s(backbone.layer3) + _conv3x3s(backbone.layer4))


# ---------------------------------------------------------------- parameter names


def test_released_parameter_names(r101_model: DeepLabV3Plus) -> None:
    sd = r101_model.state_dict()
    for key in [
        "backbone.conv1.0.weight",
        "backbone.conv1.1.running_mean",
        "backbone.conv1.3.weight",
        "backbone.conv1.4.bias",
        "backbone.conv1.6.weight",
        "backbone.bn1.weight",
        "backbone.layer1.0.downsample.0.weight",
        "backbone.layer1.0.downsample.1.running_var",
        "backbone.layer3.22.conv3.weight",  # layer3 is the 23-block stage
        "backbone.layer4.2.bn3.weight",
        "head.b0.0.weight",
        "head.b1.1.running_mean",
        "head.b3.0.weight",
        "head.b4.gap.1.weight",
        "head.b4.gap.2.running_var",
        "head.project.0.weight",
        "reduce.0.weight",
        "reduce.1.weight",
        "fuse.0.weight",
        "fuse.3.weight",
        "fuse.4.running_mean",
        "classifier.weight",
        "classifier.bias",
    ]:
        assert key in sd, key
    assert not any(k.startswith(("fc.", "backbone.fc.")) for k in sd)
    assert "backbone.conv1.2.weight" not in sd and "backbone.conv1.7.weight" not in sd

    assert sd["backbone.conv1.0.weight"].shape == (64, 3, 3, 3)
    assert sd["backbone.conv1.6.weight"].shape == (128, 64, 3, 3)
    assert sd["backbone.layer1.0.conv1.weight"].shape == (64, 128, 1, 1)
    assert sd["head.b0.0.weight"].shape == (256, 2048, 1, 1)
    assert sd["head.b1.0.weight"].shape == (256, 2048, 3, 3)
    assert sd["head.project.0.weight"].shape == (256, 1280, 1, 1)
    assert sd["reduce.0.weight"].shape == (48, 256, 1, 1)
    assert sd["fuse.0.weight"].shape == (256, 304, 3, 3)
    assert sd["classifier.weight"].shape == (21, 256, 1, 1)
    assert sd["classifier.bias"].shape == (21,)


def test_layer_depths(r101_model: DeepLabV3Plus) -> None:
    sd = r101_model.state_dict()
    assert "backbone.layer3.22.conv3.weight" in sd and "backbone.layer3.23.conv1.weight" not in sd
    assert "backbone.layer4.2.conv3.weight" in sd and "backbone.layer4.3.conv1.weight" not in sd


def _expected_tensor_counts(blocks: list[int], convs_per_block: int) -> tuple[int, int]:
    """(parameter tensors, state-dict entries) of DeepLabV3Plus, counted by hand.

    conv (no bias): 1 parameter; BN: 2 parameters + 3 buffers.
    Stem: 3 convs + 2 BNs, then bn1. Each block: k convs + k BNs; the first
    block of each stage has a downsample (conv + BN). Head: b0..b3 and
    b4.gap and project are conv+BN each (6); reduce conv+BN; fuse 2x conv+BN;
    classifier conv with bias (2 parameters).
    """
    convs = 3 + sum(blocks) * convs_per_block + 4 + 6 + 1 + 2
    bns = 3 + sum(blocks) * convs_per_block + 4 + 6 + 1 + 2
    params = convs + 2 * bns + 2
    return params, params + 3 * bns


@pytest.mark.parametrize(
    ("name", "blocks", "convs_per_block"),
    [("resnet18", [2, 2, 2, 2], 2), ("resnet50", [3, 4, 6, 3], 3)],
)
def test_tensor_counts(name: str, blocks: list[int], convs_per_block: int) -> None:
    model = DeepLabV3Plus(NUM_CLASSES, backbone=name)
    params, entries = _expected_tensor_counts(blocks, convs_per_block)
    assert len(list(model.parameters())) == params
    assert len(model.state_dict()) == entries


def test_resnet101_counts(r101_model: DeepLabV3Plus) -> None:
    params, entries = _expected_tensor_counts([3, 4, 23, 3], 3)
    assert (params, entries) == (347, 692)
    assert len(list(r101_model.parameters())) == params
    assert len(r101_model.state_dict()) == entries
    # torchvision resnet101 has 44,549,160 parameters; minus fc (2048*1000+1000),
    # minus its 7x7 stem (conv 9408 + BN 128), plus the v1c stem
    # (1728+128 + 36864+128 + 73728 + bn1 256) and the wider layer1.0 inputs
    # (128 instead of 64 channels: conv1 +4096, downsample +16384).
    expected = 44_549_160 - 2_049_000 - 9_408 - 128 + 112_832 + 4_096 + 16_384
    assert sum(p.numel() for p in r101_model.backbone.parameters()) == expected


def test_param_groups_partition_parameters() -> None:
    model = small_model()
    backbone, others = model.param_groups()
    assert len(backbone) == len(list(model.backbone.parameters()))
    assert {id(p) for p in backbone}.isdisjoint(id(p) for p in others)
    assert len(backbone) + len(others) == len(list(model.parameters()))
    assert any(p is model.classifier.weight for p in others)


# ---------------------------------------------------------------- perturbed streams


def test_perturbed_streams_train_mode() -> None:
    model = small_model().train()
    x = torch.randn(2, 3, 33, 33)
    clean, perturbed = model(x, n_perturb=2)
    assert clean.shape == (2, NUM_CLASSES, 33, 33)
    assert isinstance(perturbed, list) and len(perturbed) == 2
    assert all(p.shape == clean.shape for p in perturbed)
    assert not torch.allclose(perturbed[0], clean)
    assert not torch.allclose(perturbed[1], clean)
    assert not torch.allclose(perturbed[0], perturbed[1])
    (clean.sum() + sum(p.sum() for p in perturbed)).backward()
    assert model.backbone.conv1[0].weight.grad is not None


def test_clean_stream_matches_plain_forward_in_eval() -> None:
    model = small_model().eval()
    x = torch.randn(2, 3, 33, 33)
    with torch.no_grad():
        plain = model(x)
        clean, perturbed = model(x, n_perturb=2)
    torch.testing.assert_close(clean, plain, atol=1e-5, rtol=1e-5)
    # The dropout is always on, as released: perturbed streams differ even in eval.
    assert not torch.allclose(perturbed[0], clean)


def test_negative_n_perturb_rejected() -> None:
    with pytest.raises(ValueError):
        small_model()(torch.randn(2, 3, 16, 16), n_perturb=-1)


# ---------------------------------------------------------------- load_weights


def test_load_wrapped_ddp_checkpoint(tmp_path) -> None:
    source = small_model()
    sd = source.state_dict()
    path = tmp_path / "ckpt.pth"
    torch.save({"model": {"module." + k: v for k, v in sd.items()}, "epoch": 3}, path)

    target = small_model()
    report = load_weights(target, path)
    assert isinstance(report, LoadReport)
    assert report.missing == [] and report.unexpected == [] and report.mismatched == {}
    assert report.loaded == len(sd)
    assert_state_dicts_equal(target.state_dict(), sd)


def test_load_plain_state_dict(tmp_path) -> None:
    sd = small_model().state_dict()
    path = tmp_path / "plain.pth"
    torch.save(sd, path)
    target = small_model()
    load_weights(target, path)
    assert_state_dicts_equal(target.state_dict(), sd)


def test_missing_and_unexpected_keys_raise(tmp_path) -> None:
    sd = dict(small_model().state_dict())
    del sd["fuse.3.weight"]
    sd["aux.weight"] = torch.zeros(3)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    target = small_model()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(WeightsError) as info:
        load_weights(target, path)
    msg = str(info.value)
    assert "fuse.3.weight" in msg and "aux.weight" in msg and "bad.pth" in msg
    assert_state_dicts_equal(target.state_dict(), before)  # strict failure copies nothing


def test_shape_mismatch_names_key_and_shapes(tmp_path) -> None:
    sd = dict(small_model().state_dict())
    sd["classifier.weight"] = torch.zeros(7, 32, 1, 1)
    path = tmp_path / "shape.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsError) as info:
        load_weights(small_model(), path)
    msg = str(info.value)
    assert "classifier.weight" in msg
    assert "[7, 32, 1, 1]" in msg and f"[{NUM_CLASSES}, 32, 1, 1]" in msg


def test_long_key_lists_are_truncated(tmp_path) -> None:
    path = tmp_path / "empty_ish.pth"
    torch.save({"only.key": torch.zeros(1)}, path)
    with pytest.raises(WeightsError, match=r"missing keys \(\d+\): .* and \d+ more"):
        load_weights(small_model(), path)


class _Opaque:
    """Stands in for arbitrary pickled objects (argparse namespaces, configs, ...)."""


def test_pickled_objects_rejected_safely(tmp_path) -> None:
    path = tmp_path / "pickled.pth"
    torch.save({"model": small_model().state_dict(), "obj": _Opaque()}, path)
    with pytest.raises(WeightsError, match="cannot be loaded safely") as info:
        load_weights(small_model(), path)
    assert "pickled.pth" in str(info.value) and "state dict" in str(info.value)


def test_garbage_file_rejected(tmp_path) -> None:
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="garbage.pth"):
        load_weights(small_model(), path)


def test_missing_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_weights(small_model(), tmp_path / "nope.pth")


def test_non_tensor_entry_rejected(tmp_path) -> None:
    path = tmp_path / "mixed.pth"
    sd = dict(small_model().state_dict())
    sd["epoch"] = 3
    torch.save(sd, path)
    with pytest.raises(WeightsError, match="'epoch'"):
        load_weights(small_model(), path)


def test_non_strict_reports_and_loads_the_rest(tmp_path, caplog) -> None:
    source_sd = dict(small_model().state_dict())
    del source_sd["fuse.3.weight"]
    source_sd["aux.weight"] = torch.zeros(3)
    source_sd["classifier.bias"] = torch.zeros(9)
    path = tmp_path / "partial.pth"
    torch.save(source_sd, path)

    target = small_model()
    with caplog.at_level(logging.WARNING, logger="dssn.models.weights"):
        report = load_weights(target, path, strict=False)
    assert report.missing == ["fuse.3.weight"]
    assert report.unexpected == ["aux.weight"]
    assert report.mismatched == {"classifier.bias": ((9,), (NUM_CLASSES,))}
    assert report.loaded == len(source_sd) - 2
    assert "fuse.3.weight" in caplog.text and "aux.weight" in caplog.text
    assert torch.equal(target.state_dict()["reduce.0.weight"], source_sd["reduce.0.weight"])


# ---------------------------------------------------------------- load_backbone_weights


def test_load_imagenet_backbone_drops_fc(tmp_path) -> None:
    sd = dict(build_backbone("resnet18").state_dict())
    sd["fc.weight"] = torch.zeros(1000, 512)
    sd["fc.bias"] = torch.zeros(1000)
    path = tmp_path / "resnet18.pth"
    torch.save(sd, path)

    backbone = build_backbone("resnet18")
    report = load_backbone_weights(backbone, path)
    assert sorted(report.ignored) == ["fc.bias", "fc.weight"]
    assert report.missing == [] and report.unexpected == []
    del sd["fc.weight"], sd["fc.bias"]
    assert_state_dicts_equal(backbone.state_dict(), sd)


def test_load_backbone_from_prefixed_keys_via_model(tmp_path) -> None:
    full = small_model()
    path = tmp_path / "full.pth"
    torch.save(full.state_dict(), path)
    model = small_model(pretrained=path)
    assert_state_dicts_equal(model.backbone.state_dict(), full.backbone.state_dict())
    report = load_backbone_weights(build_backbone("resnet18"), path)
    assert "classifier.weight" in report.ignored


def test_backbone_without_bn_counters_loads(tmp_path) -> None:
    full = build_backbone("resnet18").state_dict()
    sd = {k: v for k, v in full.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pth"
    torch.save(sd, path)
    report = load_backbone_weights(build_backbone("resnet18"), path)
    assert report.missing and all(k.endswith("num_batches_tracked") for k in report.missing)
    assert report.loaded == len(sd)


def test_backbone_missing_keys_raise(tmp_path) -> None:
    sd = dict(build_backbone("resnet18").state_dict())
    del sd["layer4.1.conv2.weight"]
    path = tmp_path / "short.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsError, match="layer4.1.conv2.weight"):
        load_backbone_weights(build_backbone("resnet18"), path)


def test_backbone_wrong_architecture_raises(tmp_path) -> None:
    path = tmp_path / "r34.pth"
    torch.save(build_backbone("resnet34").state_dict(), path)
    with pytest.raises(WeightsError, match="unexpected keys"):
        load_backbone_weights(build_backbone("resnet18"), path)


def test_backbone_width_scales_every_stage_and_keeps_names():
    narrow = DeepLabV3Plus(3, backbone="resnet18", backbone_width=16, decoder_channels=16)
    standard = DeepLabV3Plus(3, backbone="resnet18", decoder_channels=16)
    assert narrow.backbone.low_channels == 16 and narrow.backbone.high_channels == 128
    assert narrow.state_dict().keys() == standard.state_dict().keys()
    assert narrow.state_dict()["backbone.conv1.6.weight"].shape == (32, 16, 3, 3)
    assert narrow.state_dict()["head.b0.0.weight"].shape == (16, 128, 1, 1)  # ASPP keeps high/8
    assert narrow(torch.randn(2, 3, 32, 32)).shape == (2, 3, 32, 32)


def test_activation_checkpointing_changes_neither_gradients_nor_bn_statistics():
    """Recomputing the backbone stages in backward gives the same gradients, and the running BN
    statistics move once per forward, not twice (a plain checkpoint would update them again)."""
    import copy

    torch.manual_seed(0)
    plain = DeepLabV3Plus(4, backbone="resnet18", decoder_channels=16, backbone_width=8)
    checkpointed = copy.deepcopy(plain)
    checkpointed.backbone.checkpoint_stages = True
    x = torch.randn(2, 3, 48, 48)
    for net in (plain, checkpointed):
        torch.manual_seed(1)  # the same dropout in the perturbed streams
        out, (fp1, _) = net(x, n_perturb=2)
        (out.square().mean() + fp1.mean()).backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.equal(a.grad, b.grad), name
    for (name, a), b in zip(plain.named_buffers(), checkpointed.buffers()):
        assert torch.equal(a, b), name
    assert int(checkpointed.backbone.bn1.num_batches_tracked) == 1
