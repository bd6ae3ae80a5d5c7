"""What a process runs on: device, threads, seeds, determinism, data loaders.

Imports nothing else of the engine's but the loaders' samplers, so that training,
evaluation and the user tasks above the engine all share one set-up.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dssn.engine.distributed import DistInfo
from dssn.engine.sampling import ResumableSampler, SeededDataset


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    # Each worker's torch seed is already distinct (base seed + id); derive the others from it.
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int, num_workers: int,
                device: torch.device, drop_last: bool = True) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      num_workers=num_workers, pin_memory=device.type == "cuda",
                      worker_init_fn=_seed_worker, generator=generator,
                      persistent_workers=num_workers > 0)


def make_train_loader(dataset: Dataset, batch_size: int, seed: int, num_workers: int,
                      device: torch.device, dist: DistInfo = DistInfo()) -> DataLoader:
    """A shuffled training loader whose stream can stop and continue exactly (``engine.sampling``):
    the order and every sample's augmentation depend only on ``(seed, epoch, position)``. In a
    distributed run it yields this rank's shard of every epoch."""
    sampler = ResumableSampler(len(dataset), seed, rank=dist.rank, world_size=dist.world_size)
    return DataLoader(SeededDataset(dataset), batch_size=batch_size, sampler=sampler, drop_last=True,
                      num_workers=num_workers, pin_memory=device.type == "cuda",
                      worker_init_fn=_seed_worker, generator=torch.Generator().manual_seed(seed),
                      persistent_workers=num_workers > 0)


def set_deterministic(enabled: bool) -> None:
    """``train.deterministic``: deterministic kernels only (a warning where one has none)."""
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def to_device(batch: Any, device: torch.device, channels_last: bool = False) -> Any:
    """A loader's batch (tensors in tuples, lists and dicts) on ``device``; images (4-D floats)
    channels-last if asked."""
    if isinstance(batch, dict):
        return {k: to_device(v, device, channels_last) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return tuple(to_device(v, device, channels_last) for v in batch)
    out = batch.to(device, non_blocking=device.type == "cuda")
    if channels_last and out.dim() == 4 and out.is_floating_point():
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def use_channels_last(setting: bool | str, device: torch.device) -> bool:
    """``train.channels_last``: ``auto`` is on for GPUs only (on the CPUs measured it was slower)."""
    return device.type == "cuda" if setting == "auto" else bool(setting)
