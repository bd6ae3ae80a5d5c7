"""What a semi-supervised step can tell about itself: pseudo-label statistics and health checks.

Everything here is pure tensor code, computed under ``no_grad`` on tensors the
step already has, and returns tensors (never Python numbers), so calling it
adds no host synchronisation; the engine reads all values at once at a log
step. Methods compute these only on the steps the engine will log
(``Method.collect_diagnostics``), so the other steps pay nothing.

The health rules at the bottom (``health_warnings``) are plain Python over the
logged numbers; ``docs/diagnostics.md`` documents each of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dssn.config import DiagConfig
from dssn.constants import IGNORE
from dssn.method.components import cplg_mask, standardize, threshold_mask


@torch.no_grad()
def class_selection_counts(pseudo: Tensor, selected: Tensor, ignore: Tensor, num_classes: int) -> Tensor:
    """``[2, C]`` int64: row 0 = valid pixels pseudo-labelled as each class, row 1 = those selected.

    ``pseudo``: long ``[B, H, W]`` (argmax of the predictions the labels came from),
    ``selected``: bool ``[B, H, W]``, ``ignore``: ``[B, H, W]`` (255 = not a pixel of the image).
    The per-class selected fraction is ``row1 / row0``; overall, ``row1.sum() / row0.sum()``.
    """
    valid = ignore != IGNORE
    labels = pseudo[valid]
    total = torch.bincount(labels, minlength=num_classes)[:num_classes]
    chosen = torch.bincount(labels[selected[valid]], minlength=num_classes)[:num_classes]
    return torch.stack((total, chosen))


@torch.no_grad()
def cplg_thresholds(logits: Tensor, tau_low: float, ratio: float) -> Tensor:
    """``[2, C]`` float: row 0 = sum over images of CPLG's threshold ``r * M[b, c]`` where the
    class is active (``M > tau_low``), row 1 = the number of images where it is active.

    The mean active threshold of a class is ``row0 / row1`` (undefined where no image
    activated it); sums rather than means so that several steps can be added up.
    """
    class_max = logits.detach().float().softmax(dim=1).amax(dim=(2, 3))  # [B, C]
    active = class_max > tau_low
    return torch.stack(((ratio * class_max * active).sum(0), active.sum(0).to(class_max.dtype)))


@torch.no_grad()
def cplg_vs_fixed_counts(logits: Tensor, ignore: Tensor, tau_low: float, ratio: float,
                         threshold: float = 0.95) -> Tensor:
    """``[3, C]`` int64 on the same predictions: valid pixels pseudo-labelled as each class,
    those CPLG selects and those a fixed ``max softmax >= threshold`` selects."""
    pseudo = logits.argmax(dim=1)
    num_classes = logits.shape[1]
    cplg = class_selection_counts(pseudo, cplg_mask(logits, tau_low, ratio), ignore, num_classes)
    fixed = class_selection_counts(pseudo, threshold_mask(logits, threshold), ignore, num_classes)
    return torch.stack((cplg[0], cplg[1], fixed[1]))


@torch.no_grad()
def gaussian_similarity(a: Tensor, b: Tensor) -> Tensor:
    """Per-pixel Gaussian similarity ``exp(-||z_a - z_b||^2 / (2 C))`` of standardised logits.

    ``z`` is the per-pixel standardisation of ``contrastive_alignment`` (over the C
    classes, unbiased std), so ``||z||^2 = C - 1`` and ``sigma^2 = C`` puts two
    independent pixels near ``exp(-1) ~ 0.37`` and identical ones at exactly 1, whatever C.
    Input ``[N, C]`` (pixels as rows) or ``[B, C, H, W]``; output the per-pixel similarities.
    """
    if a.dim() == 4:
        a, b = (t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]) for t in (a, b))
    za, zb = standardize(a.detach().float()), standardize(b.detach().float())
    return torch.exp(-(za - zb).pow(2).sum(dim=1) / (2 * a.shape[1]))


@torch.no_grad()
def positive_vs_random_similarity(a: Tensor, b: Tensor, max_pixels: int = 4096,
                                  generator: torch.Generator | None = None) -> Tensor:
    """``[2]``: mean Gaussian similarity of positive pairs (the same pixel in views ``a`` and
    ``b``) and of random pairs (a pixel of ``a`` against a random pixel of ``b``).

    Alignment is healthy when the first is clearly above the second; when both are
    high the predictions have collapsed to one output for every pixel. At most
    ``max_pixels`` pixels, drawn at random, are used.
    """
    n, c = a.shape[0] * a.shape[2] * a.shape[3], a.shape[1]
    flat_a = a.detach().permute(0, 2, 3, 1).reshape(n, c)
    flat_b = b.detach().permute(0, 2, 3, 1).reshape(n, c)
    idx = torch.randperm(n, device=a.device, generator=generator)[:max_pixels]
    partner = idx[torch.randperm(idx.numel(), device=a.device, generator=generator)]
    positive = gaussian_similarity(flat_a[idx], flat_b[idx]).mean()
    random = gaussian_similarity(flat_a[idx], flat_b[partner]).mean()
    return torch.stack((positive, random))


@torch.no_grad()
def prediction_agreement(a: Tensor, b: Tensor, ignore: Tensor | None = None) -> Tensor:
    """0-dim: share of (valid) pixels where the two predictions' argmax agree."""
    same = a.argmax(dim=1) == b.argmax(dim=1)
    if ignore is None:
        return same.float().mean()
    valid = ignore != IGNORE
    return (same & valid).sum() / valid.sum().clamp_min(1)


