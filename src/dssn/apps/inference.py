"""Networks ready for inference, from any weights file dssn understands.

- a dssn checkpoint (``last.pt``, ``best.pt``, ``checkpoints/step-N.pt``): every
  network in it (``student``, ``teacher``), its config, class names and palette;
- a released ``.pth`` (the authors' DSSN or UniMatch files: a state dict, possibly
  under ``model``/``state_dict`` and with DDP ``module.`` prefixes): one network,
  ``model``; ``--config`` says what it is;
- a ``.safetensors`` file from ``dssn export``: one network, its config, class names
  and palette in the file's metadata (or its config in the YAML beside it).

Everything is read with ``weights_only=True`` (or safetensors, which holds tensors
only); a file that needs arbitrary unpickling is refused with the reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from dssn.config import Config, build_config, deep_merge, load_config, parse_overrides
from dssn.data import class_names_for, palette_for
from dssn.engine.checkpoint import is_dssn_checkpoint, read_torch_file
from dssn.engine.runtime import resolve_device
from dssn.errors import DssnError
from dssn.models import build_model
from dssn.models.weights import load_state_dict, unwrap_state_dict

SAFETENSORS_SUFFIX = ".safetensors"


class InferenceError(DssnError, ValueError):
    """The weights file or the choice of network cannot be used; the message says why."""


@dataclass
class InferenceModels:
    cfg: Config
    models: dict[str, nn.Module]
    """In eval mode, on ``device``: ``student``/``teacher`` (dssn checkpoints) or ``model``."""
    class_names: list[str]
    palette: list[int]
    """Flat RGB, 768 values (256 colours)."""
    device: torch.device
    source: str

    def pick(self, name: str | None = None) -> tuple[str, nn.Module]:
        """The network called ``name``; by default the teacher when there is one (usually the better)."""
        if name is None:
            name = "teacher" if "teacher" in self.models else next(iter(self.models))
        if name not in self.models:
            raise InferenceError(f"{self.source} has no '{name}' network; it has: {', '.join(self.models)}")
        return name, self.models[name]


def _config(source: str, embedded: dict[str, Any] | None, config: str | None,
            overrides: list[str] | None) -> Config:
    """``--config`` wins; else the config the file carries; overrides on top of either."""
    if config is not None:
        cfg = load_config(config, overrides)
    elif embedded is not None:
        cfg = build_config(deep_merge(embedded, parse_overrides(overrides or [])), f"{source} config")
    else:
        raise InferenceError(f"'{source}' carries no config; say what network it holds with "
                             "--config PRESET_OR_YAML (e.g. --config pascal model.backbone=resnet50)")
    # ImageNet weights only matter for training: the file being loaded replaces them.
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"pretrained": None})})


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        from safetensors import SafetensorError, safe_open  # the optional [export] extra
    except ImportError:
        raise InferenceError(f"reading {path} needs the safetensors package: pip install 'dssn[export]'") from None
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise InferenceError(f"{path} cannot be read as a safetensors file: {err}") from None


def load_for_inference(checkpoint: str | Path, config: str | None = None, overrides: list[str] | None = None,
                       device: torch.device | str | None = None) -> InferenceModels:
    """Build the network(s) in ``checkpoint`` (see the module doc) in eval mode on ``device``
    (default: ``train.device`` of the config, ``auto`` = CUDA when available)."""
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    source = str(path)
    class_names: list[str] | None = None
    palette: list[int] | None = None
    states: dict[str, dict[str, torch.Tensor]]
    if path.suffix == SAFETENSORS_SUFFIX:
        tensors, meta = _read_safetensors(path)
        embedded = json.loads(meta["dssn_config"]) if "dssn_config" in meta else None
        beside = path.with_suffix(".yaml")
        if embedded is None and beside.is_file():
            embedded = yaml.safe_load(beside.read_text())
        cfg = _config(source, embedded, config, overrides)
        class_names = json.loads(meta["class_names"]) if "class_names" in meta else None
        palette = json.loads(meta["palette"]) if "palette" in meta else None
        states = {meta.get("network", "model"): tensors}
    else:
        obj = read_torch_file(path)
        if is_dssn_checkpoint(obj):
            cfg = _config(source, obj.get("config"), config, overrides)
            class_names, palette = obj.get("class_names"), obj.get("palette")
            states = dict(obj["models"])
        else:
            cfg = _config(source, None, config, overrides)
            states = {"model": unwrap_state_dict(obj, path)}

    dev = torch.device(device) if device is not None else resolve_device(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    models: dict[str, nn.Module] = {}
    for name, state in states.items():
        model = build_model(cfg)
        load_state_dict(model, state, f"{source} ({name})")  # strict: every key must line up
        models[name] = model.to(dev).eval()
    if class_names is None:
        class_names = class_names_for(cfg)
    if palette is None:
        palette = palette_for(cfg)
    if len(class_names) != cfg.data.num_classes:
        raise InferenceError(f"{source}: {len(class_names)} class names for data.num_classes={cfg.data.num_classes}")
    return InferenceModels(cfg, models, list(class_names), list(palette), dev, source)
