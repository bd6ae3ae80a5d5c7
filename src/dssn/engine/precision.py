"""``train.precision``: which autocast dtype the training step runs in, and why.

``auto`` picks bfloat16 where the hardware computes it natively and float32 elsewhere:

- CUDA GPUs of compute capability 8.0 or newer (Ampere, Hopper, ...) and ROCm GPUs: bf16;
  older GPUs: fp32 (their bf16 is emulated; ``fp16`` uses their tensor cores, with loss scaling,
  but stays an explicit choice);
- CPUs with AMX-BF16 or AVX-512 BF16 (Sapphire Rapids and later, Zen 4 and later): bf16. On a
  2-core Zen 4 the DSSN step (ResNet-50, crop 321, 2 + 2) took 8.6 s in bf16 against 15.9 s in
  fp32; on an AVX2-only EPYC bf16 was 22 times slower than fp32, so every other CPU gets fp32;
- any other device: fp32.

The hardware queries are the two small functions ``cpu_native_bf16`` and ``cuda_native_bf16``,
so that tests can replace them. Evaluation always runs in float32; this only concerns training.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Autocast dtype of each explicit setting (None: no autocast, float32)."""

# cpuinfo's feature names (as ``torch.cpu.get_capabilities`` reports them) -> how the log names them.
_CPU_BF16_FEATURES = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX-512 BF16"}
_CPU_FP16_FEATURES = {"amx_fp16": "AMX-FP16", "avx512_fp16": "AVX-512 FP16"}


def _cpu_capabilities() -> Mapping[str, Any]:
    """cpuinfo's view of this CPU through PyTorch (the instruction sets oneDNN dispatches on)."""
    query = getattr(torch.cpu, "get_capabilities", None)  # public in recent torch
    if query is not None:
        return query()
    # Older torch: its private per-feature helpers, where they exist (AMX tiles imply AMX-BF16).
    helpers = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
    return {key: bool(getattr(torch.cpu, name, lambda: False)()) for key, name in helpers.items()}


def cpu_native_bf16() -> list[str]:
    """The native bf16 instruction sets of this CPU (``["AVX-512 BF16"]`` on Zen 4), empty if none.

    Not ``torch.ops.mkldnn._is_mkldnn_bf16_supported``: it is also true on AVX-512 CPUs without
    bf16 instructions, where oneDNN emulates bf16."""
    caps = _cpu_capabilities()
    return [label for key, label in _CPU_BF16_FEATURES.items() if caps.get(key)]


def _cpu_native_fp16() -> list[str]:
    caps = _cpu_capabilities()
    return [label for key, label in _CPU_FP16_FEATURES.items() if caps.get(key)]


def _cpu_level() -> str:
    """The vector level PyTorch's own kernels use here (``AVX2``, ``AVX512``, ...)."""
    return torch.backends.cpu.get_cpu_capability()


def cuda_native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether the GPU computes bf16 natively, and a description (name, compute capability)."""
    name = torch.cuda.get_device_name(device)
    if torch.version.hip:  # every ROCm GPU PyTorch supports has bf16
        return True, f"{name} (ROCm)"
    major, minor = torch.cuda.get_device_capability(device)
    return major >= 8, f"{name}, compute capability {major}.{minor}"


def precision_name(dtype: torch.dtype | None) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for an autocast dtype from :func:`resolve_precision`."""
    return next(name for name, d in DTYPES.items() if d == dtype)


def resolve_precision(setting: str, device: torch.device) -> tuple[torch.dtype | None, str]:
    """The autocast dtype of the training step (None: float32) and a one-line reason for the log.

    ``setting`` is ``train.precision``: ``auto`` decides by the hardware (module docstring);
    ``fp32``, ``bf16`` and ``fp16`` are followed as given, with a warning in the reason where
    the device has no native support (an explicit choice is respected, never changed)."""
    if setting != "auto":
        if setting not in DTYPES:
            raise ValueError(f"unknown precision '{setting}' (auto, fp32, bf16, fp16)")
        return DTYPES[setting], f"explicit: train.precision={setting}" + _explicit_warning(setting, device)
    if device.type == "cuda":
        native, what = cuda_native_bf16(device)
        if native:
            return torch.bfloat16, f"auto: GPU with native bf16 ({what}) -> bf16"
        return None, (f"auto: GPU without native bf16 ({what}) -> fp32; train.precision=fp16 would use its "
                      "tensor cores (with loss scaling)")
    if device.type == "cpu":
        native = cpu_native_bf16()
        if native:
            return torch.bfloat16, f"auto: CPU with native bf16 ({', '.join(native)}) -> bf16"
        return None, f"auto: CPU without native bf16 (no AVX-512 BF16 or AMX; {_cpu_level()}) -> fp32"
    return None, f"auto: {device.type} device -> fp32 (bf16 is chosen on CUDA GPUs and CPUs with native bf16)"


def _explicit_warning(setting: str, device: torch.device) -> str:
    """A warning for an explicit low precision the device only emulates (slow), else ''."""
    if setting == "fp32":
        return ""
    if device.type == "cuda":
        native, what = cuda_native_bf16(device)
        return "" if setting == "fp16" or native else f"; warning: this GPU ({what}) only emulates bf16 (slow)"
    if device.type != "cpu":
        return ""
    native = cpu_native_bf16() if setting == "bf16" else _cpu_native_fp16()
    if native:
        return f" (native on this CPU: {', '.join(native)})"
    return f"; warning: this CPU ({_cpu_level()}) has no native {setting}: expect it many times slower than fp32"
