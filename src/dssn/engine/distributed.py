"""Several processes, one run: torchrun set-up, sharding and the few collectives the engine needs.

``torchrun --nproc_per_node=N -m dssn train ...`` starts N copies of the trainer; each reads
``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` from its environment. Every process trains on its own
shard of each epoch with the same model; DistributedDataParallel averages the gradients, so the
student (and the EMA teacher computed from it) stays identical on every rank. Only rank 0 writes
files. Without those variables everything here degrades to a single process and no collective.

``srun dssn train ...`` needs no torchrun: under SLURM (``SLURM_PROCID`` and ``SLURM_NTASKS`` set,
torchrun's ``RANK``/``WORLD_SIZE`` not) the same variables come from SLURM's (``slurm_env``); torchrun's
win when both are set.
"""

from __future__ import annotations

import datetime
import os
import re
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
        raise DssnError(f"environment variable {name}={raw!r} is not an integer (set by torchrun or "
                        "from SLURM's variables)") from None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``node[01-03,07],gpu5`` -> ``node01``,
    ``rack[1-2]-n[4-5]`` -> ``rack1-n4``."""
    depth, end = 0, len(nodelist)
    for i, char in enumerate(nodelist):  # the first entry: up to a comma outside brackets
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = i
            break
    entry = nodelist[:end].strip()
    # Each bracket group's first value: the start of its first range (zero padding kept).
    host = re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], entry)
    if not host or "[" in host or "]" in host:
        raise DssnError(f"cannot read the first host of SLURM_JOB_NODELIST={nodelist!r}; set MASTER_ADDR to it")
    return host


def slurm_env(env: dict[str, str] | os._Environ = os.environ) -> dict[str, str]:
    """torchrun's variables made from SLURM's, for ``srun`` launches: rank ``SLURM_PROCID``, world
    size ``SLURM_NTASKS`` (``SLURM_STEP_NUM_TASKS`` inside an ``srun`` step), local rank
    ``SLURM_LOCALID``, rendezvous at the first host of ``SLURM_JOB_NODELIST`` on a port derived from
    ``SLURM_JOB_ID`` (10000-59999). Empty when torchrun's ``RANK`` and ``WORLD_SIZE`` are set (they
    win), outside SLURM, or for a single task. ``MASTER_ADDR``/``MASTER_PORT`` already set are kept."""
    if "RANK" in env and "WORLD_SIZE" in env or "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return {}
    world = env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"]
    if world.strip() == "1":
        return {}
    job = env.get("SLURM_JOB_ID", "0")
    port = 10000 + (int(job) if job.isdigit() else sum(job.encode())) % 50000
    out = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": world, "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
           "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST") or "127.0.0.1"),
           "MASTER_PORT": env.get("MASTER_PORT") or str(port)}
    for name, value in out.items():
        if name != "MASTER_ADDR" and not value.strip().isdigit():
            raise DssnError(f"SLURM variable for {name} is {value!r}, not an integer; launch with srun")
    return out


def init_distributed(device: torch.device) -> tuple[DistInfo, bool]:
    """Join the process group described by torchrun's environment, or SLURM's (``slurm_env``;
    ``nccl`` on GPUs, ``gloo`` on CPUs); on GPUs each process takes the GPU of its ``LOCAL_RANK``.
    Returns this process's place and whether the group was created here (a caller that set one up
    keeps it)."""
    os.environ.update(slurm_env())  # torch's env:// rendezvous reads them
    info = DistInfo(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))
    if not info.enabled or dist.is_initialized():
        return info, False
    if device.type == "cuda":
        torch.cuda.set_device(_local_gpu(info))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return info, True


def process_device(device: torch.device, info: DistInfo) -> torch.device:
    """This process's device: GPU ``LOCAL_RANK`` for a CUDA run, else ``device`` unchanged."""
    if device.type == "cuda" and info.enabled:
        return torch.device("cuda", _local_gpu(info))
    return device


def _local_gpu(info: DistInfo) -> int:
    """The GPU of ``LOCAL_RANK``; one that sees a single GPU (``srun --gpus-per-task=1``) takes it."""
    return info.local_rank % max(torch.cuda.device_count(), 1)


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
