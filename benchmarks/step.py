"""Speed of the DSSN training step and of sliding-window evaluation: ours against a plain version.

Times the full training step (forward, backward, SGD, EMA) on one fixed random batch, so that
data loading does not blur the numbers, for two implementations of ``docs/method.md`` §3:

- ``fast``: the engine's own step (``dssn.engine.trainer.optimizer_step`` on the DSSN method):
  batched decoder streams, the teacher under inference mode (one batched pass where
  ``teacher_bn=running`` makes it exact), a fused multi-tensor EMA, no host synchronisation, and
  the speed switches of ``train.*`` (``--precision``, ``--channels-last``, ``--compile``,
  ``--checkpoint-backbone``);
- ``plain``: §3 as research code writes it: separate teacher passes under ``no_grad``, masks
  built with Python loops over classes, the EMA as a loop over state-dict entries, float32,
  every loss read back with ``.item()`` at every step.

Each runs in its own process (so that peak memory is its own) from the same initial weights and
the same batch; the first step's losses of the two are compared (float32: they must agree within
1e-5 relative). Sliding-window evaluation compares batched windows against one window at a time.

Other models and methods: ``--config PRESET`` and ``--set key=value ...`` (applied last) time the
engine's step of any config, e.g. DINOv2-S + DPT (docs/method.md §2.2-2.4) with DSSN or UniMatch V2
(§5.3); the research-style step exists for DSSN on DeepLabV3+ only and is skipped otherwise.

Usage (the figures in the README and the closing note):
``.venv/bin/python benchmarks/step.py`` (CPU: ResNet-50, crop 321, batch 2 + 2, 2 threads),
on a GPU ``python benchmarks/step.py --backbone resnet101 --crop 513 --precision bf16``, and
``python benchmarks/step.py --config pascal-dinov2 --set model.backbone=dinov2_s data.crop_size=518
train.batch_size=1 train.batch_size_unlabeled=1 [--set method.name=unimatch_v2]
[--set model.checkpoint_backbone=true] --steps 2 --warmup 1 --skip-eval``.

``--encoders`` compares DINOv3-S with DINOv2-S at the same patch grid (37x37 patches: crop 592 on
patch 16 against 518 on patch 14), with DSSN and with UniMatch V2, batch 1 + 1, each in its own
process: ms per step and peak memory (docs/method.md §2.5):
``nice -n 19 .venv/bin/python benchmarks/step.py --encoders --steps 2 --warmup 1``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dssn.config import load_config
from dssn.constants import IGNORE
from dssn.engine.evaluate import sliding_window_logits, window_starts
from dssn.engine.runtime import resolve_device, to_device
from dssn.engine.trainer import build_training, optimizer_step
from dssn.method import METHODS, Batch

sys.path.insert(0, str(Path(__file__).parent))
from step_time import make_batch  # noqa: E402

# Dense peak TFLOP/s (bf16/fp16 tensor cores; TF32 for float32), for the achieved fraction.
GPU_PEAKS = {"H200": (989.0, 494.0), "H100": (989.0, 494.0), "A100": (312.0, 156.0), "L40S": (362.0, 183.0),
             "L4": (121.0, 60.0), "4090": (165.0, 82.6), "A10": (125.0, 62.5), "V100": (125.0, 15.7)}


# ---- the plain step: docs/method.md §3 the way research code writes it -----------------------
def plain_cplg(logits, tau_low, ratio):
    prob = logits.softmax(1)
    mask = torch.zeros(prob.shape[0], *prob.shape[2:], dtype=torch.bool, device=prob.device)
    for b in range(prob.shape[0]):
        for c in range(prob.shape[1]):
            best = prob[b, c].max()
            if best > tau_low:  # a host synchronisation per image and class
                mask[b] |= prob[b, c] > ratio * best
    return mask


def plain_paste(base, donor, box):
    out = base.clone()
    idx = box.unsqueeze(1).expand(base.shape) if base.dim() == 4 else box
    out[idx] = donor[idx]
    return out


def plain_ceu(q, t, m, ign):
    ce = F.cross_entropy(q, t, reduction="none")
    valid = ign != IGNORE
    return (ce * m * valid).sum() / valid.sum()


def plain_align(a, b):
    def standard(v):
        return (v - v.mean(1, keepdim=True)) / v.std(1, keepdim=True)
    return ((standard(a) - standard(b)) ** 2).mean()


def plain_step(student, teacher, optimizer, batch: Batch, step: int, cfg) -> dict[str, float]:
    m = cfg.method
    x, y = batch.labeled
    u, um = batch.unlabeled, batch.partner
    s1, s2 = plain_paste(u.strong1, um.strong1, u.box1), plain_paste(u.strong2, um.strong2, u.box2)
    with torch.no_grad():
        teacher.train()
        t_mix = teacher(um.weak).detach()
        t = teacher(u.weak).detach()
    t1, t2 = plain_paste(t, t_mix, u.box1), plain_paste(t, t_mix, u.box2)
    ign1, ign2 = plain_paste(u.ignore, um.ignore, u.box1), plain_paste(u.ignore, um.ignore, u.box2)
    student.train()
    n = x.shape[0]
    p, (f1, f2) = student(torch.cat((x, u.weak)), n_perturb=2)
    p_x, p_w, f1, f2 = p[:n], p[n:].detach(), f1[n:], f2[n:]
    q1, q2 = student(torch.cat((s1, s2))).chunk(2)
    l_x = F.cross_entropy(p_x, y, ignore_index=IGNORE)
    l_s = (plain_ceu(q1, t1.argmax(1), plain_cplg(t1, m.tau_low, m.ratio), ign1)
           + plain_ceu(q2, t2.argmax(1), plain_cplg(t2, m.tau_low, m.ratio), ign2))
    m_w = plain_cplg(p_w, m.tau_low, m.ratio)
    y_w = p_w.argmax(1)
    l_fp = plain_ceu(f1, y_w, m_w, u.ignore) + plain_ceu(f2, y_w, m_w, u.ignore)
    c_img, c_feat = plain_align(q1, q2), plain_align(f1, f2)
    loss = m.weight_x * l_x + m.weight_u * (l_s + l_fp) + m.lambda_c * (c_img + c_feat)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    with torch.no_grad():  # EMA through the state dicts, one entry at a time
        momentum = 0.0 if step == 0 else m.ema_momentum
        s_state = student.state_dict()
        for k, v in teacher.state_dict().items():
            if v.dtype.is_floating_point:
                v.copy_(v * momentum + s_state[k] * (1 - momentum))
            else:
                v.copy_(s_state[k])
    return {"loss": loss.item(), "x": l_x.item(), "s": l_s.item(), "fp": l_fp.item(),
            "c_img": c_img.item(), "c_feat": c_feat.item()}


# ---- one variant, in its own process -------------------------------------------------------
def config_for(args, fast: bool, preset: str | None = None):
    """``preset`` (default ``--config``, else the PASCAL preset) at the benchmark's setting:
    ``--backbone``/``--crop``/``--batch`` where given, then the ``--set`` overrides (last wins)."""
    overrides = [f"train.device={args.device}", f"method.teacher_bn={args.teacher_bn}", "model.pretrained=null"]
    if args.backbone:
        overrides.append(f"model.backbone={args.backbone}")
    if args.crop:
        overrides.append(f"data.crop_size={args.crop}")
    if args.batch:
        overrides += [f"train.batch_size={args.batch}", f"train.batch_size_unlabeled={args.batch}"]
    if fast:
        overrides += [f"train.precision={args.precision}", f"train.channels_last={args.channels_last}",
                      f"train.compile={args.compile}", f"model.checkpoint_backbone={args.checkpoint_backbone}"]
    else:
        overrides += ["train.precision=fp32", "train.channels_last=false"]
    return load_config(preset or getattr(args, "config", None) or "pascal", overrides + getattr(args, "set", []))


def has_plain_step(cfg) -> bool:
    """The research-style step is written for DSSN on DeepLabV3+ only."""
    return cfg.model.name == "deeplabv3plus" and cfg.method.name == "dssn"


def classifier_of(net: nn.Module, classes: int) -> nn.Conv2d:
    """The layer that outputs the class scores: DeepLabV3+'s ``classifier``, else the last
    convolution with one output channel per class (DPT's)."""
    classifier = getattr(net, "classifier", None)
    if isinstance(classifier, nn.Conv2d):
        return classifier
    return [m for m in net.modules() if isinstance(m, nn.Conv2d) and m.out_channels == classes][-1]


def step_batch(cfg) -> Batch:
    """A fixed random batch at the config's crop: ``train.batch_size`` labeled images and
    ``train.batch_size_unlabeled`` unlabeled ones (each with its CutMix partner)."""
    labeled = make_batch(cfg.train.batch_size, cfg.data.crop_size, cfg.data.num_classes)
    unlabeled = make_batch(cfg.train.batch_size_unlabeled, cfg.data.crop_size, cfg.data.num_classes, seed=1)
    return Batch(labeled.labeled, unlabeled.unlabeled, unlabeled.partner)


def images_per_step(cfg) -> int:
    """Labeled + unlabeled images, + the partners of methods that load a second unlabeled batch."""
    partners = cfg.train.batch_size_unlabeled if METHODS[cfg.method.name].uses_partner_batch else 0
    return cfg.train.batch_size + cfg.train.batch_size_unlabeled + partners


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory(device) -> dict[str, float]:
    out = {"cpu_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run_variant(args) -> dict:
    fast = args.variant == "fast"
    cfg = config_for(args, fast)
    device = resolve_device(cfg.train.device)
    torch.manual_seed(0)
    parts = build_training(cfg, device, iters_per_epoch=100)
    method = parts.method
    b = step_batch(cfg)
    batch = Batch(*to_device((b.labeled, b.unlabeled, b.partner), device, parts.channels_last))
    student, teacher = method.student_net, method.teacher
    with torch.no_grad():  # confident predictions: CPLG selects pixels, so every loss term is non-zero
        classifier_of(student, cfg.data.num_classes).weight.mul_(args.confidence)
    teacher.load_state_dict(student.state_dict())  # the same start for both variants
    times, first = [], None
    for i in range(args.warmup + args.steps):
        torch.manual_seed(100 + i)  # the same dropout in the perturbed streams
        sync(device)
        start = time.perf_counter()
        if fast:
            losses = optimizer_step(method, parts.optimizer, [batch], i + 1, parts.scaler, parts.autocast_dtype)[0]
            if i == 0:
                first = {k: v.item() for k, v in losses.items()}
        else:
            logged = plain_step(student, teacher, parts.optimizer, batch, i + 1, cfg)
            first = first or logged
        sync(device)
        times.append(time.perf_counter() - start)
    result = {"variant": args.variant, "step_ms": [1000 * t for t in times[args.warmup:]], "first_losses": first,
              "first_step_ms": 1000 * times[0], **peak_memory(device)}
    if fast and device.type == "cuda":
        result["flops"] = count_flops(method, parts, batch)
    return result


def count_flops(method, parts, batch) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        optimizer_step(method, parts.optimizer, [batch], 5, parts.scaler, parts.autocast_dtype)
    return float(counter.get_total_flops())


def run_eval_variant(args) -> dict:
    """Sliding-window probabilities of one image of ``2 x crop``: batched windows or one at a time."""
    device = resolve_device(args.device)
    cfg = config_for(args, fast=False)
    crop = cfg.data.crop_size
    torch.manual_seed(0)
    net = build_training(cfg, device, 1).method.student_net.eval()
    image = torch.randn(1, 3, 2 * crop, 2 * crop, generator=torch.Generator().manual_seed(1)).to(device)
    stride = int(crop * 2 / 3)
    times, out = [], None
    for _ in range(args.eval_reps):
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            if args.variant == "eval-fast":
                out = sliding_window_logits(net, image, cfg.data.num_classes, crop, stride,
                                            batch_size=args.eval_batch)
            else:
                out = plain_sliding(net, image, cfg.data.num_classes, crop, stride)
        sync(device)
        times.append(time.perf_counter() - start)
    return {"variant": args.variant, "ms": [1000 * t for t in times], "checksum": float(out.double().sum()),
            "windows": len(window_starts(2 * crop, crop, stride)) ** 2, "crop": crop, **peak_memory(device)}


def plain_sliding(net, image, classes, window, stride):
    _, _, h, w = image.shape
    total = image.new_zeros((1, classes, h, w))
    for r in window_starts(h, window, stride):
        for c in window_starts(w, window, stride):
            total[:, :, r:r + window, c:c + window] += net(image[:, :, r:r + window, c:c + window]).softmax(1)
    return total


# ---- driver ------------------------------------------------------------------------------------
# --encoders: (label, preset, backbone, crop); both grids are 37x37 patches.
ENCODER_RUNS = [("DINOv2-S", "pascal-dinov2", "dinov2_s", 518), ("DINOv3-S", "pascal-dinov3", "dinov3_s", 592)]
def spawn(variant: str, argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, *argv, "--variant", variant]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{variant} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="pascal", help="preset or YAML file the step is built from (default pascal: "
                                                      "DSSN on DeepLabV3+)")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="config overrides, applied after every other option (e.g. --set method.name=unimatch_v2)")
    p.add_argument("--backbone", default=None, help="model.backbone (default: resnet50 with --config pascal, else "
                                                    "the config's)")
    p.add_argument("--crop", type=int, default=None, help="data.crop_size (default: 321 with --config pascal, "
                                                          "else the config's)")
    p.add_argument("--batch", type=int, default=None, help="labeled and unlabeled images per step, each (default: "
                                                           "2 with --config pascal, else the config's)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed first steps (its losses are compared)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", default=None, help="fast variant: fp32, bf16 or fp16 (default: bf16 on GPUs, "
                                                     "fp32 on CPUs)")
    p.add_argument("--channels-last", default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--checkpoint-backbone", action="store_true")
    p.add_argument("--teacher-bn", default="batch", choices=["batch", "running"])
    p.add_argument("--confidence", type=float, default=40.0, help="scale of the initial classifier weights")
    p.add_argument("--eval-reps", type=int, default=2)
    p.add_argument("--eval-batch", type=int, default=8, help="windows per forward pass (fast evaluation)")
    p.add_argument("--skip-eval", action="store_true")
    p.add_argument("--encoders", action="store_true", help="DINOv3-S against DINOv2-S at 37x37 patches (crops 592 "
                                                           "and 518), DSSN and UniMatch V2, batch 1 + 1")
    p.add_argument("--variant", choices=["fast", "plain", "eval-fast", "eval-plain"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.config == "pascal":  # the setting of the figures in the README
        args.backbone, args.crop, args.batch = args.backbone or "resnet50", args.crop or 321, args.batch or 2
    device = resolve_device(args.device)
    if args.precision is None:
        args.precision = "bf16" if device.type == "cuda" else "fp32"
    torch.set_num_threads(args.threads)
    if args.variant:
        run = run_eval_variant if args.variant.startswith("eval") else run_variant
        print(json.dumps(run(args)))
        return

    if args.encoders:
        compare_encoders(args, device)
        return
    argv = [a for a in sys.argv[1:]] + [f"--precision={args.precision}"]
    cfg = config_for(args, fast=True)
    m, t = cfg.model, cfg.train
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU {cpu_name()}, {args.threads} threads"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"# {cfg.method.name} step: {m.name} {m.backbone}, crop {cfg.data.crop_size}, batch {t.batch_size} + "
          f"{t.batch_size_unlabeled}, {name}; fast = {t.precision}, channels_last={t.channels_last}, "
          f"compile={t.compile}, checkpoint_backbone={m.checkpoint_backbone}, teacher_bn={cfg.method.teacher_bn}; "
          f"load average {load}")
    plain = has_plain_step(cfg)
    if not plain:
        print(f"research-style step: written for DSSN on DeepLabV3+ only; skipped for {cfg.method.name} on {m.name}")
    variants = ("plain", "fast") if plain else ("fast",)
    results = {v: spawn(v, argv) for v in variants}
    images = images_per_step(cfg)
    for v in variants:
        r = results[v]
        ms = statistics.median(r["step_ms"])
        mem = f"peak RSS {r['cpu_rss_mib']:.0f} MiB" + (f", GPU peak {r['gpu_peak_mib']:.0f} MiB"
                                                         if "gpu_peak_mib" in r else "")
        print(f"{v:5s}: {ms:9.1f} ms/step  {1000 * images / ms:6.2f} img/s  {mem}  (first step {r['first_step_ms']:.0f} ms)")
    a = results["fast"]["first_losses"]
    if plain:
        ratio = statistics.median(results["plain"]["step_ms"]) / statistics.median(results["fast"]["step_ms"])
        print(f"speed-up fast/plain: {ratio:.2f}x")
        b = results["plain"]["first_losses"]
        rel = max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-12) for k in b)
        print("first-step losses (fast | plain): " + ", ".join(f"{k} {a[k]:.6g} | {b[k]:.6g}" for k in b))
        print(f"largest relative loss difference: {rel:.2e}" + ("  (float32: must be <= 1e-5)"
                                                                 if args.precision == "fp32" else ""))
    else:
        print("first-step losses: " + ", ".join(f"{k} {v:.6g}" for k, v in a.items()))
    if "flops" in results["fast"]:
        ms = statistics.median(results["fast"]["step_ms"])
        achieved = results["fast"]["flops"] / (ms / 1000) / 1e12
        peak = next((v for k, v in GPU_PEAKS.items() if k in name), None)
        share = "" if peak is None else (f" = {100 * achieved / peak[0 if args.precision != 'fp32' else 1]:.0f}% of "
                                         f"the {'bf16/fp16' if args.precision != 'fp32' else 'TF32'} dense peak")
        print(f"achieved: {achieved:.1f} TFLOP/s ({results['fast']['flops'] / 1e12:.2f} TFLOP per step){share}")
    if args.skip_eval:
        return
    ev = {v: spawn(v, argv) for v in ("eval-plain", "eval-fast")}
    e_plain, e_fast = (min(ev[v]["ms"]) for v in ("eval-plain", "eval-fast"))
    same = abs(ev["eval-plain"]["checksum"] - ev["eval-fast"]["checksum"]) <= 1e-4 * abs(ev["eval-plain"]["checksum"])
    crop = ev["eval-fast"]["crop"]
    print(f"# sliding-window evaluation: one {2 * crop}x{2 * crop} image, {ev['eval-fast']['windows']} windows of {crop}")
    print(f"plain (one window at a time): {e_plain:.0f} ms   fast (batches of {args.eval_batch}): {e_fast:.0f} ms   "
          f"speed-up {e_plain / e_fast:.2f}x   same probabilities: {same}")


