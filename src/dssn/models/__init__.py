"""Segmentation networks and safe weight loading.

Each network is built from the config by the entry ``model.name`` names in ``MODELS``:
``deeplabv3plus`` (ResNet-v1c, the paper's) and ``dpt`` (DINOv2 + DPT, UniMatch V2's).
"""

from pathlib import Path

from torch import nn

from dssn.config import Config, ConfigError
from dssn.models.deeplabv3plus import DeepLabV3Plus
from dssn.models.dpt import DPT, DPT_BACKBONES
from dssn.models.norm import frozen_bn_statistics
from dssn.models.resnet import BACKBONES as RESNETS
from dssn.models.resnet import ResNet, build_backbone
from dssn.models.vit import PATCH_SIZE
from dssn.models.weights import (
    LoadReport,
    WeightsError,
    load_backbone_weights,
    load_state_dict_file,
    load_weights,
    weights_format,
)
from dssn.registry import MODELS

__all__ = [
    "MODELS",
    "build_model",
    "check_model_config",
    "check_pretrained",
    "DeepLabV3Plus",
    "DPT",
    "LoadReport",
    "ResNet",
    "WeightsError",
    "build_backbone",
    "frozen_bn_statistics",
    "load_backbone_weights",
    "load_state_dict_file",
    "load_weights",
]


# The backbones each built-in network takes.
_BACKBONES = {"deeplabv3plus": RESNETS, "dpt": DPT_BACKBONES}


def check_model_config(cfg: Config) -> None:
    """``ConfigError`` naming the keys when the built-in ``model.name`` cannot take the other
    ``model.*`` settings; cheap, so that training refuses before it writes anything."""
    m = cfg.model
    choices = _BACKBONES.get(m.name)
    if choices is not None and m.backbone not in choices:
        raise ConfigError(f"model.backbone '{m.backbone}' does not fit model.name '{m.name}'; "
                          f"it takes {', '.join(sorted(choices))}")
    if m.name == "deeplabv3plus" and m.lock_backbone:
        raise ConfigError("model.lock_backbone is for the DINOv2 encoders (model.name=dpt)")
    if m.name == "dpt":
        for key, size in (("data.crop_size", cfg.data.crop_size), ("eval.crop_size", cfg.eval.crop_size)):
            if size is not None and size < PATCH_SIZE:
                raise ConfigError(f"{key}={size} is smaller than the ViT's patch ({PATCH_SIZE} pixels); the DPT "
                                  f"network resizes sides that are not multiples of {PATCH_SIZE} to the nearest "
                                  f"multiple, so give at least {PATCH_SIZE} (e.g. {PATCH_SIZE * 37} = 37 patches)")


def check_pretrained(cfg: Config) -> None:
    """``ConfigError`` naming ``model.pretrained`` when it names no file, or a file that is not a
    PyTorch or safetensors weights file (a text file, an image); cheap, for before the run folder."""
    if cfg.model.pretrained is None:
        return
    path = Path(cfg.model.pretrained).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.pretrained: weights file '{path}' not found (set model.pretrained=null "
                          "to train from scratch)")
    try:
        weights_format(path)
    except WeightsError as err:
        raise ConfigError(f"model.pretrained: {err}") from None


def build_deeplabv3plus(cfg: Config) -> DeepLabV3Plus:
    check_model_config(cfg)
    m = cfg.model
    model = DeepLabV3Plus(cfg.data.num_classes, backbone=m.backbone, output_stride=m.output_stride,
                          dilations=m.dilations, pretrained=m.pretrained, decoder_channels=m.decoder_channels,
                          backbone_width=m.backbone_width)
    model.backbone.checkpoint_stages = m.checkpoint_backbone
    return model


def build_dpt(cfg: Config) -> DPT:
    check_model_config(cfg)
    m = cfg.model
    model = DPT(cfg.data.num_classes, backbone=m.backbone, registers=m.registers,
                pretrained=m.pretrained, feature_dropout=m.feature_dropout, lock_backbone=m.lock_backbone)
    model.backbone.checkpoint_blocks = m.checkpoint_backbone
    return model


MODELS.add("deeplabv3plus", build_deeplabv3plus)
MODELS.add("dpt", build_dpt)


def build_model(cfg: Config) -> nn.Module:
    """The network a ``dssn.config.Config`` describes."""
    return MODELS[cfg.model.name](cfg)


def unwrap(module: nn.Module) -> nn.Module:
    """The network inside DistributedDataParallel and ``torch.compile`` wrappers (clean names)."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif isinstance(getattr(module, "_orig_mod", None), nn.Module):  # torch.compile's wrapper
            module = module._orig_mod
        else:
            return module
