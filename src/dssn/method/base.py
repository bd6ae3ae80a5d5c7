"""What a training method gives the engine.

The engine owns the loop, the optimizer, the schedule, devices, checkpoints
and logs; a method owns its models and turns one batch into named losses.
The engine only knows that ``losses["loss"]`` is what to back-propagate.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class Batch:
    """One step's data, already on the device.

    ``labeled`` is ``(image [B,3,H,W], mask [B,H,W])``. ``unlabeled`` and ``mix``
    (the independent batch U' that donates CutMix patches) are dicts with the
    keys ``w, s1, s2, ign, b1, b2`` of SPEC section 3, or None for methods
    that use labels only.
    """

    labeled: tuple[Tensor, Tensor]
    unlabeled: dict[str, Tensor] | None = None
    mix: dict[str, Tensor] | None = None


class Method(ABC):
    """Base class: a student network plus whatever else the method trains or tracks."""

    name: str = "method"
    uses_unlabeled: bool = True

    def __init__(self, student: nn.Module) -> None:
        self.student = student

    @abstractmethod
    def training_step(self, batch: Batch, step: int) -> dict[str, Tensor]:
        """Losses for one step: ``"loss"`` is optimised, the other entries are logged.

        Entries must be 0-dim tensors; the engine reads them only when it logs,
        so the step itself needs no host synchronisation.
        """

    def after_optimizer_step(self, step: int) -> None:
        """Hook after ``optimizer.step()`` (the EMA teacher update lives here)."""

    def eval_models(self) -> dict[str, nn.Module]:
        """Networks to evaluate, by name."""
        return {"student": self.student}

    def modules(self) -> dict[str, nn.Module]:
        """Every network whose state belongs in a checkpoint."""
        return self.eval_models()

    def train(self) -> None:
        self.student.train()

    def to(self, device: torch.device) -> "Method":
        for module in self.modules().values():
            module.to(device)
        return self
