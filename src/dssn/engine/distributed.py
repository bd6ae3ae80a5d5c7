"""Several processes, one run: torchrun set-up, sharding and the few collectives the engine needs.

``torchrun --nproc_per_node=N -m dssn train ...`` starts N copies of the trainer; each reads
``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` from its environment. Every process trains on its own
shard of each epoch with the same model; DistributedDataParallel averages the gradients, so the
student (and the EMA teacher computed from it) stays identical on every rank. Only rank 0 writes
files. Without those variables everything here degrades to a single process and no collective.
"""

from __future__ import annotations

import datetime
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dssn.errors import DssnError

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise DssnError(f"environment variable {name}={raw!r} is not an integer (set by torchrun)") from None


def init_distributed(device: torch.device) -> tuple[DistInfo, bool]:
    """Join the process group described by torchrun's environment (``nccl`` on GPUs, ``gloo`` on
    CPUs); on GPUs each process takes the GPU of its ``LOCAL_RANK``. Returns this process's place
    and whether the group was created here (a caller that set one up keeps it)."""
    info = DistInfo(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))
    if not info.enabled or dist.is_initialized():
        return info, False
    if device.type == "cuda":
        torch.cuda.set_device(info.local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return info, True


def process_device(device: torch.device, info: DistInfo) -> torch.device:
    """This process's device: GPU ``LOCAL_RANK`` for a CUDA run, else ``device`` unchanged."""
    if device.type == "cuda" and info.enabled:
        return torch.device("cuda", info.local_rank)
    return device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(indices: Iterable[T], info: DistInfo) -> list[T]:
    """This rank's share of ``indices``: every ``world_size``-th one, no padding, so that each
    item is seen by exactly one rank (evaluation counts every image once)."""
    return list(indices)[info.rank::info.world_size]


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum over ranks (a copy; the identity in a single process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return tensor
    out = tensor.clone()
    dist.all_reduce(out)
    return out


def all_reduce_mean(tensors: list[Tensor]) -> None:
    """Average floating-point tensors over ranks in place, as one flat transfer."""
    if not tensors or not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    torch._foreach_copy_(tensors, [chunk.view_as(t) for chunk, t in zip(flat.split([t.numel() for t in tensors]),
                                                                        tensors)])


def average_buffers(modules: Iterable[nn.Module]) -> None:
    """Make batch-norm running statistics equal on every rank (CPU runs, which have no SyncBN)."""
    all_reduce_mean([b for m in modules for b in m.buffers() if b.is_floating_point()])


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (any picklable object; only sent between our own processes)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_on_main(fn: Callable[[], T], info: DistInfo) -> T | None:
    """``fn()`` on rank 0 only: its result there, None on the other ranks. An error there is
    raised on every rank (with rank 0's message), so that no process waits for the others."""
    result, error = None, None
    if info.is_main:
        try:
            result = fn()
        except (DssnError, OSError) as err:
            error = err
    message = broadcast_from_main(None if error is None else str(error))
    if error is not None:
        raise error
    if message is not None:
        raise DssnError(f"rank 0 stopped: {message}")
    return result


def gather_to_main(value: Any) -> list[Any] | None:
    """Every rank's ``value``, in rank order, on rank 0 (None elsewhere)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(value, out, dst=0)
    return out


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel for the student. Parameters and buffers are copied from rank 0 at
    the start; buffers are not broadcast at each forward after that (the
    DSSN step calls the student twice before one backward, and SyncBN or ``average_buffers``
    already keeps them equal)."""
    ids = [device.index] if device.type == "cuda" else None
    with warnings.catch_warnings():
        # Deprecated in favour of `forward_sync_buffers`, which hung our two-process CPU test (torch 2.13).
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        return nn.parallel.DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)