@torch.no_grad()
def parameter_distance(teacher: nn.Module, student: nn.Module) -> Tensor:
    """0-dim: ``||theta_T - theta_S|| / ||theta_S||`` over all parameters (relative L2 distance).

    An EMA teacher trails the student by a small, slowly varying amount; a
    distance that keeps growing means the two have drifted apart.
    """
    t = [p.detach().float() for p in teacher.parameters()]
    s = [p.detach().float() for p in student.parameters()]
    diff = torch._foreach_sub(t, s)
    num = torch.stack(torch._foreach_norm(diff)).pow(2).sum()
    den = torch.stack(torch._foreach_norm(s)).pow(2).sum()
    return (num / den.clamp_min(1e-12)).sqrt()


def loss_shares(scalars: dict[str, float], weights: dict[str, float]) -> dict[str, float]:
    """Share of each weighted loss term in the total: ``w_k * L_k / sum_j w_j * L_j``."""
    parts = {k: w * scalars[k] for k, w in weights.items() if k in scalars and math.isfinite(scalars[k])}
    total = sum(abs(v) for v in parts.values())
    return {k: (abs(v) / total if total > 0 else 0.0) for k, v in parts.items()}


# ---- health rules ---------------------------------------------------------------------------

HealthRules = DiagConfig
"""The thresholds of the failure signs are the ``diag.*`` config keys themselves (one source)."""


@dataclass(frozen=True)
class HealthWarning:
    rule: str
    message: str


ALIGN_TERMS = ("c_img", "c_feat")


