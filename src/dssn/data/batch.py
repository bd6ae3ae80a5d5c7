"""The unlabeled views a semi-supervised step trains on (``docs/method.md`` §6).

NamedTuples rather than dicts or dataclasses: torch's ``default_collate`` stacks them field by
field and keeps the type, so one sample and a loader's batch are the same type.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class UnlabeledViews(NamedTuple):
    """One unlabeled crop's views; in a batch each field gains a leading ``B``."""

    weak: Tensor
    """The weak view (resize, crop, flip): float ``[B,3,H,W]``, normalized."""
    strong1: Tensor
    """A strong view of the same crop: float ``[B,3,H,W]``."""
    strong2: Tensor
    """A second strong view, drawn independently of ``strong1``: float ``[B,3,H,W]``."""
    ignore: Tensor
    """long ``[B,H,W]``: 255 where the crop padded the image, 0 elsewhere."""
    box1: Tensor
    """bool ``[B,H,W]``: the CutMix box of ``strong1``, where a partner's pixels are pasted."""
    box2: Tensor
    """bool ``[B,H,W]``: the CutMix box of ``strong2``."""
