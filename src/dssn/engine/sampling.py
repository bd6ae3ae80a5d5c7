"""A training data stream that can stop anywhere and continue exactly.

Two pieces make the stream a pure function of ``(seed, epoch, position)``:

- ``ResumableSampler``: each epoch's order is a permutation drawn from a
  generator seeded by ``(seed, epoch)``, and each position also gets its own
  64-bit sample seed; ``set_epoch(epoch, skip)`` starts an epoch part-way
  through without reading the skipped images.
- ``SeededDataset``: runs the wrapped dataset's ``__getitem__`` with torch's
  generator seeded by the sample seed (inside ``fork_rng``, so the caller's
  stream is untouched), which makes every random augmentation depend on the
  sample alone, not on which worker loaded it or what was loaded before.

Resuming at step ``s`` is then: ``set_epoch(s // iters_per_epoch,
(s % iters_per_epoch) * batch_size)``; the images, their augmentations and the
model's own random draws (restored separately) continue as if never stopped,
with any ``num_workers``.

In a distributed run every rank draws the same permutation and takes every
``world_size``-th position of it (``rank``, ``rank + world_size``, ...), the
tail cut so that all ranks have as many; positions, skips and lengths are
then per rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def _epoch_seed(seed: int, epoch: int) -> int:
    state = np.random.SeedSequence([seed % 2**63, epoch]).generate_state(1, np.uint64)
    return int(state[0]) >> 1


class ResumableSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, sample_seed)``: a seeded per-epoch order that can start mid-epoch."""

    def __init__(self, size: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1) -> None:
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.per_rank = size // world_size
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """The next iteration yields epoch ``epoch`` from (this rank's) position ``skip`` on."""
        if not 0 <= skip <= self.per_rank:
            raise ValueError(f"skip must be in [0, {self.per_rank}], got {skip}")
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return self.per_rank - self.skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
        order = torch.randperm(self.size, generator=g) if self.shuffle else torch.arange(self.size)
        seeds = torch.randint(0, 2**62, (self.size,), generator=g)
        mine = slice(self.rank + self.skip * self.world_size, self.per_rank * self.world_size, self.world_size)
        yield from zip(order[mine].tolist(), seeds[mine].tolist())


class SeededDataset(Dataset):
    """``dataset[index]`` with torch's generator seeded by the sampler's per-sample seed."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            # The CPU generator alone: torch.manual_seed would also queue seeds for every
            # accelerator backend, capturing a stack trace each time (about 2 ms a sample).
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]
