"""Training methods: each turns a batch into losses for the engine.

``METHODS`` maps ``method.name`` to the class; a new method is its own file plus one line here.
"""

from __future__ import annotations

from torch import nn

from dssn.config import Config
from dssn.method.base import Batch, Method
from dssn.method.dssn import DSSN
from dssn.method.fixmatch import FixMatch
from dssn.method.supervised import Supervised
from dssn.method.unimatch_v2 import UniMatchV2
from dssn.registry import METHODS

__all__ = ["Batch", "Method", "DSSN", "FixMatch", "Supervised", "UniMatchV2", "METHODS", "build_method"]

METHODS.add("dssn", DSSN)
METHODS.add("fixmatch", FixMatch)
METHODS.add("unimatch_v2", UniMatchV2)
METHODS.add("supervised", Supervised)


def build_method(cfg: Config, student: nn.Module, iters_per_epoch: int) -> Method:
    """The method ``method.name`` names, training ``student``; ``iters_per_epoch`` for schedules
    counted in epochs (warm-up, the teacher's batch-norm schedule)."""
    return METHODS[cfg.method.name](student, cfg.method, cfg.train, iters_per_epoch)
