"""Channel-dropout keep masks for the feature-perturbed streams (docs/method.md §2.4).

A keep mask holds 0 or 2 per image and channel (dropout p=0.5, kept channels scaled by 2),
so a perturbed feature is ``feature * mask`` broadcast over its spatial positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["FEATURE_DROPOUT_MODES", "comp_drop_masks", "stream_keep_masks"]

FEATURE_DROPOUT_MODES = ("independent", "complementary")
_DROP_PROB = 0.5
# comp_drop: this share of the image pairs is left unperturbed (masks all ones).
_UNPERTURBED_PAIR_SHARE = 0.5


def check_forward_options(n_perturb: int, comp_drop: bool) -> None:
    """The perturbation options a segmentation network's ``forward`` takes."""
    if n_perturb < 0:
        raise ValueError(f"n_perturb must be >= 0, got {n_perturb}")
    if comp_drop and n_perturb:
        raise ValueError("comp_drop and n_perturb cannot be combined")


def _bernoulli_keep(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    keep = torch.bernoulli(torch.full(shape, 1.0 - _DROP_PROB, device=device, dtype=dtype))
    return keep / (1.0 - _DROP_PROB)


def stream_keep_masks(
    n_streams: int,
    batch: int,
    channels: int,
    mode: str = "independent",
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Keep masks ``[n_streams, batch, channels]``, one per stream and image.

    ``independent``: every mask drawn on its own. ``complementary``: streams pair up and the
    second of each pair is ``2 - first`` (each channel is kept in exactly one of the two); an
    odd last stream is drawn on its own.
    """
    if mode not in FEATURE_DROPOUT_MODES:
        raise ValueError(f"feature_dropout must be one of {FEATURE_DROPOUT_MODES}, got {mode!r}")
    masks = _bernoulli_keep((n_streams, batch, channels), torch.device(device), dtype)
    if mode == "complementary":
        seconds = masks[1::2]
        seconds.copy_(2.0 - masks[0::2][: seconds.shape[0]])
    return masks


def comp_drop_masks(
    batch: int,
    channels: Sequence[int],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> list[Tensor]:
    """UniMatch V2's complementary dropout for a batch ``cat(s1, s2)`` of two views per image.

    Returns one mask ``[batch, c]`` per entry of ``channels``: the first half's rows are drawn
    (0 or 2), the second half's are their complement ``2 - m``, and ``int(batch / 2 * 0.5)``
    image pairs, picked at random and shared by all entries, get all-ones masks in both halves
    (left unperturbed).
    """
    if batch % 2:
        raise ValueError(f"comp_drop needs a batch of two equal halves, got {batch} images")
    half = batch // 2
    device = torch.device(device)
    firsts = [_bernoulli_keep((half, c), device, dtype) for c in channels]
    unperturbed = torch.randperm(half, device=device)[: int(half * _UNPERTURBED_PAIR_SHARE)]
    masks = []
    for first in firsts:
        first[unperturbed] = 1.0
        masks.append(torch.cat([first, 2.0 - first]))
    return masks
