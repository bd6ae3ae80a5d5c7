"""Segmentation network (DeepLabV3+ on ResNet-v1c) and safe weight loading."""

from torch import nn

from dssn.models.deeplabv3plus import DeepLabV3Plus
from dssn.models.dpt import DPT
from dssn.models.resnet import ResNet, build_backbone
from dssn.models.weights import (
    LoadReport,
    WeightsError,
    load_backbone_weights,
    load_state_dict_file,
    load_weights,
)

__all__ = [
    "build_model",
    "DeepLabV3Plus",
    "DPT",
    "LoadReport",
    "ResNet",
    "WeightsError",
    "build_backbone",
    "load_backbone_weights",
    "load_state_dict_file",
    "load_weights",
]


def build_model(cfg) -> DeepLabV3Plus:
    """The network a ``dssn.config.Config`` describes."""
    m = cfg.model
    model = DeepLabV3Plus(cfg.data.num_classes, backbone=m.backbone, output_stride=m.output_stride,
                          dilations=m.dilations, pretrained=m.pretrained, decoder_channels=m.decoder_channels,
                          backbone_width=m.backbone_width)
    model.backbone.checkpoint_stages = m.checkpoint_backbone
    return model


def unwrap(module: nn.Module) -> nn.Module:
    """The network inside DistributedDataParallel and ``torch.compile`` wrappers (clean names)."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif isinstance(getattr(module, "_orig_mod", None), nn.Module):  # torch.compile's wrapper
            module = module._orig_mod
        else:
            return module
