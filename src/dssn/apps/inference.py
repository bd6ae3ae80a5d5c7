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

Which network to use (:func:`choose_network`, the one rule of ``dssn.load``, ``dssn predict``
and ``dssn export``): by default (``auto``) the one that scored best on the checkpoint's last
evaluation; a file with one network, that one; a checkpoint without scores, the teacher.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from dssn.config import Config, build_config, load_config, merge_layers, parse_overrides, upgrade_saved
from dssn.constants import NETWORK_CHOICES
from dssn.data import class_names_for, palette_for
from dssn.engine.checkpoint import is_dssn_checkpoint, read_torch_file
from dssn.engine.runtime import resolve_device
from dssn.errors import DssnError
from dssn.models import build_model
from dssn.models.weights import WeightsError, load_state_dict, read_safetensors, unwrap_state_dict

SAFETENSORS_SUFFIX = ".safetensors"
AUTO = NETWORK_CHOICES[0]
ONLY_NETWORK = "the only network in the file"

_CONFIG_HINTS = {
    "cli": "--config PRESET_OR_YAML (e.g. --config pascal model.backbone=resnet50)",
    "python": "config=PRESET_OR_YAML (e.g. dssn.load(path, config='pascal', "
              "overrides=['model.backbone=resnet50']))",
}


class InferenceError(DssnError, ValueError):
    """The weights file or the choice of network cannot be used; the message says why."""


@dataclass(frozen=True)
class NetworkChoice:
    name: str
    reason: str
    """Why this network, for messages: ``"best mIoU on the last evaluation: ..."``, ``"as asked"``..."""

    def describe(self) -> str:
        return f"the {self.name} ({self.reason})"


def choose_network(available: Sequence[str], scores: Mapping[str, float], requested: str | None = AUTO,
                   source: str = "the file") -> NetworkChoice:
    """The network to use among ``available`` (the names in a weights file).

    ``requested`` ``student``/``teacher``/``model`` takes that network (an error if the file
    lacks it). ``auto`` (or None) takes the only network of a one-network file, else the one
    with the highest mIoU in ``scores`` (the checkpoint's last evaluation, percent; a tie goes to
    the teacher), else, when not every network was scored, the teacher (usually the better).
    """
    names = list(available)
    if not names:
        raise InferenceError(f"{source} holds no network")
    if requested is None:
        requested = AUTO
    if requested != AUTO:
        if requested not in names:
            raise InferenceError(f"{source} has no '{requested}' network; it has: {', '.join(names)} "
                                 f"(or choose '{AUTO}')")
        return NetworkChoice(requested, "as asked")
    if len(names) == 1:
        return NetworkChoice(names[0], ONLY_NETWORK)
    scored = {n: float(scores[n]) for n in names if n in scores and not math.isnan(float(scores[n]))}
    fallback = "teacher" if "teacher" in names else names[0]
    if len(scored) < len(names):
        return NetworkChoice(fallback, f"the file holds no evaluation scores for {', '.join(names)}; "
                                       f"the {fallback} is usually the better")
    # Highest mIoU; on a tie the fallback (the teacher) comes first.
    best = max(names, key=lambda n: (scored[n], n == fallback))
    listed = ", ".join(f"{n} {scored[n]:.2f}" for n in sorted(names, key=lambda n: n != best))
    return NetworkChoice(best, f"best mIoU on the last evaluation: {listed}")


def evaluation_scores(summary: Any) -> dict[str, float]:
    """``{network: mIoU}`` from a checkpoint's ``eval`` entry (``{name: {"miou": ...}}``); {} if absent."""
    if not isinstance(summary, Mapping):
        return {}
    return {str(name): float(s["miou"]) for name, s in summary.items()
            if isinstance(s, Mapping) and isinstance(s.get("miou"), (int, float))}


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
    scores: dict[str, float] = field(default_factory=dict)
    """mIoU (percent) per network on the checkpoint's last evaluation; empty when the file has none."""

    def choose(self, requested: str | None = AUTO) -> NetworkChoice:
        """Which network ``requested`` means for this file (:func:`choose_network`)."""
        return choose_network(list(self.models), self.scores, requested, self.source)

    def pick(self, requested: str | None = AUTO) -> tuple[str, nn.Module]:
        """``(name, network)`` for ``requested`` (:func:`choose_network`; default ``auto``)."""
        name = self.choose(requested).name
        return name, self.models[name]


def _config(source: str, embedded: dict[str, Any] | None, config: str | None,
            overrides: list[str] | None, hint: str = "cli") -> Config:
    """``config`` wins; else the config the file carries; overrides on top of either."""
    if config is not None:
        cfg = load_config(config, overrides)
    elif embedded is not None:
        cfg = build_config(merge_layers(upgrade_saved(embedded), parse_overrides(overrides or [])), f"{source} config")
    else:
        raise InferenceError(f"'{source}' carries no config; say what network it holds with {_CONFIG_HINTS[hint]}")
    # ImageNet weights only matter for training: the file being loaded replaces them.
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"pretrained": None})})


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        return read_safetensors(path, extra="'dssn[export]'")
    except WeightsError as err:
        raise InferenceError(str(err)) from None


def load_for_inference(checkpoint: str | Path, config: str | None = None, overrides: list[str] | None = None,
                       device: torch.device | str | None = None, *, config_hint: str = "cli") -> InferenceModels:
    """Build the network(s) in ``checkpoint`` (see the module doc) in eval mode on ``device``
    (default: ``train.device`` of the config; ``auto`` = CUDA when available).

    ``config_hint`` (``cli`` or ``python``): how the error for a file without a config says
    to give one (``--config`` or ``config=``)."""
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    source = str(path)
    class_names: list[str] | None = None
    palette: list[int] | None = None
    states: dict[str, dict[str, torch.Tensor]]
    scores: dict[str, float] = {}
    if path.suffix == SAFETENSORS_SUFFIX:
        tensors, meta = _read_safetensors(path)
        embedded = json.loads(meta["dssn_config"]) if "dssn_config" in meta else None
        beside = path.with_suffix(".yaml")
        if embedded is None and beside.is_file():
            embedded = yaml.safe_load(beside.read_text())
        cfg = _config(source, embedded, config, overrides, config_hint)
        class_names = json.loads(meta["class_names"]) if "class_names" in meta else None
        palette = json.loads(meta["palette"]) if "palette" in meta else None
        states = {meta.get("network", "model"): tensors}
    else:
        obj = read_torch_file(path)
        if is_dssn_checkpoint(obj):
            cfg = _config(source, obj.get("config"), config, overrides, config_hint)
            class_names, palette = obj.get("class_names"), obj.get("palette")
            states = dict(obj["models"])
            scores = evaluation_scores(obj.get("eval"))
        else:
            cfg = _config(source, None, config, overrides, config_hint)
            states = {"model": unwrap_state_dict(obj, path)}

    dev = resolve_device(str(device) if device is not None else cfg.train.device)
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
    return InferenceModels(cfg, models, list(class_names), list(palette), dev, source, scores)