def machine(device, threads: int) -> str:
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU {cpu_name()}, {threads} threads"
    return f"{name}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"


def compare_encoders(args, device) -> None:
    """ms per step and peak memory of the engine's step for each encoder and method."""
    print(f"# encoders at 37x37 patches, batch 1 + 1, {args.precision}, {machine(device, args.threads)}")
    print(f"{'encoder':9s} {'crop':>4s} {'method':12s} {'ms/step':>9s} {'peak RSS MiB':>13s} {'GPU peak MiB':>13s}")
    for method in ("dssn", "unimatch_v2"):
        for label, preset, backbone, crop in ENCODER_RUNS:
            argv = [f"--threads={args.threads}", f"--steps={args.steps}", f"--warmup={args.warmup}",
                    f"--device={args.device}", f"--precision={args.precision}", "--config", preset, "--set",
                    f"model.backbone={backbone}", f"data.crop_size={crop}", "train.batch_size=1",
                    "train.batch_size_unlabeled=1", f"method.name={method}", *args.set]
            if args.checkpoint_backbone:
                argv.append("--checkpoint-backbone")
            r = spawn("fast", argv)
            gpu = f"{r['gpu_peak_mib']:.0f}" if "gpu_peak_mib" in r else "-"
            print(f"{label:9s} {crop:4d} {method:12s} {statistics.median(r['step_ms']):9.0f} "
                  f"{r['cpu_rss_mib']:13.0f} {gpu:>13s}", flush=True)
    print(f"# after: {machine(device, args.threads)}")


if __name__ == "__main__":
    main()
