"""FixMatch as UniMatch and DSSN compare against it (``docs/method.md`` §5.2): no teacher, fixed threshold."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from dssn.constants import IGNORE
from dssn.method.base import Batch, Method
from dssn.method.components import cutmix, eval_mode_logits, labeled_loss, threshold_mask
from dssn.method.diagnostics import pseudo_label_statistics
from dssn.method.settings import CPLGKeys, ThresholdKeys


class FixMatchConfig(CPLGKeys, ThresholdKeys):
    """``method.*`` of ``method.name=fixmatch``: the CPLG keys feed the diagnostics only."""


class FixMatch(Method):
    name = "fixmatch"
    config_class = FixMatchConfig
    cfg: FixMatchConfig
    LOSS_WEIGHTS: ClassVar[dict[str, float]] = {"x": 0.5, "u": 0.5}
    """As UniMatch and DSSN compare against it: the labeled and the unlabeled loss count alike."""

    def training_step(self, batch: Batch, step: int) -> dict[str, Tensor]:
        images, labels = batch.labeled
        unlabeled, partner = batch.unlabeled, batch.partner
        n_labeled = images.shape[0]

        # The partner's prediction: student in eval mode, no gradient.
        partner_logits = eval_mode_logits(self.student_net, partner.weak)
        partner_confidence, partner_pseudo = partner_logits.softmax(dim=1).max(dim=1)

        # One strong view, mixed with the partner's inside box1; labeled and weak in one pass.
        strong1 = cutmix(unlabeled.strong1, partner.strong1, unlabeled.box1)
        logits = self.student(torch.cat((images, unlabeled.weak)))
        student_labeled, student_weak = logits[:n_labeled], logits[n_labeled:].detach()
        student_strong1 = self.student(strong1)

        # Targets mixed exactly as the strong view was.
        weak_confidence, weak_pseudo = student_weak.softmax(dim=1).max(dim=1)
        confidence1 = cutmix(weak_confidence, partner_confidence, unlabeled.box1)
        pseudo1 = cutmix(weak_pseudo, partner_pseudo, unlabeled.box1)
        ignore1 = cutmix(unlabeled.ignore, partner.ignore, unlabeled.box1)

        loss_labeled = labeled_loss(student_labeled, labels, self.train_cfg.labeled_loss,
                                    self.train_cfg.ohem_thresh, self.train_cfg.ohem_min_kept)
        valid = ignore1 != IGNORE
        selected = (confidence1 >= self.cfg.threshold) & valid
        pixel_loss = F.cross_entropy(student_strong1, pseudo1, reduction="none")
        loss_unlabeled = (pixel_loss * selected).sum() / valid.sum().clamp_min(1)
        loss = self.LOSS_WEIGHTS["x"] * loss_labeled + self.LOSS_WEIGHTS["u"] * loss_unlabeled
        if self.collect_diagnostics:  # only on the steps the engine logs
            mixed_logits1 = cutmix(student_weak, partner_logits, unlabeled.box1)
            self._diagnostics = self._diagnose(mixed_logits1, pseudo1, selected, ignore1)
        return {
            "loss": loss,
            "x": loss_labeled.detach(),
            "u": loss_unlabeled.detach(),
            "selected_w": (selected.sum() / valid.sum().clamp_min(1)).detach(),
        }

    # ---- diagnostics -----------------------------------------------------------------------
    @torch.no_grad()
    def _diagnose(self, mixed_logits1: Tensor, pseudo1: Tensor, selected: Tensor, ignore1: Tensor) -> dict[str, Tensor]:
        """Statistics of the pseudo labels of the strong view (CPLG's numbers for comparison)."""
        return pseudo_label_statistics(mixed_logits1, pseudo1, selected, ignore1, self.cfg.tau_low, self.cfg.ratio,
                                       self.diag_threshold)

    def loss_weights(self) -> dict[str, float]:
        return dict(self.LOSS_WEIGHTS)

    @torch.no_grad()
    def pseudo_labels(self, weak: Tensor) -> tuple[Tensor, Tensor]:
        """The student's labels on weak views (eval mode) and the fixed-threshold selection."""
        logits = eval_mode_logits(self.student_net, weak)
        return logits, threshold_mask(logits, self.cfg.threshold)
