"""Where a run reports: a progress bar, TensorBoard scalars and a JSON-lines file."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm


class RunLogger:
    """Writes ``metrics.jsonl`` (one JSON object per line) and TensorBoard events under ``tb/``."""

    def __init__(self, run_dir: Path, total_iters: int, progress: bool = True,
                 resume_step: int | None = None) -> None:
        """``resume_step``: the step a resumed run continues from; TensorBoard events logged
        after it by the interrupted run are purged, the bar and ETA start there."""
        from torch.utils.tensorboard import SummaryWriter  # imported late: it is slow to import

        self.run_dir = run_dir
        self.jsonl = (run_dir / "metrics.jsonl").open("a", buffering=1)
        self.start_step = resume_step or 0
        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=None if resume_step is None else resume_step + 1)
        # A live bar on a terminal; in a log file, a plain line about every 5% instead.
        self.interactive = progress and sys.stderr.isatty()
        self.print_progress = progress and not self.interactive
        self.total = total_iters
        self.next_line = 0
        self.bar = tqdm(total=total_iters, initial=self.start_step, disable=not self.interactive,
                        dynamic_ncols=True, unit="it")
        self.start = time.perf_counter()

    def advance(self) -> None:
        self.bar.update(1)

    def _write(self, record: dict[str, Any]) -> None:
        record["time"] = round(time.perf_counter() - self.start, 3)
        self.jsonl.write(json.dumps(record) + "\n")

    def log_train(self, step: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self.tb.add_scalar(f"train/{name}", value, step)
        self._write({"kind": "train", "step": step, **scalars})
        # The bar shows the loss terms and throughput; learning rates stay in the logs.
        shown = {k: v for k, v in scalars.items() if not k.startswith("lr") and k != "img_s"}
        postfix = {k: f"{v:.3g}" for k, v in shown.items()}
        if "img_s" in scalars:
            postfix["img/s"] = f"{scalars['img_s']:.3g}"
        self.bar.set_postfix(postfix, refresh=False)
        if self.print_progress and step >= self.next_line:
            self.next_line = step + max(1, self.total // 20)
            elapsed = time.perf_counter() - self.start
            done = max(step - self.start_step, 1)
            eta = elapsed / done * (self.total - step)
            terms = " ".join(f"{k}={v}" for k, v in postfix.items())
            print(f"step {step}/{self.total} {done / elapsed:.2f} it/s eta {eta:.0f}s {terms}", file=sys.stderr)

    def log_record(self, record: dict[str, Any]) -> None:
        """Any other record for ``metrics.jsonl`` (diagnostics, warnings, timing); ``kind`` names it."""
        self._write(dict(record))

    def message(self, text: str) -> None:
        """A console line that does not break the progress bar."""
        self.bar.write(text, file=sys.stderr)

    def log_eval(self, step: int, epoch: int, summary: dict[str, dict[str, Any]]) -> None:
        for model, result in summary.items():
            self.tb.add_scalar(f"eval/{model}/miou", result["miou"], step)
            for cls, iou in result["per_class"].items():
                if iou is not None:
                    self.tb.add_scalar(f"eval/{model}/iou/{cls}", iou, step)
        self._write({"kind": "eval", "step": step, "epoch": epoch, **summary})
        text = "  ".join(f"{m} mIoU {r['miou']:.2f}" for m, r in summary.items())
        self.bar.write(f"[step {step} epoch {epoch}] {text}", file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
        self.tb.close()
        self.jsonl.close()
