"""Loading released checkpoints and ImageNet backbones, safely and loudly.

Files are read with ``weights_only=True`` so a checkpoint can never run code,
and every key that does not line up is reported (or raised), never dropped
silently.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from dssn.errors import DssnError
from dssn.models.hf_layout import convert_transformers, is_transformers_layout
from dssn.models.sources import is_remote, resolve_weights

__all__ = [
    "LoadReport",
    "WeightsError",
    "check_backbone_weights",
    "load_backbone_weights",
    "load_state_dict",
    "load_state_dict_file",
    "load_weights",
    "read_safetensors",
    "unpickling_refusal",
    "unwrap_state_dict",
    "weights_format",
]

logger = logging.getLogger(__name__)

# The files a transformers model folder holds its weights in, by preference.
_FOLDER_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
# Keys under which training scripts commonly nest the model's state dict.
_WRAPPER_KEYS = ("model", "state_dict", "student")
_DDP_PREFIX = "module."
_BACKBONE_PREFIX = "backbone."
_MAX_LISTED = 10

ShapePair = tuple[tuple[int, ...], tuple[int, ...]]


class WeightsError(DssnError, RuntimeError):
    """A weights file cannot be read safely or does not fit the model."""


@dataclass
class LoadReport:
    """What a load did, so nothing that failed to line up goes unnoticed.

    ``missing``: model keys absent from the file; ``unexpected``: file keys
    the model does not have; ``loaded``: tensors copied; ``mismatched``: key ->
    ``(shape in file, shape in model)``; ``ignored``: file keys dropped on
    purpose (e.g. an ImageNet ``fc``).
    """

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    loaded: int = 0
    mismatched: dict[str, ShapePair] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every key matched in name and shape."""
        return not (self.missing or self.unexpected or self.mismatched)


def unpickling_refusal(err: Exception) -> tuple[str, bool]:
    """torch's one-line reason out of its long weights-only error, and whether it refused a pickled
    Python object (it names a "global" from torch 2.4 on, a "class" before) rather than bytes that
    are no pickle at all (e.g. "Unsupported operand")."""
    match = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(err))
    reason = match.group(1).split(". ")[0].strip() if match else str(err)
    return reason, any(word in reason.lower() for word in ("global", "class"))


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6
_PICKLE_PROTOCOL = 0x80  # the legacy torch.save format: a pickle, protocol 2 or higher


