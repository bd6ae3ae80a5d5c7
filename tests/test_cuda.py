"""What only a GPU can show: mixed precision with loss scaling, channels-last, SyncBatchNorm and
DDP over NCCL (in a one-process group), sliding-window evaluation on the GPU.

Every test here is marked ``cuda`` and skipped without a CUDA GPU; ``benchmarks/gpu_check.sh``
runs them (``pytest -m cuda``)."""

import copy
import json
import math

import pytest
import torch
from torch import nn

from dssn.config import load_config
from dssn.engine.distributed import DistInfo
from dssn.engine.evaluate import sliding_window_logits
from dssn.engine.precision import resolve_precision
from dssn.engine.trainer import build_training, optimizer_step, to_device, train
from dssn.method import Batch
from dssn.models import build_model
from test_engine import tiny
from test_methods import make_batch

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GPU = torch.device("cuda", 0)


@pytest.fixture
def exact_fp32():
    """No TF32 in convolutions or matmuls, so that float32 results can be compared tightly."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def nccl_group(tmp_path):
    """A one-process NCCL group: the engine's distributed code paths on one GPU (no real exchange)."""
    if not torch.distributed.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    torch.cuda.set_device(GPU)
    store = torch.distributed.FileStore(str(tmp_path / "nccl_store"), 1)
    torch.distributed.init_process_group("nccl", store=store, rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def native_bf16() -> bool:
    return bool(torch.version.hip) or torch.cuda.get_device_capability(GPU)[0] >= 8


def small_config(*extra: str):
    return load_config("synthetic", ["model.decoder_channels=16", "train.device=cuda", "method.name=dssn",
                                     "method.teacher_bn=batch", *extra])


def step_parts(cfg, dist: DistInfo = DistInfo(), micro_batches: int = 1):
    """One DSSN optimizer step from seeded weights on fixed batches: the losses and the student's gradients."""
    torch.manual_seed(0)
    parts = build_training(cfg, GPU, iters_per_epoch=10, dist=dist)
    batches = [Batch(*to_device((b.labeled, b.unlabeled, b.mix), GPU, parts.channels_last))
               for b in (make_batch(seed=i) for i in range(micro_batches))]
    torch.manual_seed(1)  # the same feature dropout in both runs
    out = optimizer_step(parts.method, parts.optimizer, batches, 2, parts.scaler, parts.autocast_dtype, parts.ddp)
    losses = {k: v.item() for k, v in out[0].items() if k in ("loss", "x", "s", "fp", "c_img", "c_feat")}
    grads = {n: p.grad.float().contiguous() for n, p in parts.method.student_net.named_parameters()
             if p.grad is not None}
    return parts, losses, grads


def assert_steps_match(a, b, rtol: float = 1e-3) -> None:
    (_, losses_a, grads_a), (_, losses_b, grads_b) = a, b
    for k in losses_b:
        assert losses_a[k] == pytest.approx(losses_b[k], rel=rtol, abs=1e-6), k
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_b:
        diff, size = (grads_a[name] - grads_b[name]).norm().item(), grads_b[name].norm().item()
        assert diff <= rtol * size + 1e-7, f"{name}: gradient differs by {diff:.3g} (norm {size:.3g})"


@pytest.mark.parametrize("setting", ["bf16", "fp16", "auto"])
def test_mixed_precision_trains_on_the_gpu(data_root, tmp_path, setting):
    run = tmp_path / "run"
    result = train(tiny(data_root, run, "method.name=dssn", "train.iters=2", "train.device=cuda",
                        f"train.precision={setting}"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses)
    assert 0 <= result.final["teacher"]["miou"] <= 100
    chosen = {"auto": "bf16" if native_bf16() else "fp32"}.get(setting, setting)
    assert json.loads((run / "run_info.json").read_text())["precision"] == chosen
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ("scaler" in ckpt) == (chosen == "fp16")  # GradScaler for fp16 only
    if chosen == "fp16":
        assert 0 < ckpt["scaler"]["scale"] < float("inf")
    assert all(v.dtype == torch.float32 for v in ckpt["models"]["student"].values() if v.is_floating_point())


def test_auto_on_this_gpu_follows_the_real_query():
    dtype, reason = resolve_precision("auto", GPU)
    assert (dtype == torch.bfloat16) == native_bf16()
    if not torch.version.hip:
        assert native_bf16() == torch.cuda.is_bf16_supported(including_emulation=False)
    assert torch.cuda.get_device_name(GPU) in reason


@pytest.mark.parametrize("setting", ["bf16", "fp16"])
def test_autocast_step_is_close_to_float32(setting):
    """One DSSN step in low precision: finite, and its losses near float32's (bf16 keeps 8 bits)."""
    (parts, low, grads), (_, full, _) = (step_parts(small_config(f"train.precision={setting}")),
                                         step_parts(small_config("train.precision=fp32")))
    assert parts.scaler.is_enabled() == (setting == "fp16")
    assert all(math.isfinite(v) for v in low.values())
    finite = all(g.isfinite().all() for g in grads.values())
    # fp16: an overflow of the scaled gradients skips the step and lowers the loss scale.
    assert finite or (setting == "fp16" and parts.scaler.get_scale() < 2.0**16)
    assert low["loss"] == pytest.approx(full["loss"], rel=0.05)


def test_channels_last_step_matches_contiguous(exact_fp32):
    last = step_parts(small_config("train.channels_last=true", "train.precision=fp32"))
    plain = step_parts(small_config("train.channels_last=false", "train.precision=fp32"))
    assert last[0].channels_last and not plain[0].channels_last
    assert_steps_match(last, plain)


def test_sync_batchnorm_conversion_in_an_nccl_group(nccl_group, exact_fp32):
    # A DistInfo of two processes makes build_training convert and wrap; the group itself has one.
    parts = build_training(small_config(), GPU, iters_per_epoch=10, dist=DistInfo(rank=0, world_size=2))
    student = parts.method.student_net
    assert parts.sync_bn and any(isinstance(m, nn.SyncBatchNorm) for m in student.modules())
    assert not any(type(m) is nn.BatchNorm2d for m in student.modules())
    torch.manual_seed(0)
    reference = build_model(small_config()).to(GPU)
    student.load_state_dict(reference.state_dict())
    x = torch.randn(4, 3, 32, 32, device=GPU)
    # One process: SyncBatchNorm normalises with this batch's statistics, as BatchNorm does.
    assert torch.allclose(student.train()(x), reference.train()(x), rtol=1e-4, atol=1e-5)
    for a, b in zip(student.buffers(), reference.buffers()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-6)


def test_ddp_over_nccl_matches_the_single_process_step(nccl_group, exact_fp32):
    """DDP (world size 1) with gradient accumulation: its no_sync and final all-reduce change nothing."""
    ddp = step_parts(small_config("train.precision=fp32"), DistInfo(rank=0, world_size=2), micro_batches=2)
    single = step_parts(small_config("train.precision=fp32"), micro_batches=2)
    assert isinstance(ddp[0].ddp, nn.parallel.DistributedDataParallel) and single[0].ddp is None
    assert_steps_match(ddp, single)


def test_sliding_window_evaluation_on_the_gpu_equals_the_cpu(exact_fp32):
    cfg = small_config()
    torch.manual_seed(0)
    net = build_model(cfg).eval()
    image = torch.randn(2, 3, 100, 90, generator=torch.Generator().manual_seed(0))
    classes = cfg.data.num_classes
    with torch.inference_mode():
        on_cpu = sliding_window_logits(net, image, classes, 64, 43)
        gpu_net = copy.deepcopy(net).to(GPU)
        batched = sliding_window_logits(gpu_net, image.to(GPU), classes, 64, 43, batch_size=8)
        single = sliding_window_logits(gpu_net, image.to(GPU), classes, 64, 43, batch_size=1)
    assert torch.allclose(batched, single, atol=1e-5)
    assert torch.allclose(batched.cpu(), on_cpu, atol=1e-4)
    agree = (batched.argmax(1).cpu() == on_cpu.argmax(1)).float().mean().item()
    assert agree >= 0.999  # only near-ties may flip
