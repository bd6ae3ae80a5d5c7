"""Loading released checkpoints and ImageNet backbones, safely and loudly.

Files are read with ``weights_only=True`` so a checkpoint can never run code,
and every key that does not line up is reported (or raised), never dropped
silently.
"""

from __future__ import annotations

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

__all__ = [
    "LoadReport",
    "WeightsError",
    "load_backbone_weights",
    "load_state_dict",
    "load_state_dict_file",
    "load_weights",
    "unwrap_state_dict",
    "weights_format",
]

logger = logging.getLogger(__name__)

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


def _unpickling_reason(err: Exception) -> str:
    """Pull torch's one-line reason out of its long weights-only error."""
    match = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(err))
    return match.group(1).split(". ")[0].strip() if match else str(err)


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
    """Read a state dict safely, unwrapping ``{"model": ...}`` and DDP ``module.`` prefixes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if weights_format(path) != "torch":
        raise WeightsError(f"{path} is a safetensors file; this reads PyTorch weights files (.pth/.pt)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = _unpickling_reason(err)
        # torch names the offending object "global" (>= 2.4) or "class" (older);
        # anything else (e.g. "Unsupported operand") means the file is not a pickle at all.
        if not any(word in reason.lower() for word in ("global", "class")):
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
    """
    return load_state_dict(model, load_state_dict_file(path), path, strict)


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
    """Load ImageNet weights in the released naming into a backbone.

    Keys may carry a ``backbone.`` prefix (then all other keys, e.g. a
    segmentation head, are ignored). The ImageNet classifier ``fc.*`` is
    dropped on purpose. Both show up in ``report.ignored``. Any other
    mismatch raises :class:`WeightsError`, except missing BN
    ``num_batches_tracked`` counters, which older files lack and which do
    not affect the network (they stay listed in ``report.missing``).
    """
    state = load_state_dict_file(path)
    ignored: list[str] = []
    if any(k.startswith(_BACKBONE_PREFIX) for k in state):
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
    if ignored:
        logger.info("ignored %d keys from %s: %s", len(ignored), path, _listing("keys", ignored))
    return _apply(backbone, matching, report)
