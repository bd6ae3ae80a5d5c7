"""Checkpoints: written atomically, read without unpickling arbitrary objects.

A training checkpoint is a plain dict of tensors, numbers, strings, lists and
dicts (so ``torch.load(weights_only=True)`` reads it) holding everything a run
needs to continue exactly where it stopped: every network's state, the
optimizer, the step (which fixes the schedule and the data position), the best
score so far and every random generator's state.

Layout of a run folder::

    config.yaml
    last.pt                      newest checkpoint (a hard link to the newest step file)
    best.pt                      checkpoint with the best validation mIoU
    checkpoints/step-00001000.pt the last ``train.keep_last`` periodic / epoch-end checkpoints

Every file is written under a temporary name (``.NAME.XXXX.tmp``), flushed to
disk, then renamed, so a crash or SIGKILL at any moment leaves either the old
file or the new one. Temporary names are never taken for checkpoints.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dssn.errors import DssnError
from dssn.files import atomic_path
from dssn.models.weights import WeightsError, unpickling_refusal, weights_format

FORMAT = "dssn-checkpoint-2"
"""The checkpoint layout; it holds the RNG states and the run history an exact resume needs."""
LAST = "last.pt"
BEST = "best.pt"
CHECKPOINTS_DIR = "checkpoints"
_STEP_FILE = re.compile(r"^step-(\d+)\.pt$")


class CheckpointError(DssnError, RuntimeError):
    """A checkpoint cannot be read or written; the message names the file and why."""


# ---------------------------------------------------------------------------------- writing


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through a temporary file flushed to disk and renamed: a crash at any
    moment leaves the old file or the new one, never a partial file under the final name."""
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        torch.save(obj, f)


def atomic_link(src: Path, dst: Path) -> None:
    """Make ``dst`` name the same file as ``src`` (hard link, renamed into place; a copy
    where the file system has no hard links). Never leaves a partial ``dst``."""
    with atomic_path(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def step_files(run_dir: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the periodic checkpoints, oldest first (temporary files excluded)."""
    folder = Path(run_dir) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_FILE.match(p.name)) and p.is_file()]
    return sorted(found)


def save_checkpoint(run_dir: Path, state: dict[str, Any], keep_last: int, best: bool = False) -> Path:
    """Write ``state`` as the run's newest checkpoint and return its path.

    With ``keep_last > 0`` the state is written once to ``checkpoints/step-N.pt``;
    ``last.pt`` (and ``best.pt`` when ``best``) are hard links to it, and only the
    newest ``keep_last`` step files are kept. With ``keep_last == 0`` only
    ``last.pt`` (and ``best.pt``) are written.
    """
    run_dir = Path(run_dir)
    if keep_last > 0:
        path = run_dir / CHECKPOINTS_DIR / f"step-{int(state['step']):08d}.pt"
        atomic_save(state, path)
        atomic_link(path, run_dir / LAST)
    else:
        path = run_dir / LAST
        atomic_save(state, path)
    if best:
        atomic_link(path, run_dir / BEST)
    if keep_last > 0:
        for _, old in step_files(run_dir)[:-keep_last]:
            old.unlink(missing_ok=True)
    return path


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete temporary files a killed run left behind (``.NAME.XXXX.tmp``); returns them."""
    removed = []
    for folder in (Path(run_dir), Path(run_dir) / CHECKPOINTS_DIR):
        if folder.is_dir():
            for p in folder.iterdir():
                if p.is_file() and p.name.startswith(".") and p.name.endswith(".tmp") and ".pt." in p.name:
                    p.unlink(missing_ok=True)
                    removed.append(p)
    return removed


# ---------------------------------------------------------------------------------- reading


def read_torch_file(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` with every failure turned into one clear message.

    A file that needs arbitrary unpickling (pickled classes or functions) is
    refused, never executed; a truncated or foreign file says so.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    not_torch = (f"{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle that torch.load "
                 "can read)")
    try:
        weights_format(path)  # by its first bytes: no parser sees a text file or an image
    except WeightsError:
        raise CheckpointError(not_torch) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason, foreign_object = unpickling_refusal(err)
        reason = reason.splitlines()[0]
        if not foreign_object:
            raise CheckpointError(f"{path} is not a PyTorch checkpoint ({reason})") from None
        raise CheckpointError(
            f"{path} contains pickled Python objects, which could run arbitrary code when loaded, so it "
            f"is refused ({reason}). If you trust it, re-save its tensors as a plain state dict, e.g. "
            f"torch.save(obj['model'], 'plain.pth')") from None
    except KeyError:  # the unpickler meeting bytes that are no pickle opcode
        raise CheckpointError(not_torch) from None
    except Exception as err:  # noqa: BLE001 (a damaged file fails anywhere in torch's readers: IndexError, ...)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} cannot be read as a checkpoint (truncated or damaged?): {first}") from None


def is_dssn_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and str(obj.get("format", "")).startswith("dssn-checkpoint") and "models" in obj


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a dssn checkpoint (tensors, numbers, strings, lists and dicts only)."""
    obj = read_torch_file(path)
    if not is_dssn_checkpoint(obj):
        raise CheckpointError(f"{path} is not a dssn training checkpoint (no 'format'/'models' entries)")
    return obj


def find_resume_checkpoint(run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest readable checkpoint of a run folder, or None if it holds none.

    Candidates are ``last.pt`` and ``checkpoints/step-N.pt`` (temporary files never
    count). A step file newer than ``last.pt`` wins (a crash between writing it and
    linking ``last.pt``). Unreadable candidates are renamed ``*.unreadable`` with a
    warning, so the next newest is used; if every candidate is unreadable, a
    ``CheckpointError`` lists them.
    """
    run_dir = Path(run_dir)
    failures: list[tuple[Path, str]] = []

    def attempt(path: Path) -> dict[str, Any] | None:
        try:
            return load_checkpoint(path)
        except CheckpointError as err:
            failures.append((path, str(err)))
            return None

    found: tuple[Path, dict[str, Any]] | None = None
    last = run_dir / LAST
    if last.is_file() and (state := attempt(last)) is not None:
        found = (last, state)
    for step, path in reversed(step_files(run_dir)):
        if found is not None and step <= int(found[1]["step"]):
            break
        if (state := attempt(path)) is not None:
            found = (path, state)
            break
    if found is None and failures:
        raise CheckpointError(f"run folder '{run_dir}' holds checkpoints but none can be read:\n  "
                              + "\n  ".join(message for _, message in failures)
                              + "\nMove them away to start the run over, or choose another run_dir.")
    if failures:
        for bad, _ in failures:
            if bad.is_file():
                bad.rename(bad.with_name(bad.name + ".unreadable"))
        warnings.warn("skipped unreadable checkpoint(s), renamed *.unreadable: "
                      + "; ".join(message for _, message in failures), stacklevel=2)
    return found


# ---------------------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) generator states as tensors and plain values."""
    version, internal, gauss = random.getstate()
    key, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"key": str(key), "state": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["key"], npy["state"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = list(state["cuda"])
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            warnings.warn(f"the checkpoint holds {len(cuda)} CUDA generator states but {torch.cuda.device_count()} "
                          "devices are visible; CUDA random streams are not restored", stacklevel=2)


def state_nbytes(*state_dicts: dict[str, Any]) -> int:
    """Bytes of every tensor in (nested) state dicts: an estimate of a checkpoint's size."""
    total = 0

    def walk(obj: Any) -> None:
        nonlocal total
        if isinstance(obj, torch.Tensor):
            total += obj.numel() * obj.element_size()
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    for sd in state_dicts:
        walk(sd)
    return total
