"""The batch plan: how a run's global batch is split over the processes it has.

A preset fixes the paper's *global* batch (``train.global_batch`` labeled +
``train.global_batch_unlabeled`` unlabeled images per optimizer step). At start the
engine splits it over the world size: per-process batch x processes x accumulation
= the global batch, exactly, with the least accumulation that divides evenly and keeps
each micro-batch within ``train.max_batch_per_gpu``. A per-process batch the user sets
(``train.batch_size`` / ``train.batch_size_unlabeled``) is taken as given instead; the
global batch is then what it gives, and ``train.lr_scaling`` adapts the learning rate
to it.

Rule for a global batch that cannot be split: every process must take the same whole
number of images in every micro-batch, so the world size times the accumulation must
divide both global batches; if no accumulation does, the plan is refused and the error
lists the world sizes that work.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from dssn.config import Config, TrainConfig
from dssn.errors import DssnError


class PlanError(DssnError, ValueError):
    """The global batch cannot be split over this many processes as configured."""


@dataclass(frozen=True)
class BatchPlan:
    labeled: int
    """Labeled images per process per micro-batch."""
    unlabeled: int
    world_size: int
    accumulate: int
    target_labeled: int
    """The config's global batch (``train.global_batch``): what the preset's paper used."""
    target_unlabeled: int
    explicit: bool = False
    """The user set the per-process batch; the global batch is what it gives."""
    lr_scaling: str = "none"
    lr_factor: float = 1.0
    uses_unlabeled: bool = True

    @property
    def global_labeled(self) -> int:
        return self.labeled * self.world_size * self.accumulate

    @property
    def global_unlabeled(self) -> int:
        return self.unlabeled * self.world_size * self.accumulate

    @property
    def global_batch(self) -> tuple[int, int]:
        return self.global_labeled, self.global_unlabeled if self.uses_unlabeled else 0

    def _pair(self, labeled: int, unlabeled: int) -> str:
        return f"{labeled} + {unlabeled}" if self.uses_unlabeled else str(labeled)

    def line(self, unit: str = "GPU") -> str:
        """``4 + 4 per GPU x 2 GPUs x accumulate 1 = 8 + 8`` (``unit``: GPU or process)."""
        units = unit if self.world_size == 1 else "processes" if unit == "process" else f"{unit}s"
        return (f"{self._pair(self.labeled, self.unlabeled)} per {unit} x {self.world_size} {units} x accumulate "
                f"{self.accumulate} = {self._pair(self.global_labeled, self.global_unlabeled)}")

    def lr_note(self) -> str | None:
        """For a per-process batch set by hand: the config's global batch and the learning-rate rule."""
        if not self.explicit:
            return None
        target = self._pair(self.target_labeled, self.target_unlabeled)
        if self.global_batch == (self.target_labeled, self.target_unlabeled if self.uses_unlabeled else 0):
            return f"per-process batch set by hand; it gives the config's global batch {target}"
        rule = (f"learning rates x {self.lr_factor:.4g}" if self.lr_factor != 1.0 else "learning rates unchanged")
        return (f"per-process batch set by hand: global batch {self._pair(self.global_labeled, self.global_unlabeled)}"
                f" instead of the config's {target}; train.lr_scaling={self.lr_scaling}: {rule}")

    def batch_norm_note(self, unit: str, synced: bool) -> str | None:
        """What batch-norm statistics see, when it is less than the global batch (the release's
        SyncBatchNorm over 4 GPUs saw the whole global batch); None when they see all of it."""
        micro = self._pair(self.labeled, self.unlabeled)
        world = self._pair(self.labeled * self.world_size, self.unlabeled * self.world_size)
        full = self._pair(self.global_labeled, self.global_unlabeled)
        if self.world_size > 1 and synced:
            seen, how = world, f"SyncBatchNorm over {self.world_size} {unit}s"
        elif self.world_size > 1:
            seen, how = micro, (f"each {unit}'s own batch; running statistics averaged after each step"
                                if unit == "process" else f"each {unit}'s own batch (train.sync_bn=false)")
        else:
            seen, how = micro, f"one {unit}"
        if seen == full:
            return None
        reason = f"accumulation over {self.accumulate} micro-batches" if self.accumulate > 1 else how
        return f"batch norm sees {seen} images per pass ({reason}; {how}), not the global {full}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "global_labeled": self.global_labeled, "global_unlabeled": self.global_unlabeled}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def plan_batches(train: TrainConfig, world_size: int, uses_unlabeled: bool = True) -> BatchPlan:
    """Split ``train``'s global batch over ``world_size`` processes (module docstring: the rule)."""
    target_l, target_u = train.global_batch, train.global_batch_unlabeled
    if train.batch_size is not None or train.batch_size_unlabeled is not None:
        return _explicit_plan(train, world_size, uses_unlabeled)
    cap = train.max_batch_per_gpu
    need = math.gcd(target_l, target_u) if uses_unlabeled else target_l
    for accumulate in range(train.accumulate, need + 1):
        share = world_size * accumulate
        if need % share:
            continue
        labeled, unlabeled = target_l // share, target_u // share
        if cap is None or max(labeled, unlabeled if uses_unlabeled else 0) <= cap:
            return BatchPlan(labeled, max(unlabeled, 1), world_size, accumulate, target_l, target_u,
                             uses_unlabeled=uses_unlabeled)
    pair = f"{target_l} + {target_u}" if uses_unlabeled else str(target_l)
    working = ", ".join(str(d) for d in _divisors(need))
    limit = f" with at most train.max_batch_per_gpu={cap} images per micro-batch" if cap is not None else ""
    raise PlanError(f"the global batch {pair} (train.global_batch{', train.global_batch_unlabeled' * uses_unlabeled})"
                    f" cannot be split evenly over {world_size} "
                    f"process(es){limit} at train.accumulate >= {train.accumulate}: every process takes the same "
                    f"whole number of images per micro-batch. Run on {working} process(es), or set the per-process "
                    "batch yourself with train.batch_size=N and train.batch_size_unlabeled=N (the global batch is "
                    "then what they give; train.lr_scaling=linear|sqrt adapts the learning rate)")


