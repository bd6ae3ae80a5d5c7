"""DPT segmentation head on a DINOv2 or DINOv3 encoder, as UniMatch V2 builds it (docs/method.md §2.3).

Module names (``backbone``, ``head.projects``, ``head.resize_layers``,
``head.scratch.layer{1..4}_rn``, ``head.scratch.refinenet{1..4}``, ``head.scratch.output_conv``)
match UniMatch V2's, so its released checkpoints load key-exactly. The feature-perturbed streams
(docs/method.md §2.4) drop channels of the four token maps the head reads.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dssn.models.perturb import FEATURE_DROPOUT_MODES, check_forward_options, comp_drop_masks, stream_keep_masks
from dssn.models.vit import ENCODERS, VisionTransformer, build_encoder, encoder_size, load_encoder_weights

__all__ = ["DPT", "DPTHead", "DPT_BACKBONES", "DPT_WIDTHS", "DPTWidths"]


@dataclass(frozen=True)
class DPTWidths:
    """Head widths: ``features`` after ``layer*_rn``; ``out_channels`` of the four projections."""

    features: int
    out_channels: tuple[int, int, int, int]


# The widths of UniMatch V2's training script for each encoder size.
DPT_WIDTHS: dict[str, DPTWidths] = {
    "s": DPTWidths(64, (48, 96, 192, 384)),
    "b": DPTWidths(128, (96, 192, 384, 768)),
    "l": DPTWidths(256, (256, 512, 1024, 1024)),
    "g": DPTWidths(384, (1536, 1536, 1536, 1536)),
    "tiny": DPTWidths(16, (8, 16, 32, 64)),
}
# model.backbone -> its DPT_WIDTHS key: DINOv2's own size; DINOv3's the matching DINOv2 size's
# (docs/method.md §2.5: S, S+ as s; B as b; L as l; H+, 7B as g).
DPT_BACKBONES = {name: encoder_size(name).head or ENCODERS[name][1] for name in ENCODERS}


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


def _patch_count(side: int | Tensor, patch: int) -> int | Tensor:
    """``int(side / patch + 0.5)``, at least 1, in integer arithmetic so that a side traced by
    an exporter stays a tensor in the graph instead of a baked-in constant."""
    count = (2 * side + patch) // (2 * patch)
    return count.clamp(min=1) if isinstance(count, Tensor) else max(1, count)


def _conv3x3(in_ch: int, out_ch: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=bias)


class ResidualConvUnit(nn.Module):
    """``x + conv2(relu(conv1(relu(x))))``, no normalisation."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(features, features)
        self.conv2 = _conv3x3(features, features)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FeatureFusionBlock(nn.Module):
    """RefineNet fusion: add the refined lateral map to the deeper path, refine, upsample
    (to ``size``, or by 2), then a 1x1 ``out_conv``."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, 1)
        self.resConfUnit1 = ResidualConvUnit(features)  # refines the lateral input
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(
        self, path: Tensor, lateral: Tensor | None = None, size: Sequence[int] | None = None
    ) -> Tensor:
        if lateral is not None:
            path = path + self.resConfUnit1(lateral)
        path = self.resConfUnit2(path)
        if size is None:
            path = F.interpolate(path, scale_factor=2, mode="bilinear", align_corners=True)
        else:
            path = _resize(path, size)
        return self.out_conv(path)


class Scratch(nn.Module):
    """``layer{1..4}_rn`` to a common width, the four fusion blocks and the classifier."""

    def __init__(self, out_channels: Sequence[int], features: int, num_classes: int) -> None:
        super().__init__()
        self.layer1_rn = _conv3x3(out_channels[0], features, bias=False)
        self.layer2_rn = _conv3x3(out_channels[1], features, bias=False)
        self.layer3_rn = _conv3x3(out_channels[2], features, bias=False)
        self.layer4_rn = _conv3x3(out_channels[3], features, bias=False)
        self.refinenet1 = FeatureFusionBlock(features)
        self.refinenet2 = FeatureFusionBlock(features)
        self.refinenet3 = FeatureFusionBlock(features)
        self.refinenet4 = FeatureFusionBlock(features)
        # The deepest block has no lateral input, so its resConfUnit1 never runs: it exists only
        # for key-exact loading, and is frozen so DDP need not look for unused parameters.
        self.refinenet4.resConfUnit1.requires_grad_(False)
        self.output_conv = nn.Sequential(
            _conv3x3(features, features), nn.ReLU(), nn.Conv2d(features, num_classes, 1)
        )


class DPTHead(nn.Module):
    """Four token maps ``[B, rows * cols, D]`` -> logits ``[B, C, 8 * rows, 8 * cols]``.

    Each map is projected (1x1) to ``out_channels[i]`` and brought to 4x, 2x, 1x and 1/2 of the
    patch grid (transposed convs 4x4/4 and 2x2/2, identity, 3x3 conv stride 2), then fused
    coarse to fine by the RefineNet blocks, the finest one upsampling by 2 once more.
    """

    def __init__(
        self, num_classes: int, in_channels: int, features: int, out_channels: Sequence[int]
    ) -> None:
        super().__init__()
        if len(out_channels) != 4:
            raise ValueError(f"out_channels must have 4 values, got {tuple(out_channels)}")
        self.projects = nn.ModuleList(nn.Conv2d(in_channels, ch, 1) for ch in out_channels)
        c1, c2, _, c4 = out_channels
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(c1, c1, kernel_size=4, stride=4),
            nn.ConvTranspose2d(c2, c2, kernel_size=2, stride=2),
            nn.Identity(),
            nn.Conv2d(c4, c4, kernel_size=3, stride=2, padding=1),
        ])
        self.scratch = Scratch(out_channels, features, num_classes)

    def forward(self, tokens: Sequence[Tensor], patch_grid: tuple[int, int]) -> Tensor:
        rows, cols = patch_grid
        s = self.scratch
        levels = []
        for level_tokens, project, resize, reduce in zip(
            tokens, self.projects, self.resize_layers,
            (s.layer1_rn, s.layer2_rn, s.layer3_rn, s.layer4_rn),
        ):
            batch, _, dim = level_tokens.shape
            feature_map = level_tokens.transpose(1, 2).reshape(batch, dim, rows, cols)
            levels.append(reduce(resize(project(feature_map))))
        fine, mid, coarse, coarsest = levels
        path = s.refinenet4(coarsest, size=coarse.shape[-2:])
        path = s.refinenet3(path, coarse, size=mid.shape[-2:])
        path = s.refinenet2(path, mid, size=fine.shape[-2:])
        path = s.refinenet1(path, fine)
        return s.output_conv(path)


class DPT(nn.Module):
    """DINOv2 or DINOv3 encoder + DPT head, UniMatch V2's segmentation network.

    ``forward(x)`` returns logits ``[B, C, H, W]`` at the input size: sides that are not
    multiples of the patch size are resized (bilinear, ``align_corners=True``) to the nearest
    multiple for the network and the logits resized back, as UniMatch V2's evaluation does.
    ``forward(x, n_perturb=k)`` returns ``(logits, [k perturbed logits])``: each perturbed
    stream decodes the same four token maps after channel dropout (p=0.5, a ``[B, D]`` keep
    mask per image and stream, shared by the four levels; ``feature_dropout`` says whether the
    streams' masks are ``"independent"`` or pairwise ``"complementary"``), all streams in one
    batched head pass. ``forward(x, comp_drop=True)`` is UniMatch V2's student pass on
    ``cat(s1, s2)`` (see :func:`~dssn.models.perturb.comp_drop_masks`).

    ``backbone`` is a name of ``DPT_BACKBONES``: ``"dinov2_s"``, ``"dinov2_b"``, ``"dinov2_l"``,
    ``"dinov2_g"`` (with ``registers`` 0 or 4) or ``"dinov3_s"``, ``"dinov3_splus"``,
    ``"dinov3_b"``, ``"dinov3_l"``, ``"dinov3_hplus"``, ``"dinov3_7b"`` (with ``rope_rescale``,
    docs/method.md §2.5), with UniMatch V2's head widths unless ``features``/``out_channels`` are given; or
    an encoder instance (e.g. a tiny one for tests; then the widths are required).
    ``pretrained`` is an official ``dinov2_vit*14[_reg4]_pretrain.pth`` or
    ``dinov3_vit*16_pretrain_*.pth``, loaded key-exactly.
    ``lock_backbone`` freezes the encoder (no gradients, run under ``no_grad``, left out of
    :meth:`param_groups`).
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str | VisionTransformer = "dinov2_b",
        registers: int = 0,
        pretrained: str | os.PathLike[str] | None = None,
        *,
        features: int | None = None,
        out_channels: Sequence[int] | None = None,
        feature_dropout: str = "independent",
        lock_backbone: bool = False,
        rope_rescale: float | None = None,
    ) -> None:
        super().__init__()
        if isinstance(backbone, VisionTransformer):
            if registers not in (0, backbone.num_register_tokens):
                raise ValueError(
                    f"registers={registers} but the given encoder has "
                    f"{backbone.num_register_tokens} register tokens"
                )
            if features is None or out_channels is None:
                raise ValueError("with an encoder instance, give features and out_channels")
            encoder = backbone
        elif backbone in DPT_BACKBONES:
            encoder = build_encoder(backbone, registers, rope_rescale)
            widths = DPT_WIDTHS[DPT_BACKBONES[backbone]]
            features = widths.features if features is None else features
            out_channels = widths.out_channels if out_channels is None else out_channels
        else:
            raise ValueError(
                f"unknown DPT backbone {backbone!r}; choose one of {sorted(DPT_BACKBONES)}"
            )
        if feature_dropout not in FEATURE_DROPOUT_MODES:
            raise ValueError(
                f"feature_dropout must be one of {FEATURE_DROPOUT_MODES}, got {feature_dropout!r}"
            )
        self.num_classes = num_classes
        self.feature_dropout = feature_dropout
        self.backbone = encoder
        if pretrained is not None:
            load_encoder_weights(self.backbone, pretrained)
        self.head = DPTHead(num_classes, encoder.embed_dim, features, tuple(out_channels))
        self.lock_backbone = lock_backbone

    @property
    def lock_backbone(self) -> bool:
        """Whether the encoder is frozen (UniMatch V2's ``lock_backbone``)."""
        return self._lock_backbone

    @lock_backbone.setter
    def lock_backbone(self, locked: bool) -> None:
        self._lock_backbone = bool(locked)
        for name, param in self.backbone.named_parameters():
            param.requires_grad_(not locked and name != "mask_token")  # mask_token: never used

    def _encode(self, x: Tensor) -> list[Tensor]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self._lock_backbone):
            return self.backbone(x)

    def _decode(
        self, tokens: Sequence[Tensor], patch_grid: tuple[int, int], size: tuple[int, int]
    ) -> Tensor:
        rows, cols = patch_grid
        patch = self.backbone.patch_size
        net_size = (rows * patch, cols * patch)
        logits = _resize(self.head(tokens, patch_grid), net_size)
        # Traced: always resize (the identity at equal sizes), so other sizes export correctly.
        same = not torch.jit.is_tracing() and net_size == size
        return logits if same else _resize(logits, size)

    def forward(
        self, x: Tensor, n_perturb: int = 0, comp_drop: bool = False
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        check_forward_options(n_perturb, comp_drop)
        size = (x.shape[-2], x.shape[-1])
        patch = self.backbone.patch_size
        # Round half up to the nearest multiple of the patch, as UniMatch V2's evaluation does.
        patch_grid = (_patch_count(size[0], patch), _patch_count(size[1], patch))
        net_size = (patch_grid[0] * patch, patch_grid[1] * patch)
        if torch.jit.is_tracing() or net_size != size:  # traced: as in _decode
            x = _resize(x, net_size)
        tokens = self._encode(x)
        batch, _, dim = tokens[0].shape
        mask_like = {"device": tokens[0].device, "dtype": tokens[0].dtype}

        if comp_drop:
            (keep_mask,) = comp_drop_masks(batch, [dim], **mask_like)
            tokens = [t * keep_mask.unsqueeze(1) for t in tokens]
            return self._decode(tokens, patch_grid, size)
        if n_perturb == 0:
            return self._decode(tokens, patch_grid, size)

        keep_masks = stream_keep_masks(n_perturb, batch, dim, self.feature_dropout, **mask_like)
        streams = [torch.cat([t, *(t * m.unsqueeze(1) for m in keep_masks)]) for t in tokens]
        clean, *perturbed = self._decode(streams, patch_grid, size).chunk(n_perturb + 1)
        return clean, perturbed

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """``(encoder, head)`` trainable parameters for the two learning rates; the encoder's
        list is empty when it is locked."""
        encoder = [p for p in self.backbone.parameters() if p.requires_grad]
        head = [p for p in self.head.parameters() if p.requires_grad]
        return encoder, head
