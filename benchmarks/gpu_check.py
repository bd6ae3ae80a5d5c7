"""What only a GPU can show, as one Markdown table (run by ``benchmarks/gpu_check.sh``).

Rows, in this order (each printed as soon as it is measured, so a run cut short keeps its rows):

- ``cuda test``: one row per test of ``pytest -m cuda`` (read from its JUnit XML, ``--junit``);
- ``precision auto``: what ``train.precision=auto`` picks on this GPU, and why;
- ``DSSN step``: ResNet-101, crop 513, 2 labeled + 2 unlabeled (the paper's PASCAL setting): the
  engine's step in fp32 and in bf16, and the research-style step of ``benchmarks/step.py`` (float32,
  released order, host synchronisations); ms per step (median), peak allocator memory
  (``torch.cuda.max_memory_allocated``, weights and optimizer state included), achieved TFLOP/s
  (FLOPs counted by ``FlopCounterMode`` over one step) and its share of the device's dense bf16
  peak (a table of known devices; ``GPU_PEAK_TFLOPS`` overrides it);
- the same for DINOv2-B with the DPT head at crop 518, 4 + 4 (the ``pascal-dinov2`` preset's
  optimizer and schedule), if ``dssn.models.dpt`` exists;
- ``sliding eval``: one 1026 x 1026 image in 513 windows (9), batches of 8 against one window at
  a time (``sliding_window_logits``), with the largest difference of their probabilities.

float32 rows run with PyTorch's defaults (cuDNN convolutions in TF32; matmuls in full float32).
``--dry-run`` prints the plan without touching a GPU. The sizes (3 warm-up and 10 timed steps per
row) are estimated, not yet timed, to fit the script's 8 minutes on one H200; ``--budget-s`` skips
the rows that would start after it, so the table always ends.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from dssn.engine.evaluate import sliding_window_logits, window_starts
from dssn.engine.precision import resolve_precision
from dssn.engine.runtime import to_device
from dssn.engine.trainer import build_training, optimizer_step
from dssn.method import Batch

sys.path.insert(0, str(Path(__file__).parent))
from step import GPU_PEAKS, config_for, make_batch, plain_step, sync  # noqa: E402

DEVICE = torch.device("cuda")
"""The GPU measured (the current CUDA device)."""
EVAL_BACKBONE, EVAL_CROP = "resnet101", 513
"""Sliding-window evaluation: the model and window size (one image of twice the window)."""
COLUMNS = ("check", "setting", "result", "ms/step", "peak alloc (GiB)", "TFLOP/s", "% of bf16 peak")


@dataclass(frozen=True)
class StepCase:
    """One DSSN step measurement: a model at a crop and batch, one variant of the step."""

    model: str
    """Row label of the model."""
    backbone: str
    crop: int
    batch: int
    variant: str
    """``fp32`` / ``bf16``: the engine's step in that precision; ``research``: ``step.plain_step``."""
    preset: str = "pascal"
    """The training settings (optimizer, schedule) of this model."""
    needs: str | None = None
    """A module that must import for this row to run."""

    @property
    def setting(self) -> str:
        step = "research-style, fp32" if self.variant == "research" else f"engine, {self.variant}"
        return f"{self.model}, crop {self.crop}, {self.batch} + {self.batch}, {step}"


CASES = [StepCase("ResNet-101", "resnet101", 513, 2, v) for v in ("fp32", "bf16", "research")] + [
    # The research-style step (``step.plain_step``) is written for DeepLabV3+ only.
    StepCase("DINOv2-B + DPT", "dinov2_b", 518, 4, v, "pascal-dinov2", "dssn.models.dpt") for v in ("fp32", "bf16")]


@dataclass
class Table:
    """Prints the header at once and each row as it comes; keeps them for ``--out``."""

    rows: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        print("| " + " | ".join(COLUMNS) + " |")
        print("|" + "---|" * len(COLUMNS), flush=True)

    def add(self, check: str, setting: str, result: str, ms: float | None = None, peak_gib: float | None = None,
            tflops: float | None = None, share: float | None = None) -> None:
        cells = [check, setting, result, _num(ms, ".1f"), _num(peak_gib, ".2f"), _num(tflops, ".1f"),
                 _num(share, ".0f")]
        print("| " + " | ".join(c.replace("|", "/") for c in cells) + " |", flush=True)
        self.rows.append(dict(zip(COLUMNS, [check, setting, result, ms, peak_gib, tflops, share])))


