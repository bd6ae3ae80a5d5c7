"""DeepLabV3+ with feature-perturbed decoding streams (docs/method.md §2.1, §2.4).

Submodule names (``backbone``, ``head.b0..b4``, ``head.project``, ``reduce``,
``fuse``, ``classifier``) match the authors' released checkpoints.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dssn.models.perturb import check_forward_options, comp_drop_masks
from dssn.models.resnet import build_backbone
from dssn.models.weights import load_backbone_weights

__all__ = ["ASPP", "ASPPPooling", "DeepLabV3Plus"]

logger = logging.getLogger(__name__)

# Channels of the low-level projection of c1 (DeepLabV3+ paper value).
_LOW_PROJ_CHANNELS = 48
_PERTURB_DROPOUT = 0.5


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class ASPPPooling(nn.Module):
    """Image-level branch: global average, 1x1 conv, then broadcast back to the map size."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.gap = nn.Sequential(nn.AdaptiveAvgPool2d(1), *_conv_bn_relu(in_ch, out_ch, 1))

    def forward(self, x: Tensor) -> Tensor:
        return _resize(self.gap(x), x.shape[-2:])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three dilated 3x3 and image pooling, projected."""

    def __init__(self, in_ch: int, out_ch: int, dilations: Sequence[int]) -> None:
        super().__init__()
        d1, d2, d3 = dilations
        self.b0 = _conv_bn_relu(in_ch, out_ch, 1)
        self.b1 = _conv_bn_relu(in_ch, out_ch, 3, d1)
        self.b2 = _conv_bn_relu(in_ch, out_ch, 3, d2)
        self.b3 = _conv_bn_relu(in_ch, out_ch, 3, d3)
        self.b4 = ASPPPooling(in_ch, out_ch)
        self.project = _conv_bn_relu(5 * out_ch, out_ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        branches = (self.b0, self.b1, self.b2, self.b3, self.b4)
        return self.project(torch.cat([b(x) for b in branches], dim=1))


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ on a ResNet-v1c backbone.

    ``forward(x)`` returns logits at the input size. ``forward(x, n_perturb=k)``
    returns ``(logits, [k perturbed logits])``: each perturbed stream decodes
    the same ``c1``/``c4`` after its own channel dropout (p=0.5, always on, as
    in the release), and all streams share one batched decoder pass, so in
    train mode they share BN batch statistics exactly as released.
    ``forward(x, comp_drop=True)`` applies UniMatch V2's complementary dropout to a batch
    ``cat(s1, s2)`` (see :func:`~dssn.models.perturb.comp_drop_masks`): one mask pair for
    ``c1`` and one for ``c4``, the unperturbed image pairs shared by both.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet101",
        output_stride: int = 16,
        dilations: Sequence[int] = (6, 12, 18),
        pretrained: str | os.PathLike[str] | None = None,
        decoder_channels: int = 256,
        backbone_width: int = 64,
    ) -> None:
        super().__init__()
        if len(dilations) != 3:
            raise ValueError(f"dilations must have 3 values, got {tuple(dilations)}")
        self.backbone = build_backbone(backbone, output_stride, backbone_width)
        if pretrained is not None:
            report = load_backbone_weights(self.backbone, pretrained)
            logger.info("loaded %d backbone tensors from %s", report.loaded, pretrained)

        # ASPP rates are defined for stride 16; at stride 8 the map is twice as large.
        rates = [d * 16 // output_stride for d in dilations]
        aspp_ch = self.backbone.high_channels // 8
        self.head = ASPP(self.backbone.high_channels, aspp_ch, rates)
        self.reduce = _conv_bn_relu(self.backbone.low_channels, _LOW_PROJ_CHANNELS, 1)
        self.fuse = nn.Sequential(
            *_conv_bn_relu(aspp_ch + _LOW_PROJ_CHANNELS, decoder_channels, 3),
            *_conv_bn_relu(decoder_channels, decoder_channels, 3),
        )
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1, bias=True)

    def _decode(self, c1: Tensor, c4: Tensor) -> Tensor:
        high = _resize(self.head(c4), c1.shape[-2:])
        feature = torch.cat([self.reduce(c1), high], dim=1)
        return self.classifier(self.fuse(feature))

    def forward(
        self, x: Tensor, n_perturb: int = 0, comp_drop: bool = False
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        check_forward_options(n_perturb, comp_drop)
        size = x.shape[-2:]
        c1, c4 = self.backbone(x)
        if comp_drop:
            keep_c1, keep_c4 = comp_drop_masks(
                c1.shape[0], [c1.shape[1], c4.shape[1]], device=c1.device, dtype=c1.dtype
            )
            c1 = c1 * keep_c1[:, :, None, None]
            c4 = c4 * keep_c4[:, :, None, None]
            return _resize(self._decode(c1, c4), size)
        if n_perturb == 0:
            return _resize(self._decode(c1, c4), size)

        def streams(feat: Tensor) -> Tensor:
            dropped = [F.dropout2d(feat, _PERTURB_DROPOUT, training=True) for _ in range(n_perturb)]
            return torch.cat([feat, *dropped])

        out = _resize(self._decode(streams(c1), streams(c4)), size)
        clean, *perturbed = out.chunk(n_perturb + 1)
        return clean, perturbed

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """``(backbone, everything else)`` for the two-learning-rate SGD groups."""
        backbone = list(self.backbone.parameters())
        backbone_ids = {id(p) for p in backbone}
        others = [p for p in self.parameters() if id(p) not in backbone_ids]
        return backbone, others
