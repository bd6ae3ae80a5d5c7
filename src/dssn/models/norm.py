"""Batch-norm passes that must not move the running statistics evaluation uses."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["frozen_bn_statistics"]


@contextmanager
def frozen_bn_statistics(module: nn.Module) -> Iterator[None]:
    """Inside, batch norm in training mode still normalises with batch statistics, but momentum 0
    keeps the running ones (and ``num_batches_tracked``) as they were. For passes whose inputs
    evaluation never sees: a recomputation, or features under dropout. No-op without batch norm."""
    saved = [(bn, bn.momentum, bn.num_batches_tracked.clone() if bn.num_batches_tracked is not None else None)
             for bn in module.modules() if isinstance(bn, nn.modules.batchnorm._BatchNorm)]
    for bn, _, _ in saved:
        bn.momentum = 0.0
    try:
        yield
    finally:
        for bn, momentum, tracked in saved:
            bn.momentum = momentum
            if tracked is not None:
                bn.num_batches_tracked.copy_(tracked)