def _num(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def bf16_peak_tflops(name: str) -> float | None:
    """The device's dense bf16 peak: ``GPU_PEAK_TFLOPS`` if set, else from ``step.GPU_PEAKS``."""
    if os.environ.get("GPU_PEAK_TFLOPS"):
        return float(os.environ["GPU_PEAK_TFLOPS"])
    return next((bf16 for key, (bf16, _) in GPU_PEAKS.items() if key in name), None)


def test_rows(junit: Path, table: Table) -> None:
    """One row per test case of the JUnit XML written by ``pytest --junitxml``."""
    if not junit.is_file():
        table.add("cuda tests", str(junit), "no results (pytest did not finish?)")
        return
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                message = (found.get("message") or "").split("\n")[0][:120]
                outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag] + (
                    f": {message}" if message else "")
                break
        table.add("cuda test", case.get("name", "?"), f"{outcome} ({float(case.get('time', 0)):.1f} s)")


def fresh_memory() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def measure_step(case: StepCase, args: argparse.Namespace) -> dict:
    """Build the case's model and method (from seed 0), time ``args.steps`` steps after
    ``args.warmup``, then count one step's FLOPs."""
    fresh_memory()
    research = case.variant == "research"
    ns = argparse.Namespace(backbone=case.backbone, crop=case.crop, batch=case.batch, device=DEVICE.type,
                            teacher_bn="batch", precision="fp32" if research else case.variant,
                            channels_last="auto", compile=False, checkpoint_backbone=False)
    cfg = config_for(ns, fast=not research, preset=case.preset)
    device = DEVICE
    torch.manual_seed(0)
    parts = build_training(cfg, device, iters_per_epoch=100)
    method = parts.method
    b = make_batch(case.batch, case.crop, cfg.data.num_classes)
    batch = Batch(*to_device((b.labeled, b.unlabeled, b.partner), device, parts.channels_last))
    student, teacher = method.student_net, method.teacher
    classifier = getattr(student, "classifier", None)
    if classifier is not None:  # confident predictions: CPLG selects pixels, every loss term is computed
        with torch.no_grad():
            classifier.weight.mul_(40.0)
    teacher.load_state_dict(student.state_dict())

    def step(i: int) -> None:
        if research:
            plain_step(student, teacher, parts.optimizer, batch, i, cfg)
        else:
            optimizer_step(method, parts.optimizer, [batch], i, parts.scaler, parts.autocast_dtype)

    times = []
    for i in range(args.warmup + args.steps):
        torch.manual_seed(100 + i)
        sync(device)
        start = time.perf_counter()
        step(i + 1)
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30
    counter = FlopCounterMode(display=False)
    with counter:
        step(args.warmup + args.steps + 1)
    return {"ms": 1000 * statistics.median(times[args.warmup:]), "peak_gib": peak,
            "flops": float(counter.get_total_flops())}


