"""Evaluation (docs/method.md §7): confusion-matrix mIoU over the whole set, three inference modes,
optional multi-scale and flip averaging (``eval.scales``, ``eval.flip``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dssn.constants import IGNORE
from dssn.method.diagnostics import prediction_spread


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """``[C, C]`` int64 counts, rows = ground truth, columns = prediction; 255 excluded."""
    valid = target != IGNORE
    index = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def mean_iou(confusion: Tensor) -> tuple[float, Tensor]:
    """``(mIoU, per-class IoU)`` in [0, 1] from an accumulated confusion matrix.

    A class absent from both ground truth and prediction has no IoU (NaN) and is
    left out of the mean rather than counted as 0 or 1.
    """
    confusion = confusion.double()
    intersection = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - intersection
    per_class = torch.where(union > 0, intersection / union.clamp_min(1), torch.nan)
    present = ~per_class.isnan()
    miou = per_class[present].mean().item() if present.any() else float("nan")
    return miou, per_class


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Window offsets covering ``[0, size)``; the last window is shifted inward so all are full."""
    if size <= window:
        return [0]
    starts = list(range(0, size - window, stride))
    return starts + [size - window]


def sliding_window_logits(model: nn.Module, image: Tensor, num_classes: int, window: int,
                          stride: int, batch_size: int = 8) -> Tensor:
    """Sum of softmax probabilities over overlapping windows, the windows run in batches."""
    b, _, h, w = image.shape
    win_h, win_w = min(window, h), min(window, w)
    boxes = [(r, c) for r in window_starts(h, win_h, stride) for c in window_starts(w, win_w, stride)]
    total = image.new_zeros((b, num_classes, h, w))
    for i in range(0, len(boxes), batch_size):
        chunk = boxes[i : i + batch_size]
        crops = torch.cat([image[:, :, r : r + win_h, c : c + win_w] for r, c in chunk])
        probs = model(crops).softmax(dim=1).split(b)
        for (r, c), prob in zip(chunk, probs):
            total[:, :, r : r + win_h, c : c + win_w] += prob
    return total


def center_crop(tensor: Tensor, size: int) -> Tensor:
    h, w = tensor.shape[-2:]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return tensor[..., top : top + size, left : left + size]


def predict(model: nn.Module, image: Tensor, num_classes: int, mode: str = "whole",
            crop_size: int | None = None, stride_ratio: float = 2 / 3) -> Tensor:
    """Class scores ``[B, C, H, W]`` for one batch (for ``center_crop``, of the crop)."""
    if mode == "whole":
        return model(image)
    if crop_size is None:
        raise ValueError(f"eval mode '{mode}' needs a crop size (eval.crop_size)")
    if mode == "center_crop":
        return model(center_crop(image, crop_size))
    if mode == "sliding":
        stride = max(1, math.ceil(crop_size * stride_ratio))
        return sliding_window_logits(model, image, num_classes, crop_size, stride)
    raise ValueError(f"unknown eval mode '{mode}' (whole, center_crop, sliding)")


def predict_tta(model: nn.Module, image: Tensor, num_classes: int, mode: str = "whole",
                crop_size: int | None = None, stride_ratio: float = 2 / 3, scales: Sequence[float] = (1.0,),
                flip: bool = False) -> Tensor:
    """Class scores ``[B, C, H, W]`` with optional test-time augmentation.

    With ``scales == [1.0]`` and no ``flip`` this is :func:`predict`. Otherwise the
    image (for ``center_crop``: its crop) is resized by each scale (bilinear,
    ``align_corners=True``) and, with ``flip``, also mirrored; each pass runs in
    ``mode`` (sliding windows keep ``crop_size`` at every scale), its softmax
    probabilities are brought back to the input size and averaged.
    """
    if list(scales) == [1.0] and not flip:
        return predict(model, image, num_classes, mode, crop_size, stride_ratio)
    if mode == "center_crop":
        if crop_size is None:
            raise ValueError("eval mode 'center_crop' needs a crop size (eval.crop_size)")
        image, mode = center_crop(image, crop_size), "whole"
    h, w = image.shape[-2:]
    total: Tensor | None = None
    flips = (False, True) if flip else (False,)
    for scale in scales:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        scaled = image if size == (h, w) else F.interpolate(image, size=size, mode="bilinear", align_corners=True)
        for mirrored in flips:
            x = scaled.flip(-1) if mirrored else scaled
            out = predict(model, x, num_classes, mode, crop_size, stride_ratio)
            # Sliding windows return summed probabilities: divide by the windows covering each pixel.
            probs = out / out.sum(1, keepdim=True) if mode == "sliding" else out.softmax(1)
            if mirrored:
                probs = probs.flip(-1)
            if probs.shape[-2:] != (h, w):
                probs = F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=True)
            total = probs if total is None else total + probs
    assert total is not None
    return total / (len(scales) * len(flips))


@dataclass
class EvalResult:
    confusion: Tensor
    miou: float
    per_class: Tensor

    def summary(self, class_names: list[str] | None = None) -> dict:
        names = class_names or [str(i) for i in range(len(self.per_class))]
        total = max(int(self.confusion.sum()), 1)
        spread = prediction_spread(self.confusion)
        return {
            "miou": self.miou * 100,
            "per_class": {n: (None if math.isnan(v) else v * 100) for n, v in zip(names, self.per_class.tolist())},
            # what the network predicts, for the single-class health check (docs/diagnostics.md)
            "predicted_share": {n: c / total for n, c in zip(names, self.confusion.sum(dim=0).tolist())},
            "prediction_spread": None if math.isnan(spread) else spread,
        }


@torch.inference_mode()
def evaluate(models: dict[str, nn.Module], batches: Iterable, num_classes: int, device: torch.device,
             mode: str = "whole", crop_size: int | None = None, stride_ratio: float = 2 / 3,
             scales: Sequence[float] = (1.0,), flip: bool = False,
             reduce: Callable[[Tensor], Tensor] | None = None) -> dict[str, EvalResult]:
    """Score several models in one pass over ``(image, mask, ...)`` batches.

    ``scales``/``flip``: test-time augmentation (:func:`predict_tta`). ``reduce``: applied to
    each model's confusion matrix before scoring; distributed evaluation passes a sum
    all-reduce here, each process having iterated only its own shard of the set.
    """
    confusions = {name: torch.zeros(num_classes, num_classes, dtype=torch.long, device=device) for name in models}
    was_training = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    try:
        for image, mask, *_ in batches:
            image, mask = image.to(device), mask.to(device)
            if mode == "center_crop":
                mask = center_crop(mask, crop_size)
            for name, model in models.items():
                pred = predict_tta(model, image, num_classes, mode, crop_size, stride_ratio, scales, flip).argmax(dim=1)
                confusions[name] += confusion_matrix(pred, mask, num_classes)
    finally:
        for name, m in models.items():
            m.train(was_training[name])
    results = {}
    for name, conf in confusions.items():
        if reduce is not None:
            conf = reduce(conf)
        miou, per_class = mean_iou(conf.cpu())
        results[name] = EvalResult(conf.cpu(), miou, per_class)
    return results
