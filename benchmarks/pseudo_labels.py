"""How good are CPLG's pseudo labels? Scored against the true masks of unlabeled images.

The built-in dataset keeps a mask for every image, including those listed as
unlabeled, so the pseudo labels a network would hand to DSSN can be checked.
For each class this prints, over the whole (un-augmented) unlabeled images:

- ``selected``: the share of the class's true pixels that CPLG selects (as any class);
- ``precision``: the share of pixels selected *as* the class that truly are it;
- ``recall (argmax)``: the share of the class's pixels whose argmax is the class;
- ``active``: of the images that contain the class, how many have a best probability
  for it above ``tau_low`` (CPLG selects nothing for the class in the others);

then the confusion matrix of the argmax (rows: true class; % of its pixels given each
class), which shows where a class's missing pixels go.

Usage: ``.venv/bin/python benchmarks/pseudo_labels.py CHECKPOINT [--root data/synthetic]
[--images 320] [--network student] [--tau-low 0.92] [--ratio 0.96]``, for example on the
1/16 supervised run of ``benchmarks/headroom.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

from dssn.data.datasets import read_split
from dssn.data.transforms import mask_to_tensor, to_tensor_normalized
from dssn.engine.evaluate import IGNORE, confusion_matrix
from dssn.engine.inference import load_for_inference
from dssn.method.components import cplg_mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--root", type=Path, default=Path("data/synthetic"))
    parser.add_argument("--split", default="splits/1_16/unlabeled.txt")
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--network", default=None, help="student or teacher (default: the teacher if any)")
    parser.add_argument("--tau-low", type=float, default=0.92)
    parser.add_argument("--ratio", type=float, default=0.96)
    args = parser.parse_args()

    models = load_for_inference(args.checkpoint, device="cpu")
    name, model = models.pick(args.network)
    pairs = read_split(args.root / args.split)[: args.images]
    n = len(models.class_names)
    every = torch.zeros(n, n, dtype=torch.long)  # [true, argmax] over all labelled pixels
    chosen = torch.zeros(n, n, dtype=torch.long)  # the same over CPLG-selected pixels
    present = torch.zeros(n, dtype=torch.long)  # images containing the class
    active = torch.zeros(n, dtype=torch.long)  # ... whose best probability for it exceeds tau_low
    for start in range(0, len(pairs), 32):
        chunk = pairs[start:start + 32]
        x = torch.stack([to_tensor_normalized(Image.open(args.root / image)) for image, _ in chunk])
        truth = torch.stack([mask_to_tensor(Image.open(args.root / mask)) for _, mask in chunk])
        with torch.inference_mode():
            logits = model(x)
        pred = logits.argmax(1)
        every += confusion_matrix(pred, truth, n)
        chosen += confusion_matrix(pred, truth.masked_fill(~cplg_mask(logits, args.tau_low, args.ratio), IGNORE), n)
        contains = torch.stack([torch.bincount(t[t != IGNORE], minlength=n)[:n] > 0 for t in truth])
        passes = logits.softmax(1).amax(dim=(2, 3)) > args.tau_low
        present += contains.sum(0)
        active += (contains & passes).sum(0)

    def pct(a: torch.Tensor, b: torch.Tensor) -> list[str]:
        return ["-" if d == 0 else f"{100 * c / d:.1f}" for c, d in zip(a.tolist(), b.tolist())]

    print(f"{name} of {args.checkpoint}, {len(pairs)} images of {args.split}, "
          f"CPLG tau_low={args.tau_low} ratio={args.ratio}\n")
    print("| class | true pixels | selected (%) | precision (%) | recall, argmax (%) | active |")
    print("|---|---|---|---|---|---|")
    rows = zip(models.class_names, every.sum(1).tolist(), pct(chosen.sum(1), every.sum(1)),
               pct(chosen.diag(), chosen.sum(0)), pct(every.diag(), every.sum(1)), active.tolist(), present.tolist())
    for cls, count, sel, prec, rec, act, pres in rows:
        print(f"| {cls} | {count} | {sel} | {prec} | {rec} | {act} of {pres} |")
    print("\n| true \\ predicted (%) | " + " | ".join(models.class_names) + " |")
    print("|---|" + "---|" * n)
    for cls, row in zip(models.class_names, every):
        print(f"| {cls} | " + " | ".join(pct(row, row.sum().expand(n))) + " |")


if __name__ == "__main__":
    main()
