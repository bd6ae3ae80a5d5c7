"""What could DSSN gain with perfect pseudo labels? DSSN trained on the true masks of its unlabeled images.

The built-in dataset has masks for its unlabeled images too. This trains DSSN on the 1/16
split as ``dssn demo`` does, but the teacher's logits (``docs/method.md`` §3, step 2) and the student's
weak prediction (step 4, the labels of the feature level) are replaced by one-hot logits
of the true masks, cropped with the weak view. Everything else is DSSN's own step: CutMix,
the strong views, CPLG (which then keeps every labelled pixel), the loss weights, the
alignment terms, batch norm and the EMA teacher. So the gap between this run and DSSN is
what wrong or missing pseudo labels cost, and the gap between this run and supervised
training on all labels is what the rest of the step costs.

``--views weak`` also makes both strong views the weak view itself (CutMix kept), to see
what the strong views cost when the labels are right. ``--baselines`` adds the two runs of
``headroom.py`` (supervised on 1/16 and on all labels) to the table.

Usage: ``.venv/bin/python benchmarks/true_labels.py [--views strong weak] [--baselines]
[--seed 0] [--out runs/true-labels] [key=value ...]`` (about 13 minutes per DSSN run and 4
per supervised run with ``train.threads=1`` on two CPU cores).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch
from headroom import SPLITS, print_table, train_rows
from torch import Tensor, nn

import dssn.data.datasets
import dssn.method
from dssn.method.base import Batch
from dssn.method.dssn import DSSN


def one_hot_logits(mask: Tensor, num_classes: int) -> Tensor:
    """Logits whose softmax is (nearly) one-hot on the true class; uniform on ignored pixels,
    which CPLG then never selects."""
    logits = 20.0 * nn.functional.one_hot(mask.clamp_max(num_classes - 1), num_classes).permute(0, 3, 1, 2)
    return logits.float().masked_fill((mask == 255).unsqueeze(1), 0.0)


class TrueWeakPrediction(nn.Module):
    """The student, except that the unlabeled rows of its clean output (``student_weak``, which the
    step detaches) are the true masks' logits. ``_orig_mod`` is the attribute ``unwrap`` follows, so
    the EMA, checkpoints and evaluation see the network itself."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self._orig_mod = net
        self.masks: Tensor | None = None

    def forward(self, x: Tensor, n_perturb: int = 0):
        if not n_perturb:  # the strong views' pass
            return self._orig_mod(x)
        p, streams = self._orig_mod(x, n_perturb=n_perturb)
        n_u = self.masks.shape[0]
        return torch.cat((p[:-n_u], one_hot_logits(self.masks, p.shape[1]).to(p.dtype))), streams


class TrueLabelDSSN(DSSN):
    """DSSN whose pseudo labels (teacher and weak prediction) are the true masks."""

    def __init__(self, student: nn.Module, *args, **kwargs) -> None:
        super().__init__(student, *args, **kwargs)
        self.student = TrueWeakPrediction(student)
        self._partner_masks: Tensor | None = None  # the CutMix partners' masks; the images' are on the student

    def training_step(self, batch: Batch, step: int) -> dict[str, Tensor]:
        # data.unlabeled_masks: both unlabeled batches are UnlabeledViewsWithMask.
        self._partner_masks = batch.partner.mask
        self.student.masks = batch.unlabeled.mask
        views = dataclasses.replace(batch, unlabeled=batch.unlabeled.views, partner=batch.partner.views)
        return super().training_step(views, step)

    def teacher_logits(self, partner_weak: Tensor, weak: Tensor, step: int) -> tuple[Tensor, Tensor]:
        c = self.student_net.classifier.out_channels
        return one_hot_logits(self._partner_masks, c), one_hot_logits(self.student.masks, c)


def _weak_view(img, strong_ops: bool = True, *, rng):
    return img


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--views", nargs="+", choices=["strong", "weak"], default=["strong", "weak"])
    parser.add_argument("--baselines", action="store_true", help="also train supervised on 1/16 and all labels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/true-labels"))
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for every run")
    args = parser.parse_args()

    rows = []
    if args.baselines:
        rows += train_rows([(f"supervised, {name}", "supervised", split) for name, split in SPLITS.items()],
                           args.seed, args.out / "baselines", args.overrides)
    # build_method looks DSSN up in dssn.method at call time: the DSSN runs below use this one.
    dssn.method.DSSN = TrueLabelDSSN
    paper_strong_view = dssn.data.datasets.strong_view
    for views in args.views:
        # "weak": both strong views are the weak view itself (CutMix is applied later, in the step).
        dssn.data.datasets.strong_view = paper_strong_view if views == "strong" else _weak_view
        rows += train_rows([(f"dssn, true labels, {views} views", "dssn", SPLITS["1/16"])],
                           args.seed, args.out / f"{views}-views", ["data.unlabeled_masks=true", *args.overrides])
    print_table("run", rows)


if __name__ == "__main__":
    main()
