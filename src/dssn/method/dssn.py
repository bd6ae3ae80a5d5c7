"""DSSN: one training step, ``docs/method.md`` §3, top to bottom.

A step sees a labeled batch, an unlabeled batch and its partner: a second, independent
unlabeled batch whose images are pasted into the CutMix boxes of the unlabeled strong views.
The student learns at two levels, each with class-aware pseudo-label selection (CPLG, §4.1):

- image level: on the two mixed strong views, from the EMA teacher's pseudo labels, mixed
  the same way;
- feature level: on two perturbed feature streams of the weak view, from the student's own
  prediction on the clean stream;

and the two strong views and the two feature streams are pulled towards each other (§4.2).
The numbered comments are §3's steps; the pieces are in ``components.py``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from dssn.config import TrainConfig
from dssn.constants import IGNORE
from dssn.method.base import Batch, Method
from dssn.method.components import (
    contrastive_alignment,
    cplg_mask,
    cutmix,
    ema_momentum_at,
    ema_update,
    eval_mode_logits,
    labeled_loss,
    masked_unlabeled_ce,
    threshold_mask,
)
from dssn.method.diagnostics import (
    parameter_distance,
    positive_vs_random_similarity,
    prediction_agreement,
    pseudo_label_statistics,
)
from dssn.method.settings import CPLGKeys, EMATeacherKeys, ThresholdKeys


class DSSNConfig(EMATeacherKeys, ThresholdKeys, CPLGKeys):
    """``method.*`` of ``method.name=dssn``."""

    selection: Literal["cplg", "threshold"] = "cplg"
    """Which pseudo labels are trained on: CPLG (``tau_low``, ``ratio``) or ``threshold``."""
    loss_image: bool = True
    """L_s: teacher pseudo labels supervise the two CutMix-ed strong views."""
    loss_feature: bool = True
    """L_fp: the student's weak prediction supervises the perturbed feature streams."""
    align_image: bool = True
    """The alignment of the two strong views (docs/method.md §4.2)."""
    align_feature: bool = True
    """The alignment of the two perturbed feature streams."""
    lambda_c: float = Field(0.005, ge=0.0)
    """Weight of the alignment terms in the loss."""
    weight_x: float = Field(0.5, ge=0.0)
    """Weight of the labeled loss."""
    weight_u: float = Field(0.125, ge=0.0)
    """Weight of each unlabeled loss (L_s and L_fp)."""
    teacher_bn: Literal["released", "batch", "running"] = "released"
    """Batch norm of the EMA teacher: ``released`` normalises by each weak batch's own statistics
    during the first epoch and by the running statistics from the second epoch on (what the
    authors' script does: its teacher starts in training mode and its end-of-epoch evaluation
    leaves it in eval mode); ``batch`` and ``running`` use one of the two for the whole run."""
    warmup_steps: int = Field(1, ge=0)
    warmup_epochs: float = Field(0.0, ge=0.0)
    """L_s is left out until both warm-ups have passed."""

    @classmethod
    def idle_keys(cls, section: dict[str, Any]) -> dict[str, str]:
        if section.get("selection", "cplg") == "cplg":
            return {"threshold": "dssn reads it only with method.selection=threshold; with cplg (the default) "
                                 "it selects by method.tau_low and method.ratio"}
        return {}