def _explicit_plan(train: TrainConfig, world_size: int, uses_unlabeled: bool) -> BatchPlan:
    """The user's per-process batch; an unset one of the two is the global one's share."""
    accumulate = train.accumulate
    share = world_size * accumulate
    sizes = []
    for given, target, key, global_key in (
            (train.batch_size, train.global_batch, "batch_size", "global_batch"),
            (train.batch_size_unlabeled, train.global_batch_unlabeled, "batch_size_unlabeled",
             "global_batch_unlabeled")):
        if given is None:
            if target % share and (key == "batch_size" or uses_unlabeled):
                raise PlanError(f"train.{key} is not set and train.{global_key}={target} cannot be split over "
                                f"{world_size} process(es) x accumulate {accumulate}; set train.{key} as well")
            given = max(target // share, 1)
        sizes.append(given)
    labeled, unlabeled = sizes
    actual = labeled * share + (unlabeled * share if uses_unlabeled else 0)
    wanted = train.global_batch + (train.global_batch_unlabeled if uses_unlabeled else 0)
    ratio = actual / wanted
    factor = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[train.lr_scaling]
    return BatchPlan(labeled, unlabeled, world_size, accumulate, train.global_batch,
                     train.global_batch_unlabeled, explicit=True, lr_scaling=train.lr_scaling, lr_factor=factor,
                     uses_unlabeled=uses_unlabeled)


def apply_plan(cfg: Config, plan: BatchPlan) -> Config:
    """``cfg`` with the per-process batches, accumulation and learning rate the plan gives: what
    every process trains with (the run folder keeps the config as written)."""
    updates = {"batch_size": plan.labeled, "batch_size_unlabeled": plan.unlabeled,
               "accumulate": plan.accumulate, "lr": cfg.train.lr * plan.lr_factor}
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=updates)})
