"""UniMatch V2 as released (docs/method.md §5.3): one training step, top to bottom.

An EMA teacher in eval mode labels the weak view; the two strong views are CutMix-ed with
the image at the mirrored batch position and decoded in one student pass with complementary
channel dropout (the model's ``forward(x, comp_drop=True)``). That pass leaves batch-norm running
statistics alone, which matters only on networks with batch norm (DeepLabV3+, not the released DPT).
The release's teacher update is ``method.ema_rule: ramp`` (docs/method.md §8); the method reads
whichever rule is configured.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from dssn.config import TrainConfig
from dssn.constants import IGNORE
from dssn.method.base import Batch, Method
from dssn.method.components import (
    cutmix,
    ema_momentum_at,
    ema_update,
    labeled_loss,
    masked_unlabeled_ce,
    threshold_mask,
)
from dssn.method.diagnostics import (
    parameter_distance,
    pseudo_label_statistics,
)
from dssn.method.settings import CPLGKeys, EMATeacherKeys, ThresholdKeys
from dssn.models import frozen_bn_statistics


class UniMatchV2Config(CPLGKeys, EMATeacherKeys, ThresholdKeys):
    """``method.*`` of ``method.name=unimatch_v2``: its loss weights are the release's
    (``UniMatchV2.loss_weights``), the CPLG keys feed the diagnostics only."""


def from_partner(base: Tensor, box: Tensor) -> Tensor:
    """CutMix within the batch: image ``i`` takes the pixels inside its box from image ``B-1-i``.

    Works for images and logits ``[B, C, H, W]`` and for per-pixel maps ``[B, H, W]``.
    """
    return cutmix(base, base.flip(0), box)


class UniMatchV2(Method):
    name = "unimatch_v2"
    config_class = UniMatchV2Config
    cfg: UniMatchV2Config
    LOSS_WEIGHTS: ClassVar[dict[str, float]] = {"x": 0.5, "u": 0.5}
    """The release's: the labeled and the unlabeled loss count alike (not settings)."""
    uses_partner_batch = False
    """CutMix partners come from the same batch, so the engine loads no second unlabeled stream."""

    def __init__(self, student: nn.Module, cfg: UniMatchV2Config, train_cfg: TrainConfig,
                 iters_per_epoch: int = 1) -> None:
        super().__init__(student, cfg, train_cfg, iters_per_epoch)
        self.teacher = self.frozen_copy().eval()

    @torch.no_grad()
    def teacher_logits(self, weak: Tensor) -> Tensor:
        self.teacher.eval()  # as released: the teacher never runs in training mode
        return self.teacher(weak)

    def training_step(self, batch: Batch, step: int) -> dict[str, Tensor]:
        image_x, mask_x = batch.labeled
        unlabeled = batch.unlabeled
        box1, box2, ignore = unlabeled.box1, unlabeled.box2, unlabeled.ignore

        # Teacher on the weak view: pseudo labels and their confidence.
        teacher_weak = self.teacher_logits(unlabeled.weak)
        confidence, pseudo = teacher_weak.softmax(dim=1).max(dim=1)

        # Each strong view pasted with its own box from the mirrored image.
        strong1 = from_partner(unlabeled.strong1, box1)
        strong2 = from_partner(unlabeled.strong2, box2)

        # Student: the labeled batch alone, then both strong views in one complementary-dropout pass.
        # Only the clean labeled pass moves batch-norm running statistics: features zeroed or doubled
        # by the dropout inflate them, and evaluation then normalises clean features wrongly
        # (docs/findings.md, finding 13). The release's DPT has no batch norm: there it changes nothing.
        logits_x = self.student(image_x)
        with frozen_bn_statistics(self.student_net):
            logits1, logits2 = self.student(torch.cat((strong1, strong2)), comp_drop=True).chunk(2)

        # Targets of each strong view: the weak view's, with the partner's inside the same box.
        pseudo1, confidence1, ignore1 = (from_partner(t, box1) for t in (pseudo, confidence, ignore))
        pseudo2, confidence2, ignore2 = (from_partner(t, box2) for t in (pseudo, confidence, ignore))

        threshold = self.cfg.threshold
        loss_x = labeled_loss(logits_x, mask_x, self.train_cfg.labeled_loss,
                              self.train_cfg.ohem_thresh, self.train_cfg.ohem_min_kept)
        loss_u1 = masked_unlabeled_ce(logits1, pseudo1, confidence1 >= threshold, ignore1)
        loss_u2 = masked_unlabeled_ce(logits2, pseudo2, confidence2 >= threshold, ignore2)
        loss_u = (loss_u1 + loss_u2) / 2
        loss = self.LOSS_WEIGHTS["x"] * loss_x + self.LOSS_WEIGHTS["u"] * loss_u

        if self.collect_diagnostics:  # only on the steps the engine logs
            self._diagnostics = self._diagnose(from_partner(teacher_weak, box1), pseudo1,
                                               confidence1 >= threshold, ignore1)
        valid = ignore != IGNORE
        selected = (confidence >= threshold) & valid  # the release's "mask ratio": unmixed weak view
        return {
            "loss": loss,
            "x": loss_x.detach(),
            "u": loss_u.detach(),
            "selected_t": (selected.sum() / valid.sum().clamp_min(1)).detach(),
        }

    def after_optimizer_step(self, step: int) -> None:
        ema_update(self.teacher, self.student_net, ema_momentum_at(step, self.cfg.ema_rule, self.cfg.ema_momentum))

    def train(self) -> None:
        self.student_net.train()
        self.teacher.eval()

    def eval_models(self) -> dict[str, nn.Module]:
        return {"student": self.student_net, "teacher": self.teacher}

    def loss_weights(self) -> dict[str, float]:
        return dict(self.LOSS_WEIGHTS)

    @torch.no_grad()
    def pseudo_labels(self, weak: Tensor) -> tuple[Tensor, Tensor]:
        """The teacher's labels on weak views (the teacher is always in eval mode) and the
        fixed-threshold selection."""
        logits = self.teacher_logits(weak)
        return logits, threshold_mask(logits, self.cfg.threshold)

    # ---- diagnostics ----------------------------------------------------------------------
    @torch.no_grad()
    def _diagnose(self, logits1: Tensor, pseudo1: Tensor, selected1: Tensor, ignore1: Tensor) -> dict[str, Tensor]:
        """Statistics of strong view 1's pseudo labels (CPLG's numbers for comparison)."""
        return {**pseudo_label_statistics(logits1, pseudo1, selected1, ignore1, self.cfg.tau_low, self.cfg.ratio,
                                          self.diag_threshold),
                "teacher_distance": parameter_distance(self.teacher, self.student_net)}