class DSSN(Method):
    name = "dssn"
    config_class = DSSNConfig
    perturbs_features = True
    cfg: DSSNConfig

    def __init__(self, student: nn.Module, cfg: DSSNConfig, train_cfg: TrainConfig,
                 iters_per_epoch: int = 1) -> None:
        super().__init__(student, cfg, train_cfg, iters_per_epoch)
        self.teacher = self.frozen_copy()
        self.warmup_steps = max(cfg.warmup_steps, round(cfg.warmup_epochs * iters_per_epoch))
        # The perturbed feature streams exist only for L_fp and the feature-level alignment.
        self.n_perturb = 2 if (cfg.loss_feature or cfg.align_feature) else 0
        self._diag_generator: torch.Generator | None = None

    def select(self, logits: Tensor) -> Tensor:
        """The pixels whose pseudo labels are trained on: CPLG or a fixed confidence threshold."""
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
    def teacher_logits(self, partner_weak: Tensor, weak: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """The teacher's logits on the partner's and the unlabeled batch's weak views (step 2)."""
        if not self.teacher_uses_batch_statistics(step):
            self.teacher.eval()  # running statistics: one batched pass is exact
            teacher_partner, teacher_logits = self.teacher(torch.cat((partner_weak, weak))).chunk(2)
            return teacher_partner, teacher_logits
        self.teacher.train()  # batch statistics, each batch on its own
        return self.teacher(partner_weak), self.teacher(weak)

    def training_step(self, batch: Batch, step: int) -> dict[str, Tensor]:
        cfg = self.cfg
        images, labels = batch.labeled
        unlabeled, partner = batch.unlabeled, batch.partner
        n_labeled = images.shape[0]

        # 1. Mix the strong views with the partner's: its pixels inside box k of view k.
        strong1 = cutmix(unlabeled.strong1, partner.strong1, unlabeled.box1)
        strong2 = cutmix(unlabeled.strong2, partner.strong2, unlabeled.box2)

        # 2. Teacher on both weak views, no gradient.
        teacher_partner, teacher_logits = self.teacher_logits(partner.weak, unlabeled.weak, step)

        # 3. Mixed teacher logits, pseudo labels and ignore masks: each strong view's targets
        #    are mixed exactly as the view itself was.
        def mixed_targets(box: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            """``(pseudo labels, ignore mask, teacher logits)`` with the partner's inside ``box``."""
            logits = cutmix(teacher_logits, teacher_partner, box)
            return logits.argmax(dim=1), cutmix(unlabeled.ignore, partner.ignore, box), logits

        pseudo1, ignore1, mixed_logits1 = mixed_targets(unlabeled.box1)
        pseudo2, ignore2, mixed_logits2 = mixed_targets(unlabeled.box2)

        # 4. Student on labeled + weak, with the perturbed feature streams, one pass (shared BN
        #    statistics). The weak prediction is a target for the streams: no gradient.
        labeled_and_weak = torch.cat((images, unlabeled.weak))
        perturbed1 = perturbed2 = None
        if self.n_perturb:
            logits, (perturbed1, perturbed2) = self.student(labeled_and_weak, n_perturb=self.n_perturb)
            perturbed1, perturbed2 = perturbed1[n_labeled:], perturbed2[n_labeled:]
        else:
            logits = self.student(labeled_and_weak)
        student_labeled, student_weak = logits[:n_labeled], logits[n_labeled:].detach()
        weak_pseudo = student_weak.argmax(dim=1)

        # 5. Student on both strong views, one pass.
        student_strong1, student_strong2 = self.student(torch.cat((strong1, strong2))).chunk(2)

        # 6. Class-aware selection on the weak prediction and both mixed teacher predictions.
        selected_weak = self.select(student_weak)
        selected1, selected2 = self.select(mixed_logits1), self.select(mixed_logits2)

        # 7. Losses; L_s only after the warm-up (``warmup_steps``, ``warmup_epochs``).
        zero = student_labeled.new_zeros(())
        loss_labeled = labeled_loss(student_labeled, labels, self.train_cfg.labeled_loss,
                                    self.train_cfg.ohem_thresh, self.train_cfg.ohem_min_kept)
        loss_image = zero
        if cfg.loss_image and step >= self.warmup_steps:
            loss_image = (masked_unlabeled_ce(student_strong1, pseudo1, selected1, ignore1)
                          + masked_unlabeled_ce(student_strong2, pseudo2, selected2, ignore2))
        loss_feature = zero
        if cfg.loss_feature:
            loss_feature = (masked_unlabeled_ce(perturbed1, weak_pseudo, selected_weak, unlabeled.ignore)
                            + masked_unlabeled_ce(perturbed2, weak_pseudo, selected_weak, unlabeled.ignore))
        align_image = contrastive_alignment(student_strong1, student_strong2) if cfg.align_image else zero
        align_feature = contrastive_alignment(perturbed1, perturbed2) if cfg.align_feature else zero
        loss_align = align_image + align_feature
        loss = (cfg.weight_x * loss_labeled + cfg.weight_u * (loss_image + loss_feature)
                + cfg.lambda_c * loss_align)

        if self.collect_diagnostics:  # only on the steps the engine logs
            perturbed = (perturbed1, perturbed2) if self.n_perturb else None
            self._diagnostics = self._diagnose(student_weak, teacher_logits, mixed_logits1, pseudo1, selected1,
                                               ignore1, unlabeled.ignore, (student_strong1, student_strong2),
                                               perturbed)
        # 8. The engine back-propagates ``loss`` and steps the optimizer; 9 follows in
        #    ``after_optimizer_step``.
        return {
            "loss": loss,
            "x": loss_labeled.detach(),
            "s": loss_image.detach(),
            "fp": loss_feature.detach(),
            "c_img": align_image.detach(),
            "c_feat": align_feature.detach(),
            "selected_w": _selected_fraction(selected_weak, unlabeled.ignore),
            "selected_t": _selected_fraction(selected1, ignore1),
        }

    def after_optimizer_step(self, step: int) -> None:
        # 9. EMA teacher: ``copy_first`` makes it a copy of the student at the first step, ``ramp``
        #    (the DINOv2 presets, as UniMatch V2) averages the students until the cap.
        ema_update(self.teacher, self.student_net, ema_momentum_at(step, self.cfg.ema_rule, self.cfg.ema_momentum))

    def eval_models(self) -> dict[str, nn.Module]:
        return {"student": self.student_net, "teacher": self.teacher}

    # ---- diagnostics -----------------------------------------------------------------------
    @torch.no_grad()
    def _diagnose(self, student_weak: Tensor, teacher_logits: Tensor, mixed_logits1: Tensor, pseudo1: Tensor,
                  selected1: Tensor, ignore1: Tensor, ignore: Tensor, student_strong: tuple[Tensor, Tensor],
                  perturbed: tuple[Tensor, Tensor] | None) -> dict[str, Tensor]:
        """Pseudo-label statistics of the image-level view 1 (the one ``selected_t`` counts) and
        the paper's health checks, as tensors; see ``method/diagnostics.py``."""
        cfg = self.cfg
        if self._diag_generator is None or self._diag_generator.device != mixed_logits1.device:
            # Its own generator: diagnostics never move the random stream that training draws from.
            self._diag_generator = torch.Generator(device=mixed_logits1.device).manual_seed(0)
        out = {
            **pseudo_label_statistics(mixed_logits1, pseudo1, selected1, ignore1, cfg.tau_low, cfg.ratio,
                                      self.diag_threshold),
            "agreement": prediction_agreement(student_weak, teacher_logits, ignore),
            "teacher_distance": parameter_distance(self.teacher, self.student_net),
            "sim/img": positive_vs_random_similarity(*student_strong, generator=self._diag_generator),
        }
        if perturbed is not None:
            out["sim/feat"] = positive_vs_random_similarity(*perturbed, generator=self._diag_generator)
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
