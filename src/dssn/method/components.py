"""The small pieces a semi-supervised step is built from (``docs/method.md`` §3, §4).

Each function is pure tensor code with its own tests; ``dssn.py``,
``fixmatch.py`` and ``supervised.py`` combine them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dssn.constants import IGNORE


def cplg_mask(logits: Tensor, tau_low: float = 0.92, ratio: float = 0.96) -> Tensor:
    """Class-aware pseudo-label selection (``docs/method.md`` §4.1): bool ``[B, H, W]``.

    Each class's threshold is ``ratio`` times its own best probability in the
    image, so rarer, less confident classes still contribute their top pixels;
    a class whose best probability is not above ``tau_low`` selects nothing.
    """
    prob = logits.detach().float().softmax(dim=1)
    class_max = prob.amax(dim=(2, 3), keepdim=True)  # [B, C, 1, 1]
    threshold = torch.where(class_max > tau_low, ratio * class_max, torch.inf)
    return (prob > threshold).any(dim=1)


def threshold_mask(logits: Tensor, threshold: float) -> Tensor:
    """Fixed-confidence selection: ``max softmax >= threshold`` (0 keeps every pixel)."""
    return logits.detach().float().softmax(dim=1).amax(dim=1) >= threshold


def standardize(logits: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-pixel standardisation over the class dimension (unbiased std)."""
    mean = logits.mean(dim=1, keepdim=True)
    std = logits.std(dim=1, keepdim=True)  # unbiased, as docs/method.md §4.2 states
    return (logits - mean) / std.clamp_min(eps)  # eps only guards constant vectors


def contrastive_alignment(a: Tensor, b: Tensor) -> Tensor:
    """Pixel-wise alignment of positive pairs with a Gaussian similarity (``docs/method.md`` §4.2).

    ``-log exp(-||z_a - z_b||^2 / 2 sigma^2)`` reduces to the squared distance of the
    standardised logits; its constant factor is folded into ``lambda_c``.
    Gradients flow into both views.
    """
    return (standardize(a) - standardize(b)).pow(2).mean()


def masked_unlabeled_ce(logits: Tensor, target: Tensor, selected: Tensor, ignore: Tensor) -> Tensor:
    """``CEu`` of ``docs/method.md`` §3 step 7: normalised by all valid pixels, not by the selected ones."""
    pixel_loss = F.cross_entropy(logits, target, reduction="none")
    valid = ignore != IGNORE
    return (pixel_loss * (selected & valid)).sum() / valid.sum().clamp_min(1)


def cutmix(base: Tensor, donor: Tensor, box: Tensor) -> Tensor:
    """Replace the pixels inside ``box`` ([B, H, W] bool) with the donor's.

    Works for images and logits ([B, C, H, W]) and for label or ignore maps ([B, H, W]).
    """
    if base.dim() == 4:
        box = box.unsqueeze(1)
    return torch.where(box, donor, base)


def ohem_ce(logits: Tensor, target: Tensor, thresh: float = 0.7, min_kept: int = 100_000) -> Tensor:
    """Online hard example mining CE (``docs/method.md`` §8), over the whole batch.

    Keeps the valid pixels whose probability of the true class is at most
    ``max(thresh, the min_kept-th smallest such probability)``.
    """
    valid = target != IGNORE
    pixel_loss = F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="none")
    with torch.no_grad():
        safe_target = torch.where(valid, target, 0)
        true_prob = logits.detach().softmax(dim=1).gather(1, safe_target.unsqueeze(1)).squeeze(1)
        valid_prob = true_prob[valid]
        cutoff = torch.as_tensor(thresh, device=logits.device, dtype=true_prob.dtype)
        if min_kept > 0 and valid_prob.numel() > 0:
            k = min(min_kept, valid_prob.numel())
            kth = valid_prob.kthvalue(k).values
            cutoff = torch.maximum(cutoff, kth)
        kept = valid & (true_prob <= cutoff)
    return (pixel_loss * kept).sum() / kept.sum().clamp_min(1)


def labeled_loss(logits: Tensor, target: Tensor, kind: str = "ce", ohem_thresh: float = 0.7,
                 ohem_min_kept: int = 100_000) -> Tensor:
    """``L_x``: plain CE with ignore 255, or OHEM (Cityscapes)."""
    if kind == "ohem":
        return ohem_ce(logits, target, ohem_thresh, ohem_min_kept)
    return F.cross_entropy(logits, target, ignore_index=IGNORE)


def ema_momentum_at(step: int, rule: str, momentum: float) -> float:
    """The teacher's EMA momentum after optimizer step ``step`` (0-based), docs/method.md §8.

    ``copy_first``: 0 at step 0, so the teacher becomes a copy of the student, then ``momentum``.
    ``ramp`` (UniMatch V2): ``min(1 - 1/(step + 1), momentum)``, i.e. 0, 1/2, 2/3, ... until it
    reaches ``momentum``, so that early on the teacher averages all the students so far evenly.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if rule == "copy_first":
        return 0.0 if step == 0 else momentum
    if rule == "ramp":
        return min(1.0 - 1.0 / (step + 1), momentum)
    raise ValueError(f"unknown EMA rule {rule!r}; one of copy_first, ramp")


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``T = a*T + (1-a)*S`` over parameters and floating-point buffers (``docs/method.md`` §3 step 9).

    Integer buffers (BN's ``num_batches_tracked``) are copied. ``momentum=0``
    makes the teacher an exact copy, as on the very first step. The update is
    one fused multi-tensor operation per dtype group, not a Python loop.
    """
    t_float, s_float, t_other, s_other = [], [], [], []
    for t, s in zip(_tensors(teacher), _tensors(student), strict=True):
        if t.shape != s.shape:
            raise ValueError(f"teacher and student differ in shape: {tuple(t.shape)} vs {tuple(s.shape)}")
        if t.is_floating_point():
            t_float.append(t)
            s_float.append(s.detach())
        else:
            t_other.append(t)
            s_other.append(s)
    if momentum == 0.0:
        torch._foreach_copy_(t_float, s_float)
    elif t_float:
        torch._foreach_lerp_(t_float, s_float, 1.0 - momentum)
    if t_other:
        torch._foreach_copy_(t_other, s_other)


def _tensors(module: nn.Module) -> list[Tensor]:
    return [p.data for p in module.parameters()] + list(module.buffers())


@torch.no_grad()
def eval_mode_logits(model: nn.Module, x: Tensor) -> Tensor:
    """Predict with BN on running statistics (no BN update, no gradient), then restore the mode."""
    was_training = model.training
    model.eval()
    try:
        return model(x)
    finally:
        model.train(was_training)


def poly_lr(base_lr: float, it: int, total_iters: int, power: float = 0.9) -> float:
    """Poly schedule per iteration: ``lr * (1 - it / total) ** power``."""
    return base_lr * (1.0 - it / total_iters) ** power
