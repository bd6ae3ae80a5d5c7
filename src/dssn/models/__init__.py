"""Segmentation networks and safe weight loading.

Each network is built from the config by the entry ``model.name`` names in ``MODELS``:
``deeplabv3plus`` (ResNet-v1c, the paper's) and ``dpt`` (DINOv2 or DINOv3 + DPT, UniMatch V2's).
``BACKBONES`` names the encoders each takes (``model.backbone``).
"""

from pathlib import Path

import torch
from torch import nn

from dssn.config import Config, ConfigError
from dssn.models.deeplabv3plus import DeepLabV3Plus
from dssn.models.dpt import DPT, DPT_BACKBONES
from dssn.models.norm import frozen_bn_statistics
from dssn.models.resnet import BACKBONES as RESNETS
from dssn.models.resnet import ResNet, build_backbone
from dssn.models.sources import is_remote
from dssn.models.vit import PATCH_SIZE, V3_PATCH_SIZE
from dssn.models.weights import (
    LoadReport,
    WeightsError,
    check_backbone_weights,
    load_backbone_weights,
    load_state_dict_file,
    load_weights,
    weights_format,
)
from dssn.registry import BACKBONES, MODELS

__all__ = [
    "BACKBONES",
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


def check_model_config(cfg: Config) -> None:
    """``ConfigError`` naming the keys when the built-in ``model.name`` cannot take the other
    ``model.*`` settings; cheap, so that training refuses before it writes anything."""
    m = cfg.model
    takes = [b for b in BACKBONES if BACKBONES[b] == m.name]  # empty: a network of the user's
    if takes and m.backbone not in takes:
        raise ConfigError(f"model.backbone '{m.backbone}' does not fit model.name '{m.name}'; "
                          f"it takes {', '.join(sorted(takes))}")
    if m.name == "deeplabv3plus" and m.lock_backbone:
        raise ConfigError("model.lock_backbone is for the DINOv2 and DINOv3 encoders (model.name=dpt)")
    if m.backbone.startswith("dinov3_") and m.registers:
        raise ConfigError(f"model.registers is DINOv2's; {m.backbone} has its own 4 storage tokens: "
                          "set model.registers=0")
    if m.rope_rescale is not None and not m.backbone.startswith("dinov3_"):
        raise ConfigError(f"model.rope_rescale is for the DINOv3 encoders; {m.backbone} has no RoPE")
    if m.name == "dpt":
        patch = V3_PATCH_SIZE if m.backbone.startswith("dinov3_") else PATCH_SIZE
        for key, size in (("data.crop_size", cfg.data.crop_size), ("eval.crop_size", cfg.eval.crop_size)):
            if size is not None and size < patch:
                raise ConfigError(f"{key}={size} is smaller than the ViT's patch ({patch} pixels); the DPT "
                                  f"network resizes sides that are not multiples of {patch} to the nearest "
                                  f"multiple, so give at least {patch} (e.g. {patch * 37} = 37 patches)")


def check_pretrained(cfg: Config) -> None:
    """Before the run folder exists: ``ConfigError`` naming ``model.pretrained`` when it names no
    file, or a file that is not PyTorch or safetensors weights (a text file, an image); a name, URL
    or ``hf:`` repository is fetched if not cached yet; for the built-in networks the weights are
    then checked against the backbone key for key, on the meta device (nothing allocated or copied)."""
    m = cfg.model
    if m.pretrained is None:
        return
    local = None if is_remote(m.pretrained) else Path(m.pretrained).expanduser()
    if local is not None and not local.exists():
        raise ConfigError(f"model.pretrained: weights file '{local}' not found (set model.pretrained=null "
                          "to train from scratch)")
    try:
        if m.name in ("deeplabv3plus", "dpt"):
            with torch.device("meta"):
                network = build_model(cfg.model_copy(update={"model": m.model_copy(update={"pretrained": None})}))
            check_backbone_weights(network.backbone, m.pretrained)
        elif local is not None and local.is_file() and not local.name.endswith(".index.json"):
            weights_format(local)  # a network of the user's: at least the file must be weights
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
                pretrained=m.pretrained, feature_dropout=m.feature_dropout, lock_backbone=m.lock_backbone,
                rope_rescale=m.rope_rescale)
    model.backbone.checkpoint_blocks = m.checkpoint_backbone
    return model


MODELS.add("deeplabv3plus", build_deeplabv3plus)
MODELS.add("dpt", build_dpt)
for _name in RESNETS:
    BACKBONES.add(_name, "deeplabv3plus")
for _name in DPT_BACKBONES:
    BACKBONES.add(_name, "dpt")


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