def health_warnings(stats: dict[str, float], rules: HealthRules, best_selected: float | None = None,
                    progress: float = 1.0) -> list[HealthWarning]:
    """The failure signs shown by one log step's numbers (``stats``: flat name -> value).

    Keys read when present: ``c_img``/``c_feat`` (raw alignment terms) and ``share/<term>``
    (weighted loss shares), ``sim/img_rand``, ``sim/feat_rand``, ``selected_t``,
    ``teacher_distance``; at evaluations ``miou/student``, ``miou/teacher`` and
    ``spread/<network>`` (:func:`prediction_spread`).
    ``best_selected``: the highest ``selected_t`` before this step; ``progress``: the
    fraction of training done.
    """
    out = []
    align = [stats[f"share/{k}"] for k in ALIGN_TERMS if f"share/{k}" in stats]
    align_on = any(stats.get(k, 0) > 0 for k in ALIGN_TERMS)
    if align and sum(align) > rules.max_align_share:
        out.append(HealthWarning("alignment_dominates",
                                 f"the alignment term is {100 * sum(align):.0f}% of the total loss (> "
                                 f"{100 * rules.max_align_share:g}%): it can pull every pixel to the same "
                                 "output; lower method.lambda_c"))
    elif align and align_on and sum(align) < rules.min_align_share:
        out.append(HealthWarning("alignment_vanishes",
                                 f"the alignment term is {100 * sum(align):.2g}% of the total loss (< "
                                 f"{100 * rules.min_align_share:g}%): it no longer shapes training"))
    for level in ("img", "feat"):
        rand = stats.get(f"sim/{level}_rand")
        if rand is not None and math.isfinite(rand) and rand > rules.max_random_similarity:
            where = "image" if level == "img" else "feature"
            out.append(HealthWarning(f"collapse_{level}",
                                     f"{where}-level random pixel pairs are as similar as the same pixel "
                                     f"({rand:.3f} > {rules.max_random_similarity:g}): every pixel gets "
                                     "nearly the same output"))
    sel = stats.get("selected_t")
    if sel is not None and math.isfinite(sel):
        if best_selected is not None and best_selected >= rules.min_selected \
                and sel < rules.collapse_ratio * best_selected:
            out.append(HealthWarning("selection_collapse",
                                     f"the selected fraction fell to {100 * sel:.1f}% of unlabeled pixels from "
                                     f"a high of {100 * best_selected:.1f}%"))
        elif progress >= 0.5 and sel < rules.min_selected:
            out.append(HealthWarning("selection_starved",
                                     f"half-way through training only {100 * sel:.1f}% of unlabeled pixels are "
                                     f"selected (< {100 * rules.min_selected:g}%): the pseudo labels carry "
                                     "almost no signal; a lower method.tau_low would select more"))
    dist = stats.get("teacher_distance")
    if dist is not None and dist > rules.max_teacher_distance:
        out.append(HealthWarning("teacher_diverges",
                                 f"teacher and student parameters differ by {100 * dist:.0f}% (> "
                                 f"{100 * rules.max_teacher_distance:g}%)"))
    narrow = {key.removeprefix("spread/"): v for key, v in stats.items()
              if key.startswith("spread/") and math.isfinite(v) and v < rules.min_prediction_spread}
    if narrow:
        which = ", ".join(f"{name} {100 * v:.0f}%" for name, v in narrow.items())
        out.append(HealthWarning("single_class",
                                 "evaluation predicts almost one class everywhere: of the pixels whose truth is "
                                 f"not the most-predicted class, another class goes to {which} (< "
                                 f"{100 * rules.min_prediction_spread:g}%). If train-mode predictions look "
                                 "right, suspect batch-norm running statistics; else the learning rate"))
    t_miou, s_miou = stats.get("miou/teacher"), stats.get("miou/student")
    if t_miou is not None and s_miou is not None and t_miou < s_miou - rules.max_teacher_gap:
        out.append(HealthWarning("teacher_diverges",
                                 f"teacher mIoU {t_miou:.1f} is more than {rules.max_teacher_gap:g} points below "
                                 f"the student's {s_miou:.1f}"))
    return out


def prediction_spread(confusion: Tensor) -> float:
    """How far an evaluation is from predicting one class everywhere (``confusion`` ``[C, C]``,
    rows truth, columns prediction): the pixels predicted as anything but the most-predicted
    class over the pixels whose truth is anything but that class. About 1 when the classes are
    predicted as often as they occur, 0 when one class is predicted everywhere; NaN when the
    truth is that one class alone (nothing to tell)."""
    predicted = confusion.sum(dim=0)
    dominant = int(predicted.argmax())
    total = confusion.sum()
    truth_other = total - confusion[dominant].sum()
    if truth_other == 0:
        return math.nan
    return float((total - predicted[dominant]) / truth_other)


@torch.no_grad()
def pseudo_label_statistics(logits: Tensor, pseudo: Tensor, selected: Tensor, ignore: Tensor, tau_low: float,
                            ratio: float, fixed_threshold: float) -> dict[str, Tensor]:
    """What every method's report shows of one view's pseudo labels: the selected and pseudo-
    labelled pixels per class (``select_counts``), CPLG's thresholds (``cplg_thr``) and CPLG
    against a fixed confidence threshold (``cplg_vs_fixed``), whatever the method selects with."""
    n_classes = logits.shape[1]
    return {
        "select_counts": class_selection_counts(pseudo, selected, ignore, n_classes),
        "cplg_thr": cplg_thresholds(logits, tau_low, ratio),
        "cplg_vs_fixed": cplg_vs_fixed_counts(logits, ignore, tau_low, ratio, fixed_threshold),
    }
