"""Where the reference outputs of official code live (``shared/reference/<name>``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor


def find_reference(name: str) -> Path | None:
    """``$DSSN_SHARED/reference/<name>``, else the first ``shared/reference/<name>`` beside a
    folder above this file (the main checkout and worktrees sit at different depths)."""
    if os.environ.get("DSSN_SHARED"):
        return Path(os.environ["DSSN_SHARED"]) / "reference" / name
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "shared" / "reference" / name
        if candidate.is_dir():
            return candidate
    return None


def reference_or_skip(name: str) -> Path:
    """The reference folder, or a clean skip saying how to point the tests at it."""
    found = find_reference(name)
    if found is None or not found.is_dir():
        pytest.skip(f"reference outputs of the official code not found: set DSSN_SHARED to the folder "
                    f"holding reference/{name}")
    return found


def reference_vectors(name: str) -> dict[str, Tensor]:
    """``reference/<name>/vectors.safetensors`` (tensors only, no pickle), or a clean skip."""
    return load_file(reference_or_skip(name) / "vectors.safetensors")


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads on a shared machine (autouse in the modules
    that import it)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
