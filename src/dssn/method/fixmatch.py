"""FixMatch as UniMatch and DSSN compare against it (SPEC 4b): no teacher, fixed threshold."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dssn.config import MethodConfig, TrainConfig
from dssn.method.base import Batch, Method
from dssn.method.components import IGNORE, cutmix, eval_mode_logits, labeled_loss, threshold_mask
from dssn.method.diagnostics import class_selection_counts, cplg_thresholds, cplg_vs_fixed_counts


class FixMatch(Method):
    name = "fixmatch"

    def __init__(self, student: nn.Module, cfg: MethodConfig, train_cfg: TrainConfig,
                 iters_per_epoch: int = 1) -> None:
        super().__init__(student)
        self.cfg = cfg
        self.train_cfg = train_cfg

    def training_step(self, batch: Batch, step: int) -> dict[str, Tensor]:
        x, y = batch.labeled
        u, u_mix = batch.unlabeled, batch.mix
        n_x = x.shape[0]

        # The donor's prediction: student in eval mode, no gradient.
        logits_mix = eval_mode_logits(self.student_net, u_mix["w"])
        conf_mix, y_mix = logits_mix.softmax(dim=1).max(dim=1)

        s1 = cutmix(u["s1"], u_mix["s1"], u["b1"])
        p = self.student(torch.cat((x, u["w"])))
        p_x, p_w = p[:n_x], p[n_x:].detach()
        q1 = self.student(s1)

        conf_w, y_w = p_w.softmax(dim=1).max(dim=1)
        conf1 = cutmix(conf_w, conf_mix, u["b1"])
        y1 = cutmix(y_w, y_mix, u["b1"])
        ign1 = cutmix(u["ign"], u_mix["ign"], u["b1"])

        loss_x = labeled_loss(p_x, y, self.train_cfg.labeled_loss,
                              self.train_cfg.ohem_thresh, self.train_cfg.ohem_min_kept)
        valid = ign1 != IGNORE
        selected = (conf1 >= self.cfg.threshold) & valid
        loss_u = (F.cross_entropy(q1, y1, reduction="none") * selected).sum() / valid.sum().clamp_min(1)
        loss = (loss_x + loss_u) / 2
        if self.collect_diagnostics:  # only on the steps the engine logs
            self._diagnostics = self._diagnose(cutmix(p_w, logits_mix, u["b1"]), y1, selected, ign1)
        return {
            "loss": loss,
            "x": loss_x.detach(),
            "u": loss_u.detach(),
            "selected_w": (selected.sum() / valid.sum().clamp_min(1)).detach(),
        }

    # ---- diagnostics (issue 6) -------------------------------------------------------------
    @torch.no_grad()
    def _diagnose(self, logits1: Tensor, y1: Tensor, selected: Tensor, ign1: Tensor) -> dict[str, Tensor]:
        """Statistics of the pseudo labels of the strong view (CPLG's numbers for comparison)."""
        cfg, c = self.cfg, logits1.shape[1]
        return {
            "select_counts": class_selection_counts(y1, selected, ign1, c),
            "cplg_thr": cplg_thresholds(logits1, cfg.tau_low, cfg.ratio),
            "cplg_vs_fixed": cplg_vs_fixed_counts(logits1, ign1, cfg.tau_low, cfg.ratio, self.diag_threshold),
        }

    def loss_weights(self) -> dict[str, float]:
        return {"x": 0.5, "u": 0.5}

    @torch.no_grad()
    def pseudo_labels(self, weak: Tensor) -> tuple[Tensor, Tensor]:
        """The student's labels on weak views (eval mode) and the fixed-threshold selection."""
        logits = eval_mode_logits(self.student_net, weak)
        return logits, threshold_mask(logits, self.cfg.threshold)
