"""DSSN: one training step, SPEC section 3, top to bottom.

The numbered comments are SPEC 3's steps; the helpers are in ``components.py``.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from dssn.config import MethodConfig, TrainConfig
from dssn.method.base import Batch, Method
from dssn.method.components import (
    IGNORE,
    contrastive_alignment,
    cplg_mask,
    cutmix,
    ema_update,
    eval_mode_logits,
    labeled_loss,
    masked_unlabeled_ce,
    threshold_mask,
)
from dssn.method.diagnostics import (
    class_selection_counts,
    cplg_thresholds,
    cplg_vs_fixed_counts,
    parameter_distance,
    positive_vs_random_similarity,
    prediction_agreement,
)


class DSSN(Method):
    name = "dssn"

    def __init__(self, student: nn.Module, cfg: MethodConfig, train_cfg: TrainConfig,
                 iters_per_epoch: int = 1) -> None:
        super().__init__(student)
        self.cfg = cfg
        self.train_cfg = train_cfg
        self.teacher = copy.deepcopy(student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.iters_per_epoch = iters_per_epoch
        self.warmup_steps = max(cfg.warmup_steps, round(cfg.warmup_epochs * iters_per_epoch))
        # The perturbed feature streams exist only for L_fp and the feature-level alignment.
        self.n_perturb = 2 if (cfg.loss_feature or cfg.align_feature) else 0
        self._diag_generator: torch.Generator | None = None

    def select(self, logits: Tensor) -> Tensor:
        if self.cfg.selection == "cplg":
            return cplg_mask(logits, self.cfg.tau_low, self.cfg.ratio)
        return threshold_mask(logits, self.cfg.threshold)

    def teacher_uses_batch_statistics(self, step: int) -> bool:
        """``teacher_bn``: ``released`` is batch statistics during the first epoch only. Derived
        from the step alone, so evaluation cadence and resuming cannot change it."""
        if self.cfg.teacher_bn == "released":
            return step < self.iters_per_epoch
        return self.cfg.teacher_bn == "batch"

    @torch.inference_mode()
    def teacher_logits(self, w_mix: Tensor, w: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """Teacher predictions on the donor's and the image's weak views (step 2)."""
        if not self.teacher_uses_batch_statistics(step):
            self.teacher.eval()  # running statistics: one batched pass is exact
            t_mix, t = self.teacher(torch.cat((w_mix, w))).chunk(2)
            return t_mix, t
        self.teacher.train()  # batch statistics, each batch on its own
        return self.teacher(w_mix), self.teacher(w)

    def training_step(self, batch: Batch, step: int) -> dict[str, Tensor]:
        cfg = self.cfg
        x, y = batch.labeled
        u, u_mix = batch.unlabeled, batch.mix
        n_x = x.shape[0]

        # 1. Mix the strong views with the partner image's.
        s1 = cutmix(u["s1"], u_mix["s1"], u["b1"])
        s2 = cutmix(u["s2"], u_mix["s2"], u["b2"])

        # 2. Teacher on both weak views, no gradient.
        t_mix, t = self.teacher_logits(u_mix["w"], u["w"], step)

        # 3. Mixed teacher logits, pseudo labels and ignore masks.
        t1 = cutmix(t, t_mix, u["b1"])
        t2 = cutmix(t, t_mix, u["b2"])
        y1, y2 = t1.argmax(dim=1), t2.argmax(dim=1)
        ign1 = cutmix(u["ign"], u_mix["ign"], u["b1"])
        ign2 = cutmix(u["ign"], u_mix["ign"], u["b2"])

        # 4. Student on labeled + weak, with the perturbed feature streams, one pass.
        if self.n_perturb:
            p, (f1, f2) = self.student(torch.cat((x, u["w"])), n_perturb=self.n_perturb)
            f1, f2 = f1[n_x:], f2[n_x:]
        else:
            p = self.student(torch.cat((x, u["w"])))
        p_x, p_w = p[:n_x], p[n_x:].detach()
        y_w = p_w.argmax(dim=1)

        # 5. Student on both strong views, one pass.
        q1, q2 = self.student(torch.cat((s1, s2))).chunk(2)

        # 6. Class-aware selection on the weak prediction and both mixed teacher predictions.
        m_w, m1, m2 = self.select(p_w), self.select(t1), self.select(t2)

        # 7. Losses.
        zero = p_x.new_zeros(())
        loss_x = labeled_loss(p_x, y, self.train_cfg.labeled_loss,
                              self.train_cfg.ohem_thresh, self.train_cfg.ohem_min_kept)
        use_s = cfg.loss_image and step >= self.warmup_steps
        loss_s = (masked_unlabeled_ce(q1, y1, m1, ign1) + masked_unlabeled_ce(q2, y2, m2, ign2)
                  if use_s else zero)
        loss_fp = (masked_unlabeled_ce(f1, y_w, m_w, u["ign"]) + masked_unlabeled_ce(f2, y_w, m_w, u["ign"])
                   if cfg.loss_feature else zero)
        align_img = contrastive_alignment(q1, q2) if cfg.align_image else zero
        align_feat = contrastive_alignment(f1, f2) if cfg.align_feature else zero
        loss_c = align_img + align_feat
        loss = cfg.weight_x * loss_x + cfg.weight_u * (loss_s + loss_fp) + cfg.lambda_c * loss_c

        if self.collect_diagnostics:  # only on the steps the engine logs
            self._diagnostics = self._diagnose(p_w, t, t1, y1, m1, ign1, u["ign"], (q1, q2),
                                               (f1, f2) if self.n_perturb else None)
        return {
            "loss": loss,
            "x": loss_x.detach(),
            "s": loss_s.detach(),
            "fp": loss_fp.detach(),
            "c_img": align_img.detach(),
            "c_feat": align_feat.detach(),
            "selected_w": _selected_fraction(m_w, u["ign"]),
            "selected_t": _selected_fraction(m1, ign1),
        }

    def after_optimizer_step(self, step: int) -> None:
        # 9. EMA teacher; on the very first step it becomes a copy of the student.
        ema_update(self.teacher, self.student_net, 0.0 if step == 0 else self.cfg.ema_momentum)

    def eval_models(self) -> dict[str, nn.Module]:
        return {"student": self.student_net, "teacher": self.teacher}

    # ---- diagnostics (issue 6) -------------------------------------------------------------
    @torch.no_grad()
    def _diagnose(self, p_w: Tensor, t: Tensor, t1: Tensor, y1: Tensor, m1: Tensor, ign1: Tensor, ign: Tensor,
                  q: tuple[Tensor, Tensor], f: tuple[Tensor, Tensor] | None) -> dict[str, Tensor]:
        """Pseudo-label statistics of the image-level view 1 (the one ``selected_t`` counts) and
        the paper's health checks, as tensors; see ``method/diagnostics.py``."""
        cfg, c = self.cfg, t1.shape[1]
        if self._diag_generator is None or self._diag_generator.device != t1.device:
            # Its own generator: diagnostics never move the random stream that training draws from.
            self._diag_generator = torch.Generator(device=t1.device).manual_seed(0)
        out = {
            "select_counts": class_selection_counts(y1, m1, ign1, c),
            "cplg_thr": cplg_thresholds(t1, cfg.tau_low, cfg.ratio),
            "cplg_vs_fixed": cplg_vs_fixed_counts(t1, ign1, cfg.tau_low, cfg.ratio, self.diag_threshold),
            "agreement": prediction_agreement(p_w, t, ign),
            "teacher_distance": parameter_distance(self.teacher, self.student_net),
            "sim/img": positive_vs_random_similarity(q[0], q[1], generator=self._diag_generator),
        }
        if f is not None:
            out["sim/feat"] = positive_vs_random_similarity(f[0], f[1], generator=self._diag_generator)
        return out

    def loss_weights(self) -> dict[str, float]:
        cfg = self.cfg
        return {"x": cfg.weight_x, "s": cfg.weight_u, "fp": cfg.weight_u, "c_img": cfg.lambda_c,
                "c_feat": cfg.lambda_c}

    @torch.no_grad()
    def pseudo_labels(self, weak: Tensor) -> tuple[Tensor, Tensor]:
        """The teacher's labels and selection on weak views (teacher in eval mode: no BN update)."""
        logits = eval_mode_logits(self.teacher, weak)
        return logits, self.select(logits)


def _selected_fraction(selected: Tensor, ignore: Tensor) -> Tensor:
    valid = ignore != IGNORE
    return ((selected & valid).sum() / valid.sum().clamp_min(1)).detach()