def weights_format(path: str | os.PathLike[str]) -> str:
    """``"torch"`` or ``"safetensors"`` from the file's first bytes; ``WeightsError`` naming the
    file for anything else (text, an image, an empty file), before any parser sees it."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            head = f.read(16)
    except OSError as err:
        raise WeightsError(f"weights file {path} cannot be read: {err.strerror or err}") from None
    if head.startswith(_ZIP_MAGIC) or (len(head) > 1 and head[0] == _PICKLE_PROTOCOL and head[1] >= 2):
        return "torch"
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:
        return "safetensors"
    shown = head[:8].decode("ascii", errors="replace") if head else "nothing (an empty file)"
    raise WeightsError(f"{path} is neither a PyTorch weights file (.pth/.pt, as torch.save writes them) nor a "
                       f"safetensors file: it starts with {shown!r}")


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a state dict safely, unwrapping ``{"model": ...}`` and DDP ``module.`` prefixes.

    ``path`` is a PyTorch file (``.pth``, ``.pt``, ``.bin``; read with ``weights_only=True``), a
    ``.safetensors`` file, a sharded ``*.index.json``, or a ``transformers`` model folder
    (``model.safetensors``, else ``pytorch_model.bin``, or their sharded indexes). A released
    file's name, a URL or ``hf:<org>/<repo>`` is fetched first (:mod:`dssn.models.sources`)."""
    if is_remote(path):
        path = resolve_weights(path)
    path = Path(path)
    if path.is_dir():
        found = next((path / name for name in _FOLDER_FILES if (path / name).is_file()), None)
        if found is None:
            raise WeightsError(f"{path} is a folder without weights: expected one of {', '.join(_FOLDER_FILES)}")
        path = found
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.name.endswith(".index.json"):
        return _read_shards(path)
    if weights_format(path) == "safetensors":
        return unwrap_state_dict(read_safetensors(path)[0], path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason, foreign_object = unpickling_refusal(err)
        if not foreign_object:
            raise WeightsError(f"{path} is not a PyTorch weights file ({reason})") from None
        raise WeightsError(
            f"{path} contains pickled Python objects that cannot be loaded safely "
            f"({reason}). Re-save it as a plain state dict from trusted code, "
            f"e.g. torch.save(obj['model'], 'plain.pth')."
        ) from None
    except Exception as err:  # noqa: BLE001 (a damaged file fails anywhere in torch's readers: KeyError, zip, ...)
        raise WeightsError(
            f"{path} could not be read as a PyTorch weights file ({type(err).__name__}: {err})"
        ) from None

    return unwrap_state_dict(obj, path)


def read_safetensors(
    path: str | os.PathLike[str], extra: str = "safetensors"
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and the metadata of a ``.safetensors`` file; ``WeightsError`` naming the file if
    it cannot be read, or naming ``extra`` (what to ``pip install``) if the package is missing."""
    try:
        from safetensors import SafetensorError, safe_open  # an optional extra: only these files need it
    except ImportError:
        raise WeightsError(f"reading {path} needs the safetensors package: pip install {extra}") from None
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise WeightsError(f"{path} cannot be read as a safetensors file: {err}") from None


def _read_shards(index: Path) -> dict[str, Tensor]:
    """The tensors of a sharded checkpoint, from the shards its ``weight_map`` names."""
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise WeightsError(f"{index}: not a shard index with a 'weight_map' ({err})") from None
    state: dict[str, Tensor] = {}
    for shard in shards:
        state.update(load_state_dict_file(index.parent / shard))
    return state


def unwrap_state_dict(obj: object, path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The state dict inside a loaded file: under ``model``/``state_dict``/``student`` or at the
    top level, DDP ``module.`` prefixes removed. ``path`` only names the file in errors."""
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, expected a state dict")
    for key in _WRAPPER_KEYS:
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break

    state: dict[str, Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, Tensor):
            raise WeightsError(
                f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; "
                f"expected a state dict (optionally under one of {_WRAPPER_KEYS})"
            )
        state[str(key).removeprefix(_DDP_PREFIX)] = value
    return state


def _listing(title: str, items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    rest = len(items) - _MAX_LISTED
    return f"{title} ({len(items)}): {shown}" + (f" ... and {rest} more" if rest > 0 else "")


def _describe(report: LoadReport) -> str:
    parts = []
    if report.missing:
        parts.append(_listing("missing keys", report.missing))
    if report.unexpected:
        parts.append(_listing("unexpected keys", report.unexpected))
    if report.mismatched:
        shapes = [
            f"{k} (file {list(a)} vs model {list(b)})" for k, (a, b) in report.mismatched.items()
        ]
        parts.append(_listing("shape mismatches", shapes))
    return "; ".join(parts)


def _compare(
    module: nn.Module, state: Mapping[str, Tensor]
) -> tuple[LoadReport, dict[str, Tensor]]:
    """Sort file keys against the module's; return the report and the loadable subset.

    Done before touching the module so a strict load fails without a partial copy,
    and so shape errors are ours (by key, both shapes) rather than torch's.
    """
    own = module.state_dict()
    report = LoadReport(
        missing=[k for k in own if k not in state],
        unexpected=[k for k in state if k not in own],
    )
    matching: dict[str, Tensor] = {}
    for key, value in state.items():
        if key not in own:
            continue
        if value.shape != own[key].shape:
            report.mismatched[key] = (tuple(value.shape), tuple(own[key].shape))
        else:
            matching[key] = value
    return report, matching


def _apply(module: nn.Module, matching: dict[str, Tensor], report: LoadReport) -> LoadReport:
    # Every mismatch is already in the report; torch only copies here.
    module.load_state_dict(matching, strict=False)
    report.loaded = len(matching)
    return report


def load_weights(
    model: nn.Module, path: str | os.PathLike[str], strict: bool = True
) -> LoadReport:
    """Load a full-model checkpoint (e.g. the authors' released ``.pth``).

    With ``strict`` any missing, unexpected or mis-shaped key raises
    :class:`WeightsError` before anything is copied. Without it the matching
    tensors are loaded and the rest are logged and listed in the report.
    A ``transformers``-layout DINO encoder (any form :func:`load_state_dict_file` reads) is
    converted to the official names of ``model`` (an encoder) or of ``model.backbone``.
    """
    state = load_state_dict_file(path)
    if is_transformers_layout(state):
        encoder = getattr(model, "backbone", model)
        prefix = "" if encoder is model else _BACKBONE_PREFIX
        state, _ = _from_transformers(state, encoder, path)
        state = {prefix + k: v for k, v in state.items()}
    return load_state_dict(model, state, path, strict)


def _from_transformers(
    state: Mapping[str, Tensor], encoder: nn.Module, path: str | os.PathLike[str]
) -> tuple[dict[str, Tensor], list[str]]:
    """The official names of a ``transformers``-layout state, logged; and the keys left out."""
    converted, info = convert_transformers(state, encoder.state_dict())
    logger.info("%s: transformers layout found; %s", path, info.summary())
    return converted, info.left_out


def load_state_dict(
    model: nn.Module, state: Mapping[str, Tensor], where: str | os.PathLike[str], strict: bool = True
) -> LoadReport:
    """:func:`load_weights` for a state dict already in memory (``where`` names it in messages)."""
    report, matching = _compare(model, state)
    if not report.ok:
        if strict:
            raise WeightsError(f"{where} does not match the model: {_describe(report)}")
        logger.warning("partial load from %s: %s", where, _describe(report))
    return _apply(model, matching, report)


def load_backbone_weights(backbone: nn.Module, path: str | os.PathLike[str]) -> LoadReport:
    """Load ImageNet weights (or a DINO encoder) in the released naming into a backbone.

    Keys may carry a ``backbone.`` prefix (then all other keys, e.g. a
    segmentation head, are ignored). A ``transformers``-layout DINO encoder is
    converted to the official names first (:mod:`dssn.models.hf_layout`; a task
    model's head is ignored). The ImageNet classifier ``fc.*`` is
    dropped on purpose. Both show up in ``report.ignored``. Any other
    mismatch raises :class:`WeightsError`, except missing BN
    ``num_batches_tracked`` counters, which older files lack and which do
    not affect the network (they stay listed in ``report.missing``).
    """
    report, matching, layout = _backbone_state(backbone, path)
    if report.ignored:
        logger.info("ignored %d keys from %s: %s", len(report.ignored), path, _listing("keys", report.ignored))
    logger.info("%s: %s; %d tensors loaded", path, layout, len(matching))
    return _apply(backbone, matching, report)


def check_backbone_weights(backbone: nn.Module, path: str | os.PathLike[str]) -> LoadReport:
    """What :func:`load_backbone_weights` would load, raising as it would, without copying (the
    backbone may be on the meta device): so that training can refuse a file before it makes a
    run folder. A name or URL is downloaded here."""
    return _backbone_state(backbone, path)[0]


def _backbone_state(
    backbone: nn.Module, path: str | os.PathLike[str]
) -> tuple[LoadReport, dict[str, Tensor], str]:
    state = load_state_dict_file(path)
    ignored: list[str] = []
    layout = "official names"
    if is_transformers_layout(state):
        state, ignored = _from_transformers(state, backbone, path)
        layout = "transformers layout, converted"
    elif any(k.startswith(_BACKBONE_PREFIX) for k in state):
        ignored += [k for k in state if not k.startswith(_BACKBONE_PREFIX)]
        state = {
            k.removeprefix(_BACKBONE_PREFIX): v
            for k, v in state.items()
            if k.startswith(_BACKBONE_PREFIX)
        }
    ignored += [k for k in state if k.startswith("fc.")]
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}

    report, matching = _compare(backbone, state)
    report.ignored = ignored
    serious_missing = [k for k in report.missing if not k.endswith("num_batches_tracked")]
    if serious_missing or report.unexpected or report.mismatched:
        raise WeightsError(f"{path} does not match the backbone: {_describe(report)}")
    return report, matching, layout
