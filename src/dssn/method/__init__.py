"""Training methods: each turns a batch into losses for the engine."""

from __future__ import annotations

from torch import nn

from dssn.config import Config
from dssn.method.base import Batch, Method
from dssn.method.dssn import DSSN
from dssn.method.fixmatch import FixMatch
from dssn.method.supervised import Supervised
from dssn.method.unimatch_v2 import UniMatchV2

__all__ = ["Batch", "Method", "DSSN", "FixMatch", "Supervised", "UniMatchV2", "METHODS", "build_method"]

METHODS: dict[str, type[Method]] = {"dssn": DSSN, "fixmatch": FixMatch, "unimatch_v2": UniMatchV2,
                                     "supervised": Supervised}


def build_method(cfg: Config, student: nn.Module, iters_per_epoch: int) -> Method:
    name = cfg.method.name
    if name == "dssn":
        return DSSN(student, cfg.method, cfg.train, iters_per_epoch)
    if name == "fixmatch":
        return FixMatch(student, cfg.method, cfg.train)
    if name == "unimatch_v2":
        return UniMatchV2(student, cfg.method, cfg.train)
    if name == "supervised":
        return Supervised(student, cfg.train)
    raise ValueError(f"unknown method '{name}'")