def measure_sliding(args: argparse.Namespace) -> dict:
    """Batched windows against one at a time on one image of twice the crop (ResNet-101, fp32)."""
    fresh_memory()
    crop = EVAL_CROP
    ns = argparse.Namespace(backbone=EVAL_BACKBONE, crop=crop, batch=1, device=DEVICE.type, teacher_bn="batch",
                            precision="fp32", channels_last="auto", compile=False, checkpoint_backbone=False)
    cfg = config_for(ns, fast=True)
    device = DEVICE
    torch.manual_seed(0)
    net = build_training(cfg, device, 1).method.student_net.eval()
    image = torch.randn(1, 3, 2 * crop, 2 * crop, generator=torch.Generator().manual_seed(1)).to(device)
    stride = int(crop * 2 / 3)
    out, best = {}, {}
    for batch_size in (args.eval_batch, 1, args.eval_batch, 1):  # interleaved; the first of each warms up
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            out[batch_size] = sliding_window_logits(net, image, cfg.data.num_classes, crop, stride, batch_size)
        sync(device)
        best[batch_size] = min(best.get(batch_size, float("inf")), 1000 * (time.perf_counter() - start))
    return {"windows": len(window_starts(2 * crop, crop, stride)) ** 2, "batched_ms": best[args.eval_batch],
            "single_ms": best[1], "max_diff": (out[args.eval_batch] - out[1]).abs().max().item(),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def can_import(module: str | None) -> bool:
    if module is None:
        return True
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def dry_run(args: argparse.Namespace) -> None:
    print("gpu_check.py would print one Markdown table with these rows:")
    if args.junit:
        print(f"- cuda test: one row per test case in {args.junit}")
    print("- precision auto: what train.precision=auto resolves to on the GPU, and why")
    for case in CASES:
        gate = f" (only if `import {case.needs}` works; else 'skipped: no DPT model')" if case.needs else ""
        print(f"- DSSN step: {case.setting}: {args.warmup} warm-up + {args.steps} timed steps, then one step "
              f"under FlopCounterMode{gate}")
    print(f"- sliding eval: ResNet-101, one 1026x1026 image, windows of 513 (stride 342), batches of "
          f"{args.eval_batch} against one window at a time")
    print(f"Rows that would start after {args.budget_s:.0f} s are skipped.")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--junit", type=Path, help="JUnit XML of `pytest -m cuda` (one row per test)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps per row")
    p.add_argument("--eval-batch", type=int, default=8, help="windows per forward pass, batched evaluation")
    p.add_argument("--budget-s", type=float, default=240.0, help="rows that would start later are skipped")
    p.add_argument("--out", type=Path, help="also write the rows to OUT/gpu_check.json")
    p.add_argument("--dry-run", action="store_true", help="print the plan; needs no GPU")
    args = p.parse_args()
    if args.dry_run:
        dry_run(args)
        return 0
    if not torch.cuda.is_available():
        print("gpu_check.py: no CUDA GPU; nothing to measure", file=sys.stderr)
        return 0
    start = time.monotonic()
    name = torch.cuda.get_device_name()
    peak = bf16_peak_tflops(name)
    print(f"# GPU check: {name}, torch {torch.__version__}, CUDA {torch.version.cuda}; dense bf16 peak "
          f"{'unknown (set GPU_PEAK_TFLOPS)' if peak is None else f'{peak:.0f} TFLOP/s'}; cuDNN TF32 "
          f"{torch.backends.cudnn.allow_tf32}, matmul TF32 {torch.backends.cuda.matmul.allow_tf32}\n")
    table = Table()
    failed = False
    if args.junit:
        test_rows(args.junit, table)
    _, reason = resolve_precision("auto", torch.device("cuda", torch.cuda.current_device()))
    table.add("precision auto", "train.precision=auto", reason)

    for case in CASES:
        if not can_import(case.needs):
            table.add("DSSN step", case.setting, "skipped: no DPT model")
            continue
        if time.monotonic() - start > args.budget_s:
            table.add("DSSN step", case.setting, f"skipped: past the {args.budget_s:.0f} s budget")
            continue
        try:
            r = measure_step(case, args)
        except Exception as err:  # one row's failure (out of memory, a missing feature) must not end the table
            failed = True
            traceback.print_exc(file=sys.stderr)
            table.add("DSSN step", case.setting, f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}")
            continue
        tflops = r["flops"] / (r["ms"] / 1000) / 1e12
        table.add("DSSN step", case.setting, f"{r['flops'] / 1e12:.2f} TFLOP per step", r["ms"], r["peak_gib"],
                  tflops, None if peak is None else 100 * tflops / peak)

    if time.monotonic() - start > args.budget_s:
        table.add("sliding eval", "ResNet-101", f"skipped: past the {args.budget_s:.0f} s budget")
    else:
        try:
            e = measure_sliding(args)
            table.add("sliding eval", f"ResNet-101, 1026x1026, {e['windows']} windows of 513, fp32",
                      f"batches of {args.eval_batch}: {e['batched_ms']:.1f} ms, one at a time: {e['single_ms']:.1f} "
                      f"ms ({e['single_ms'] / e['batched_ms']:.2f}x); max prob. diff {e['max_diff']:.1e}",
                      peak_gib=e["peak_gib"])
        except Exception as err:
            failed = True
            traceback.print_exc(file=sys.stderr)
            table.add("sliding eval", "ResNet-101", f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}")
    print(f"\n{time.monotonic() - start:.0f} s", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(json.dumps({"device": name, "rows": table.rows}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
