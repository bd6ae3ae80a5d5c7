"""Which training pass's batch-norm statistics does evaluation suffer from? (docs/findings.md, finding 13)

Keeps a checkpoint's weights and replaces every batch-norm running statistic by the plain average over
``--steps`` training batches of the passes named in each row, then evaluates student and teacher on the
validation split. The rows:

- ``as trained``: the checkpoint's own running statistics;
- ``labeled``: the clean labeled batch alone (what UniMatch V2's step now lets move them);
- ``labeled + strong``: and the two CutMix-ed strong views, without dropout;
- ``labeled + strong, comp_drop``: and the strong views with complementary dropout (the release's step);
- ``labeled + labeled, comp_drop``: the clean labeled batch again, with complementary dropout.

A gap between ``as trained`` and ``labeled`` says the running statistics, not the weights, are what
evaluation gets wrong; the other rows say which pass moves them there. The network must take
``forward(x, comp_drop=True)`` (both built-in networks do). Usage::

    .venv/bin/python benchmarks/bn_statistics.py RUN/last.pt [--steps 40] [--threads 1]

Seconds to a minute on the synthetic preset.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from dssn.apps.inference import load_for_inference
from dssn.data import build_train_datasets, build_val_dataset
from dssn.engine.evaluate import evaluate
from dssn.engine.runtime import make_loader
from dssn.method.unimatch_v2 import from_partner

Pass = Callable[[nn.Module, Tensor, Tensor], Tensor]

PASSES: dict[str, list[Pass]] = {
    "labeled": [lambda net, x, strong: net(x)],
    "labeled + strong": [lambda net, x, strong: net(x), lambda net, x, strong: net(strong)],
    "labeled + strong, comp_drop": [lambda net, x, strong: net(x),
                                    lambda net, x, strong: net(strong, comp_drop=True)],
    "labeled + labeled, comp_drop": [lambda net, x, strong: net(x),
                                     lambda net, x, strong: net(torch.cat((x, x)), comp_drop=True)],
}


def training_batches(cfg, steps: int, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """``steps`` pairs (labeled images, cat(strong1, strong2) CutMix-ed with the mirrored image)."""
    labeled, unlabeled = build_train_datasets(cfg)
    t = cfg.train
    labeled_loader = DataLoader(labeled, batch_size=t.batch_size, shuffle=True,
                                generator=torch.Generator().manual_seed(seed))
    unlabeled_loader = DataLoader(unlabeled, batch_size=t.batch_size_unlabeled, shuffle=True,
                                  generator=torch.Generator().manual_seed(seed))
    batches = []
    for (x, _), u in zip(labeled_loader, unlabeled_loader):
        strong = torch.cat((from_partner(u.strong1, u.box1), from_partner(u.strong2, u.box2)))
        batches.append((x, strong))
        if len(batches) == steps:
            break
    return batches


@torch.no_grad()
def reestimated(net: nn.Module, passes: list[Pass], batches: list[tuple[Tensor, Tensor]]) -> nn.Module:
    """A copy of ``net`` whose running statistics are the plain average over every pass of every batch."""
    out = copy.deepcopy(net)
    for bn in out.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            bn.reset_running_stats()
            bn.momentum = None  # a cumulative average, not an EMA
    out.train()
    for x, strong in batches:
        for run in passes:
            run(out, x, strong)
    return out.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--steps", type=int, default=40, help="training batches to average over")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # the dropout masks
    loaded = load_for_inference(args.checkpoint, device="cpu")
    cfg, device = loaded.cfg, torch.device("cpu")
    val = make_loader(build_val_dataset(cfg), 16, False, 0, 0, device, drop_last=False)
    batches = training_batches(cfg, args.steps, cfg.train.seed)
    print("| network | running statistics from | mIoU | share predicted as class 0 |\n|---|---|---|---|")
    for name, net in loaded.models.items():
        nets = {"as trained": net, **{row: reestimated(net, passes, batches) for row, passes in PASSES.items()}}
        for row, result in evaluate(nets, val, cfg.data.num_classes, device).items():
            share = (result.confusion.sum(dim=0)[0] / result.confusion.sum()).item()
            print(f"| {name} | {row} | {100 * result.miou:.2f} | {share:.3f} |")


if __name__ == "__main__":
    main()
