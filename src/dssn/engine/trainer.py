"""The training engine: loop, schedule, evaluation, checkpoints and logs.

It knows nothing of any method's losses: a ``Method`` turns each batch into a
dict of losses and the engine back-propagates ``losses["loss"]``.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dssn.config import Config
from dssn.data import build_train_datasets, build_val_dataset, class_names_for, palette_for
from dssn.engine.checkpoint import atomic_save
from dssn.errors import DssnError
from dssn.engine.evaluate import EvalResult, evaluate
from dssn.engine.logger import RunLogger
from dssn.method import METHODS, Batch, Method, build_method
from dssn.method.components import poly_lr
from dssn.models import build_model


class TrainingError(DssnError, RuntimeError):
    """Training cannot go on (non-finite loss, unusable run folder)."""


@dataclass
class TrainResult:
    run_dir: Path
    final: dict[str, dict[str, Any]]
    """Per evaluated model (``student``, ``teacher``): mIoU and per-class IoU in percent."""
    best_miou: float
    iters: int
    wall_time: float
    history: list[dict[str, Any]] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    # Each worker's torch seed is already distinct (base seed + id); derive the others from it.
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int, num_workers: int,
                device: torch.device, drop_last: bool = True) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      num_workers=num_workers, pin_memory=device.type == "cuda",
                      worker_init_fn=_seed_worker, generator=generator,
                      persistent_workers=num_workers > 0)


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.SGD:
    """SGD with the backbone at ``lr`` and everything else at ``lr * lr_multi`` (SPEC 3.8)."""
    backbone, rest = model.param_groups()
    t = cfg.train
    return torch.optim.SGD(
        [{"params": backbone, "lr": t.lr, "base_lr": t.lr},
         {"params": rest, "lr": t.lr * t.lr_multi, "base_lr": t.lr * t.lr_multi}],
        lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
    )


def prepare_run_dir(cfg: Config) -> Path:
    """A fresh output folder; an existing non-empty one is never written into."""
    if cfg.run_dir:
        run_dir = Path(cfg.run_dir)
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path("runs") / f"{cfg.name}-{cfg.method.name}-{stamp}"
    if run_dir.exists() and any(run_dir.iterdir()):
        raise TrainingError(f"run folder '{run_dir}' already exists and is not empty; "
                            "choose another with run_dir=PATH (nothing was overwritten)")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return run_dir


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.device = resolve_device(cfg.train.device)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        seed_everything(cfg.train.seed)
        self.class_names = class_names_for(cfg)

        labeled, unlabeled = build_train_datasets(cfg)
        t, workers = cfg.train, cfg.data.num_workers
        self.method_uses_unlabeled = METHODS[cfg.method.name].uses_unlabeled
        if self.method_uses_unlabeled:
            if unlabeled is None:
                raise TrainingError(f"method '{cfg.method.name}' needs unlabeled data: set data.unlabeled_split")
            self.unlabeled_loader = make_loader(unlabeled, t.batch_size_unlabeled, True, t.seed + 1, workers, self.device)
            self.mix_loader = make_loader(unlabeled, t.batch_size_unlabeled, True, t.seed + 2, workers, self.device)
            self.iters_per_epoch = len(self.unlabeled_loader)
        self.labeled_loader = make_loader(labeled, t.batch_size, True, t.seed, workers, self.device)
        if not self.method_uses_unlabeled:
            self.iters_per_epoch = len(self.labeled_loader)
        if self.iters_per_epoch == 0:
            raise TrainingError("the training set is smaller than one batch; lower train.batch_size")
        self.total_iters = t.iters or t.epochs * self.iters_per_epoch
        self.val_loader = make_loader(build_val_dataset(cfg), cfg.eval.batch_size, False, 0,
                                      min(workers, 2), self.device, drop_last=False)

        student = build_model(cfg).to(self.device)
        self.method: Method = build_method(cfg, student, self.iters_per_epoch).to(self.device)
        self.optimizer = build_optimizer(student, cfg)
        self.logger = RunLogger(run_dir, self.total_iters, progress=t.progress)
        self.step = 0
        self.best_miou = -1.0
        self.history: list[dict[str, Any]] = []

    # ---- data -----------------------------------------------------------------
    def _batches(self):
        """Endless stream of ``Batch`` on the device, one epoch after another."""
        dev = self.device
        nb = dev.type == "cuda"
        while True:
            if self.method_uses_unlabeled:
                for (x, y), u, u_mix in zip(self.labeled_loader, self.unlabeled_loader, self.mix_loader):
                    yield Batch((x.to(dev, non_blocking=nb), y.to(dev, non_blocking=nb)),
                                {k: v.to(dev, non_blocking=nb) for k, v in u.items()},
                                {k: v.to(dev, non_blocking=nb) for k, v in u_mix.items()})
            else:
                for x, y in self.labeled_loader:
                    yield Batch((x.to(dev, non_blocking=nb), y.to(dev, non_blocking=nb)))

    # ---- loop -----------------------------------------------------------------
    def fit(self) -> TrainResult:
        cfg = self.cfg.train
        start = time.perf_counter()
        self.method.train()
        running: dict[str, torch.Tensor] = {}
        n_running = 0
        batches = self._batches()
        final: dict[str, EvalResult] = {}
        while self.step < self.total_iters:
            batch = next(batches)
            for group in self.optimizer.param_groups:
                group["lr"] = poly_lr(group["base_lr"], self.step, self.total_iters, cfg.poly_power)
            losses = self.method.training_step(batch, self.step)
            self.optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            self.optimizer.step()
            self.method.after_optimizer_step(self.step)

            for k, v in losses.items():
                running[k] = running.get(k, 0) + v.detach()
            n_running += 1
            self.step += 1
            if self.step % cfg.log_every == 0 or self.step == self.total_iters:
                self._log_train(running, n_running)
                running, n_running = {}, 0
            self.logger.advance()

            epoch_done = self.step % self.iters_per_epoch == 0
            epoch = self.step // self.iters_per_epoch
            if (epoch_done and epoch % cfg.eval_every == 0) or self.step == self.total_iters:
                final = self._evaluate_and_checkpoint(epoch)
                self.method.train()
        wall = time.perf_counter() - start
        self.logger.close()
        summary = {name: r.summary(self.class_names) for name, r in final.items()}
        return TrainResult(self.run_dir, summary, self.best_miou * 100, self.step, wall, self.history)

    def _log_train(self, running: dict[str, torch.Tensor], n: int) -> None:
        names = list(running)
        values = torch.stack([running[k].float() for k in names]).div(n).tolist()  # one host sync
        scalars = dict(zip(names, values))
        for name, value in scalars.items():
            if not math.isfinite(value):
                raise TrainingError(f"loss term '{name}' became {value} by step {self.step}; "
                                    f"the last checkpoint in {self.run_dir} is intact. Try a lower train.lr.")
        scalars["lr"] = self.optimizer.param_groups[0]["lr"]
        self.logger.log_train(self.step, scalars)

    def _evaluate_and_checkpoint(self, epoch: int) -> dict[str, EvalResult]:
        e = self.cfg.eval
        results = evaluate(self.method.eval_models(), self.val_loader, self.cfg.data.num_classes, self.device,
                           e.mode, e.crop_size or self.cfg.data.crop_size, e.stride_ratio)
        summary = {name: r.summary(self.class_names) for name, r in results.items()}
        self.logger.log_eval(self.step, epoch, summary)
        self.history.append({"step": self.step, "epoch": epoch, **{n: s["miou"] for n, s in summary.items()}})
        best_now = max(r.miou for r in results.values())
        state = self._checkpoint_state(epoch, summary)
        atomic_save(state, self.run_dir / "last.pt")
        if best_now > self.best_miou:
            self.best_miou = best_now
            state["best_miou"] = best_now * 100
            atomic_save(state, self.run_dir / "best.pt")
        return results

    def _checkpoint_state(self, epoch: int, summary: dict) -> dict[str, Any]:
        return {
            "format": "dssn-checkpoint-1",
            "step": self.step,
            "epoch": epoch,
            "best_miou": self.best_miou * 100,
            "models": {name: m.state_dict() for name, m in self.method.modules().items()},
            "optimizer": self.optimizer.state_dict(),
            "config": self.cfg.to_dict(),
            "class_names": self.class_names,
            "palette": palette_for(self.cfg),
            "eval": summary,
        }


def train(cfg: Config) -> TrainResult:
    """Train one run described by ``cfg``; returns the final scores."""
    from dssn.data.check import check_before_training

    check_before_training(cfg)  # fast data check first: stop before a run folder or model exists
    run_dir = prepare_run_dir(cfg)
    return Trainer(cfg, run_dir).fit()
