"""Cost of the training diagnostics on the DSSN step.

Times full training steps (forward, backward, SGD, EMA) of the DSSN method on one
fixed random batch, so that data loading does not blur the numbers, in three modes:

- ``off``: ``diag.enabled=false``: the step as it was before the diagnostics existed
  (the only addition is one attribute check);
- ``log_every=N``: the default: the statistics are computed on every N-th step and
  read back in one host transfer, as the engine does at its log steps;
- ``every step``: the worst case, ``train.log_every=1``.

Usage: ``.venv/bin/python benchmarks/step_time.py [--steps 30] [--log-every 20] [--threads 1]``
(``--crop 64 --batch 4`` is the synthetic preset's setting; ``--width`` the backbone width).
Compare with the code before the change by putting a copy of it first on ``PYTHONPATH``:
``PYTHONPATH=/path/to/old/src .venv/bin/python benchmarks/step_time.py --modes off``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import dssn
from dssn.config import load_config
from dssn.data.batch import UnlabeledViews
from dssn.method import Batch, build_method


def make_batch(n: int, size: int, classes: int, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)

    def unlabeled() -> UnlabeledViews:
        ignore = torch.zeros(n, size, size, dtype=torch.long)
        ignore[:, :, -size // 8:] = 255
        box = torch.zeros(n, size, size, dtype=torch.bool)
        box[:, size // 8: size // 2, size // 4: 3 * size // 4] = True
        weak, strong1, strong2 = (torch.randn(n, 3, size, size, generator=g) for _ in range(3))
        return UnlabeledViews(weak, strong1, strong2, ignore=ignore, box1=box, box2=box.flip(-1))

    y = torch.randint(0, classes, (n, size, size), generator=g)
    return Batch((torch.randn(n, 3, size, size, generator=g), y), unlabeled(), unlabeled())


def time_steps(mode: str, args: argparse.Namespace) -> list[float]:
    cfg = load_config("synthetic", [f"model.backbone_width={args.width}", f"data.crop_size={args.crop}"])
    torch.manual_seed(0)
    student = dssn.DeepLabV3Plus(cfg.data.num_classes, backbone="resnet18", decoder_channels=cfg.model.decoder_channels,
                                 backbone_width=args.width)
    method = build_method(cfg, student, iters_per_epoch=100)
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    batch = make_batch(args.batch, args.crop, cfg.data.num_classes)
    every = {"off": 0, "every step": 1}.get(mode, args.log_every)
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        logged = every and (step + 1) % every == 0
        method.collect_diagnostics = bool(logged)
        losses = method.training_step(batch, step + 1)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()
        method.after_optimizer_step(step + 1)
        if logged and hasattr(method, "pop_diagnostics"):  # what the engine reads at a log step
            diag = method.pop_diagnostics()
            torch.cat([t.double().reshape(-1) for t in diag.values()]).tolist()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--batch", type=int, default=4, help="labeled and unlabeled images per step, each")
    p.add_argument("--width", type=int, default=64, help="backbone width (64: the synthetic preset)")
    p.add_argument("--modes", nargs="+", default=["off", "log_every", "every step"])
    p.add_argument("--repeats", type=int, default=2, help="alternate the modes this many times; keep the best")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    best: dict[str, float] = {}
    for _ in range(args.repeats):  # interleaved, so that a busy machine hurts every mode alike
        for mode in args.modes:
            t = statistics.mean(time_steps(mode, args))
            best[mode] = min(best.get(mode, float("inf")), t)
    base = best.get("off")
    print(f"DSSN step, crop {args.crop}, batch {args.batch}+{args.batch}, resnet18 width {args.width}, "
          f"{args.threads} thread(s), mean of {args.steps} steps (best of {args.repeats}):")
    for mode, t in best.items():
        label = f"log_every={args.log_every}" if mode == "log_every" else mode
        ratio = f"  x{t / base:.3f}" if base else ""
        print(f"  {label:<14} {1000 * t:8.1f} ms/step{ratio}")


if __name__ == "__main__":
    main()
