"""ResNet "v1c" backbone (deep 3x3 stem) for DeepLabV3+.

Module names follow the authors' release (UniMatch / DSSN), so their
ImageNet backbone files and full checkpoints load key for key:
``conv1.{0,1,3,4,6}``, ``bn1``, ``layer1..layer4`` with blocks named
``conv1/bn1/conv2/bn2[/conv3/bn3]/downsample.{0,1}``. There is no ``fc``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dssn.models.norm import frozen_bn_statistics

__all__ = ["BackboneFeatures", "BasicBlock", "Bottleneck", "ResNet", "build_backbone", "BACKBONES"]


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    # padding = dilation keeps the spatial size for stride 1 at any dilation.
    return nn.Conv2d(
        in_ch, out_ch, 3, stride=stride, padding=dilation, dilation=dilation, bias=False
    )


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs; used by the small resnet18/34 variants for CPU demos."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, dilation=dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 block with the stride on the 3x3 conv (the "v1.5"/"v1c" choice)."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class BackboneFeatures(NamedTuple):
    """The two feature maps DeepLabV3+ decodes."""

    c1: Tensor  # layer1 output, stride 4
    c4: Tensor  # layer4 output, stride output_stride


Block = type[BasicBlock] | type[Bottleneck]

# Which of (layer2, layer3, layer4) trade their stride for dilation.
_DILATE = {8: (False, True, True), 16: (False, False, True)}


class ResNet(nn.Module):
    """ResNet-v1c returning ``(c1, c4)``.

    Dilated stages follow the released code (torchvision convention): the
    first block of a dilated stage keeps the previous dilation and only the
    following blocks use the new one; its 1x1 downsample has stride 1.
    """

    def __init__(self, block: Block, layers: list[int], output_stride: int = 16, width: int = 64) -> None:
        """``width`` is the stem/layer1 width; 64 is the standard network, smaller ones
        scale every stage alike (for CPU demos and tests)."""
        super().__init__()
        if output_stride not in _DILATE:
            raise ValueError(f"output_stride must be one of {sorted(_DILATE)}, got {output_stride}")
        if width < 4:
            raise ValueError(f"width must be at least 4, got {width}")
        self.output_stride = output_stride
        self.low_channels = width * block.expansion
        self.high_channels = 8 * width * block.expansion

        self.conv1 = nn.Sequential(
            _conv3x3(3, width, stride=2),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            _conv3x3(width, width),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            _conv3x3(width, 2 * width),
        )
        self.bn1 = nn.BatchNorm2d(2 * width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        self._inplanes = 2 * width
        self._dilation = 1
        dilate2, dilate3, dilate4 = _DILATE[output_stride]
        self.layer1 = self._make_layer(block, width, layers[0], stride=1, dilate=False)
        self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2, dilate=dilate2)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], stride=2, dilate=dilate3)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], stride=2, dilate=dilate4)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(
        self, block: Block, planes: int, blocks: int, stride: int, dilate: bool
    ) -> nn.Sequential:
        first_dilation = self._dilation
        if dilate:
            self._dilation *= stride
            stride = 1
        out_ch = planes * block.expansion
        downsample = None
        if stride != 1 or self._inplanes != out_ch:
            downsample = nn.Sequential(
                _conv1x1(self._inplanes, out_ch, stride), nn.BatchNorm2d(out_ch)
            )
        modules = [block(self._inplanes, planes, stride, first_dilation, downsample)]
        self._inplanes = out_ch
        modules += [block(out_ch, planes, dilation=self._dilation) for _ in range(1, blocks)]
        return nn.Sequential(*modules)

    checkpoint_stages: bool = False
    """Activation checkpointing (``model.checkpoint_backbone``): in training with gradients, keep
    only each stage's input and recompute the stage during the backward pass."""

    def _stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward(self, x: Tensor) -> BackboneFeatures:
        if self.checkpoint_stages and self.training and torch.is_grad_enabled():
            stage = _checkpointed
        else:
            def stage(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
                return fn(x)
        c1 = stage(self.layer1, stage(self._stem, x))
        c4 = stage(self.layer4, stage(self.layer3, stage(self.layer2, c1)))
        return BackboneFeatures(c1, c4)


def _checkpointed(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``fn(x)`` under activation checkpointing, with the recomputation leaving batch-norm
    running statistics alone: a plain checkpoint would update them twice per step."""
    calls = 0

    def run(inp: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        if calls == 1:
            return fn(inp)
        owner = fn if isinstance(fn, nn.Module) else fn.__self__  # a stage, or the stem's method
        with frozen_bn_statistics(owner):  # the recomputation in backward
            return fn(inp)

    return checkpoint(run, x, use_reentrant=False)


BACKBONES: dict[str, tuple[Block, list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
}


def build_backbone(name: str, output_stride: int = 16, width: int = 64) -> ResNet:
    """Build a randomly initialised ResNet-v1c by name (resnet18/34/50/101)."""
    try:
        block, layers = BACKBONES[name]
    except KeyError:
        raise ValueError(
            f"unknown backbone {name!r}; valid names: {', '.join(BACKBONES)}"
        ) from None
    return ResNet(block, layers, output_stride=output_stride, width=width)
