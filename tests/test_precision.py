"""``train.precision``: what ``auto`` picks on each kind of hardware (queries mocked), and that a run
logs and records the choice."""

import json

import pytest
import torch

from dssn.config import load_config
from dssn.engine import precision
from dssn.engine.precision import precision_name, resolve_precision
from dssn.engine.trainer import build_training, train
from test_engine import tiny

CPU = torch.device("cpu")
GPU = torch.device("cuda", 0)


@pytest.fixture
def cpu_has(monkeypatch):
    """``cpu_has(["AVX-512 BF16"])``: pretend this CPU has those native bf16 instruction sets."""
    def set_features(features: list[str], level: str = "AVX512") -> None:
        monkeypatch.setattr(precision, "cpu_native_bf16", lambda: list(features))
        monkeypatch.setattr(precision, "_cpu_native_fp16", lambda: [])
        monkeypatch.setattr(precision, "_cpu_level", lambda: level)
    return set_features


@pytest.fixture
def gpu_has(monkeypatch):
    """``gpu_has(True, "NVIDIA H200, compute capability 9.0")``: pretend the GPU is like that."""
    def set_gpu(native: bool, what: str) -> None:
        monkeypatch.setattr(precision, "cuda_native_bf16", lambda device: (native, what))
    return set_gpu


def test_auto_is_the_default():
    assert load_config("pascal").train.precision == "auto"
    assert load_config("synthetic").train.precision == "auto"


def test_auto_on_a_gpu_with_native_bf16(gpu_has):
    gpu_has(True, "NVIDIA H200, compute capability 9.0")
    dtype, reason = resolve_precision("auto", GPU)
    assert dtype == torch.bfloat16
    assert reason == "auto: GPU with native bf16 (NVIDIA H200, compute capability 9.0) -> bf16"


def test_auto_on_a_gpu_without_native_bf16_is_fp32(gpu_has):
    # fp16 would be faster on such a GPU but needs loss scaling: it stays an explicit choice.
    gpu_has(False, "Tesla V100-SXM2-16GB, compute capability 7.0")
    dtype, reason = resolve_precision("auto", GPU)
    assert dtype is None
    assert reason.startswith("auto: GPU without native bf16 (Tesla V100") and "train.precision=fp16" in reason


@pytest.mark.parametrize("features", [["AVX-512 BF16"], ["AMX-BF16", "AVX-512 BF16"]])
def test_auto_on_a_cpu_with_native_bf16(cpu_has, features):
    cpu_has(features)
    dtype, reason = resolve_precision("auto", CPU)
    assert dtype == torch.bfloat16
    assert reason == f"auto: CPU with native bf16 ({', '.join(features)}) -> bf16"


def test_auto_on_a_cpu_without_native_bf16_is_fp32(cpu_has):
    cpu_has([], level="AVX2")
    reason = "auto: CPU without native bf16 (no AVX-512 BF16 or AMX; AVX2) -> fp32"
    assert resolve_precision("auto", CPU) == (None, reason)


def test_auto_on_other_devices_is_fp32():
    dtype, reason = resolve_precision("auto", torch.device("mps"))
    assert dtype is None and reason.startswith("auto: mps device -> fp32")


@pytest.mark.parametrize("setting, dtype", [("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_explicit_choices_are_followed_on_any_hardware(cpu_has, gpu_has, setting, dtype):
    for native in (True, False):
        cpu_has(["AVX-512 BF16"] if native else [])
        gpu_has(native, "some GPU")
        for device in (CPU, GPU):
            got, reason = resolve_precision(setting, device)
            assert got == dtype and reason.startswith(f"explicit: train.precision={setting}")
            assert precision_name(got) == setting


def test_explicit_low_precision_without_native_support_warns(cpu_has, gpu_has):
    cpu_has([], level="AVX2")
    assert "warning: this CPU (AVX2) has no native bf16" in resolve_precision("bf16", CPU)[1]
    assert "warning: this CPU (AVX2) has no native fp16" in resolve_precision("fp16", CPU)[1]
    assert "warning" not in resolve_precision("fp32", CPU)[1]
    cpu_has(["AVX-512 BF16"])
    assert resolve_precision("bf16", CPU)[1].endswith("(native on this CPU: AVX-512 BF16)")
    gpu_has(False, "Tesla T4, compute capability 7.5")
    assert "only emulates bf16" in resolve_precision("bf16", GPU)[1]
    assert "warning" not in resolve_precision("fp16", GPU)[1]


def test_unknown_setting_is_refused():
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        resolve_precision("fp8", CPU)


def test_auto_on_this_machine_follows_the_real_query():
    """No mock: ``auto`` on this CPU agrees with what PyTorch's cpuinfo reports."""
    if hasattr(torch.cpu, "get_capabilities"):
        caps = torch.cpu.get_capabilities()
        assert bool(precision.cpu_native_bf16()) == bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    dtype, reason = resolve_precision("auto", CPU)
    assert dtype == (torch.bfloat16 if precision.cpu_native_bf16() else None)
    assert reason.startswith("auto: CPU with native bf16" if dtype else "auto: CPU without native bf16")


@pytest.mark.parametrize("setting, native, dtype", [("auto", True, torch.bfloat16), ("auto", False, None),
                                                    ("fp16", False, torch.float16)])
def test_build_training_uses_the_resolved_precision(cpu_has, setting, native, dtype):
    cpu_has(["AVX-512 BF16"] if native else [])
    cfg = load_config("synthetic", ["model.decoder_channels=16", "train.device=cpu", f"train.precision={setting}"])
    parts = build_training(cfg, CPU, iters_per_epoch=10)
    assert parts.autocast_dtype == dtype and parts.precision_reason.startswith(setting if setting == "auto"
                                                                                else "explicit")
    assert parts.scaler.is_enabled() == (dtype == torch.float16)  # loss scaling for fp16 only


def test_a_run_logs_and_records_the_choice(data_root, tmp_path, cpu_has, capsys):
    cpu_has(["AVX-512 BF16"])  # auto -> bf16 here, whatever this CPU is (a tiny run, slow bf16 is fine)
    run = tmp_path / "run"
    train(tiny(data_root, run, "method.name=supervised", "train.iters=1", "diag.panels=0", "train.precision=auto"))
    info = json.loads((run / "run_info.json").read_text())
    assert info["precision"] == "bf16"
    assert info["precision_reason"] == "auto: CPU with native bf16 (AVX-512 BF16) -> bf16"
    assert "precision: bf16 (auto: CPU with native bf16 (AVX-512 BF16) -> bf16)" in capsys.readouterr().err
