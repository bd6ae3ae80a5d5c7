"""What a training method gives the engine.

The engine owns the loop, the optimizer, the schedule, devices, checkpoints
and logs; a method owns its models and turns one batch into named losses.
The engine only knows that ``losses["loss"]`` is what to back-propagate.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dssn.config import MethodConfig, TrainConfig
from dssn.data.batch import UnlabeledViews
from dssn.models import unwrap


@dataclass
class Batch:
    """One step's data, already on the device (``docs/method.md`` §1, §6).

    ``unlabeled`` and ``partner`` are None for methods that use labels only; ``partner`` is
    also None for methods that take CutMix partners from ``unlabeled`` itself
    (``Method.uses_partner_batch``).
    """

    labeled: tuple[Tensor, Tensor]
    """``(image [B,3,H,W], mask [B,H,W])``, the mask 255 where ignored."""
    unlabeled: UnlabeledViews | None = None
    """The unlabeled images the step learns from."""
    partner: UnlabeledViews | None = None
    """An independent unlabeled batch whose images donate the CutMix patches pasted into
    ``unlabeled``'s strong views inside ``box1``/``box2``."""


class Method(ABC):
    """Base class: a student network plus whatever else the method trains or tracks."""

    name: str = "method"
    config_class: type[MethodConfig] = MethodConfig
    """This method's ``method`` section: the keys it reads (``dssn.method.settings``)."""
    uses_unlabeled: bool = True
    uses_partner_batch: bool = True
    perturbs_features: bool = False
    """Whether the step asks the network for perturbed feature streams (``n_perturb``), the ones
    ``model.feature_dropout`` shapes."""
    """Whether the step reads ``Batch.partner``; without it the engine loads one unlabeled stream."""
    collect_diagnostics: bool = False
    """Set by the engine on the steps it will log: the step then also stores its
    diagnostics (``method/diagnostics.py``) for ``pop_diagnostics``; other steps pay nothing."""
    diag_threshold: float = 0.95
    """The fixed confidence threshold CPLG's selection is compared with (``diag.fixed_threshold``)."""

    def __init__(self, student: nn.Module, cfg: MethodConfig, train_cfg: TrainConfig,
                 iters_per_epoch: int = 1) -> None:
        """``iters_per_epoch``: optimizer steps per epoch, for schedules counted in epochs."""
        self.student = student
        """What the training step calls: the network, or the engine's wrapper around it
        (DistributedDataParallel, ``torch.compile``); ``student_net`` is the network itself."""
        self.cfg = cfg
        self.train_cfg = train_cfg
        self.iters_per_epoch = iters_per_epoch
        self._diagnostics: dict[str, Tensor] = {}

    def frozen_copy(self) -> nn.Module:
        """A copy of the student that no gradient reaches (an EMA teacher starts as one)."""
        teacher = copy.deepcopy(self.student_net)
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher

    @property
    def student_net(self) -> nn.Module:
        return unwrap(self.student)

    @abstractmethod
    def training_step(self, batch: Batch, step: int) -> dict[str, Tensor]:
        """Losses for one step: ``"loss"`` is optimised, the other entries are logged.

        Entries must be 0-dim tensors; the engine reads them only when it logs,
        so the step itself needs no host synchronisation.
        """

    def after_optimizer_step(self, step: int) -> None:
        """Hook after ``optimizer.step()`` (the EMA teacher update lives here)."""

    def pop_diagnostics(self) -> dict[str, Tensor]:
        """Tensors stored by the last step run with ``collect_diagnostics`` (then cleared).

        Names and shapes: ``select_counts`` [2, C] and ``cplg_vs_fixed`` [3, C] (int64
        counts), ``cplg_thr`` [2, C], and 0-dim ``agreement``, ``teacher_distance``,
        ``sim/img`` / ``sim/feat`` [2] (positive, random); each only where the method has it.
        """
        out, self._diagnostics = self._diagnostics, {}
        return out

    def loss_weights(self) -> dict[str, float]:
        """Weight of each logged loss term in ``loss`` (for the terms' shares of the total)."""
        return {}

    @torch.no_grad()
    def pseudo_labels(self, weak: Tensor) -> tuple[Tensor, Tensor] | None:
        """``(logits, selected)`` the method would train on for weak views ``[B,3,H,W]``, for
        display; None for methods without pseudo labels. Must not change any state."""
        return None

    def eval_models(self) -> dict[str, nn.Module]:
        """Networks to evaluate, by name."""
        return {"student": self.student_net}

    def modules(self) -> dict[str, nn.Module]:
        """Every network whose state belongs in a checkpoint."""
        return self.eval_models()

    def train(self) -> None:
        self.student_net.train()

    def to(self, device: torch.device) -> "Method":
        for module in self.modules().values():
            module.to(device)
        return self
