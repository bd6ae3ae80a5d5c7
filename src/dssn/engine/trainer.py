"""The training engine: loop, schedule, evaluation, checkpoints and logs.

It knows nothing of any method's losses: a ``Method`` turns each batch into a
dict of losses and the engine back-propagates ``losses["loss"]``. It also owns
everything about processes and speed: DistributedDataParallel under torchrun
(``engine.distributed``), gradient accumulation, mixed precision, channels-last
and ``torch.compile``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Subset

from dssn.config import Config
from dssn.data import build_train_datasets, build_val_dataset, class_names_for, palette_for
from dssn.data.check import check_before_training
from dssn.engine.checkpoint import (
    FORMAT,
    LAST,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    state_nbytes,
)
from dssn.engine.distributed import (
    DistInfo,
    all_reduce_sum,
    average_buffers,
    broadcast_from_main,
    gather_to_main,
    init_distributed,
    process_device,
    run_on_main,
    shard,
    shutdown,
    wrap_ddp,
)
from dssn.engine.evaluate import EvalResult, evaluate
from dssn.engine.logger import RunLogger
from dssn.engine.monitor import TrainingMonitor
from dssn.engine.plan import apply_plan, plan_batches
from dssn.engine.precision import precision_name, resolve_precision
from dssn.engine.preemption import StopSignals, requeue_slurm_job
from dssn.engine.rundir import check_free_space, open_run_dir
from dssn.engine.runtime import (
    make_loader,
    make_train_loader,
    resolve_device,
    seed_everything,
    set_deterministic,
    to_device,
    use_channels_last,
)
from dssn.errors import TrainingError, TrainingPreempted
from dssn.method import METHODS, Batch, Method, build_method
from dssn.method.components import poly_lr
from dssn.models import build_model, check_model_config, check_pretrained


@dataclass
class TrainResult:
    run_dir: Path
    final: dict[str, dict[str, Any]]
    """Per evaluated model (``student``, ``teacher``): mIoU and per-class IoU in percent."""
    best_miou: float
    iters: int
    wall_time: float
    history: list[dict[str, Any]] = field(default_factory=list)
    main_process: bool = True
    """False on torchrun's ranks other than 0 (which print and write nothing)."""


class NonFiniteWatch:
    """Remembers, on the device, the first step at which each loss term was NaN or infinite.

    ``update`` adds a few tiny device ops per step and no host synchronisation;
    ``check`` (at log steps and before every checkpoint) reads it back and raises.
    """

    def __init__(self) -> None:
        self.first: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, losses: dict[str, torch.Tensor], step: int) -> None:
        names = tuple(losses)
        values = torch.stack([v.detach().float().reshape(()) for v in losses.values()])
        steps, first_values = self.first.get(names) or (
            torch.full_like(values, -1, dtype=torch.long), torch.zeros_like(values))
        new = ~torch.isfinite(values) & (steps < 0)
        self.first[names] = (torch.where(new, step, steps), torch.where(new, values, first_values))

    def check(self, run_dir: Path, last_saved: int | None) -> None:
        found: list[tuple[int, str, float]] = []
        for names, (steps, values) in self.first.items():
            for name, s, v in zip(names, steps.tolist(), values.tolist()):
                if s >= 0:
                    found.append((s, name, v))
        if not found:
            return
        step = min(s for s, _, _ in found)
        terms = [(n, v) for s, n, v in found if s == step]
        # Name the terms that caused it before the total they feed into.
        terms.sort(key=lambda t: t[0] == "loss")
        listed = ", ".join(f"'{n}' = {v}" for n, v in terms)
        kept = (f"the last good checkpoint (step {last_saved}) in {run_dir} is intact"
                if last_saved is not None else f"no checkpoint had been written to {run_dir} yet")
        raise TrainingError(f"non-finite loss at step {step}: {listed}. Training stopped; {kept} and nothing "
                            "after the failure was saved. Try a lower train.lr, or check the data.")


class _Quiet:
    """Stands in for the logger and the monitor on ranks other than 0: they write nothing."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """``train.optimizer`` (SGD or AdamW) with the backbone at ``lr`` and everything else at
    ``lr * lr_multi`` (docs/method.md §8). A frozen backbone leaves its group empty."""
    backbone, rest = model.param_groups()
    t = cfg.train
    groups = [{"params": backbone, "lr": t.lr, "base_lr": t.lr},
              {"params": rest, "lr": t.lr * t.lr_multi, "base_lr": t.lr * t.lr_multi}]
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)


@dataclass
class TrainingParts:
    """What one process trains with; ``build_training`` makes it from a config."""

    method: Method
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast_dtype: torch.dtype | None
    channels_last: bool
    ddp: nn.parallel.DistributedDataParallel | None
    sync_bn: bool
    precision_reason: str = ""
    """Why ``autocast_dtype`` was chosen (``engine.precision.resolve_precision``)."""


def build_training(cfg: Config, device: torch.device, iters_per_epoch: int,
                   dist: DistInfo = DistInfo()) -> TrainingParts:
    """The student (channels-last, SyncBN, DDP, compiled as configured), its method, the SGD
    optimizer and the loss scaler. The method's ``student`` is the wrapped network, if any."""
    t = cfg.train
    student = build_model(cfg).to(device)
    channels_last = use_channels_last(t.channels_last, device)
    if channels_last:
        student = student.to(memory_format=torch.channels_last)
    sync_bn = dist.enabled and t.sync_bn and device.type == "cuda"
    if sync_bn:
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    method = build_method(cfg, student, iters_per_epoch).to(device)
    optimizer = build_optimizer(student, cfg)
    ddp = wrap_ddp(student, device) if dist.enabled else None
    if ddp is not None:
        method.student = ddp
    if t.compile:
        method.student = torch.compile(method.student)
    autocast_dtype, precision_reason = resolve_precision(t.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    return TrainingParts(method, optimizer, scaler, autocast_dtype, channels_last, ddp, sync_bn, precision_reason)


def optimizer_step(method: Method, optimizer: torch.optim.Optimizer, micro_batches: list[Batch], step: int,
                   scaler: torch.amp.GradScaler, autocast_dtype: torch.dtype | None = None,
                   ddp: nn.parallel.DistributedDataParallel | None = None,
                   average: bool = False) -> list[dict[str, torch.Tensor]]:
    """One optimizer step of any method over ``micro_batches`` (``train.accumulate`` of them); the
    losses of each. Every loss is divided by their number, DDP averages the gradients in the last
    backward only, ``average`` equalises BN statistics across ranks (CPU runs, no SyncBN), then
    the method's hook runs (DSSN: the EMA teacher)."""
    device_type = micro_batches[0].labeled[0].device.type
    optimizer.zero_grad(set_to_none=True)
    out = []
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext():
            with torch.autocast(device_type, autocast_dtype, enabled=autocast_dtype is not None):
                losses = method.training_step(batch, step)
            loss = losses["loss"] if len(micro_batches) == 1 else losses["loss"] / len(micro_batches)
            scaler.scale(loss).backward()
        out.append(losses)
    scaler.step(optimizer)
    scaler.update()
    if average:
        average_buffers(method.modules().values())
    method.after_optimizer_step(step)
    return out


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, resume: dict[str, Any] | None = None,
                 dist: DistInfo = DistInfo()) -> None:
        """``resume``: a checkpoint of this run (``engine.checkpoint``) to continue from.
        ``dist``: this process's place in a torchrun job (``train`` sets the process group up).
        The per-process batch, accumulation and learning rate come from the batch plan
        (``engine.plan``); ``self.cfg`` holds them, the run folder the config as written."""
        method_class = METHODS[cfg.method.name]
        self.plan = plan_batches(cfg.train, dist.world_size, method_class.uses_unlabeled)
        cfg = apply_plan(cfg, self.plan)
        self.cfg = cfg
        self.run_dir = run_dir
        self.dist = dist
        self.device = process_device(resolve_device(cfg.train.device), dist)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        set_deterministic(cfg.train.deterministic)
        seed_everything(cfg.train.seed)
        self.class_names = class_names_for(cfg)

        labeled, unlabeled = build_train_datasets(cfg)
        t, workers = cfg.train, cfg.data.num_workers
        # Each rank reads its shard of every epoch; an optimizer step takes `accumulate` batches.
        self.loaders = [make_train_loader(labeled, t.batch_size, t.seed, workers, self.device, dist)]
        if method_class.uses_unlabeled:
            if unlabeled is None:
                raise TrainingError(f"method '{cfg.method.name}' needs unlabeled data: set data.unlabeled_split")
            # U and U' (the CutMix donors): two independent streams over the unlabeled set; U alone for
            # methods that pair the images of U among themselves.
            streams = (1, 2) if method_class.uses_partner_batch else (1,)
            self.loaders += [make_train_loader(unlabeled, t.batch_size_unlabeled, t.seed + s, workers, self.device,
                                               dist) for s in streams]
        # An epoch is one pass over the unlabeled set (the labeled set is repeated to its length).
        self.iters_per_epoch = min(len(loader) for loader in self.loaders) // t.accumulate
        if self.iters_per_epoch == 0:
            raise TrainingError("the training set is smaller than one step's global batch "
                                f"({self.plan.line('process')}); lower train.global_batch and "
                                "train.global_batch_unlabeled (or train.batch_size, train.accumulate if set by hand)")
        self.total_iters = t.iters or t.epochs * self.iters_per_epoch
        val_dataset = build_val_dataset(cfg)
        # Each rank scores its own images, every image exactly once; the confusion matrices are summed.
        val_shard = val_dataset if not dist.enabled else Subset(val_dataset, shard(range(len(val_dataset)), dist))
        self.val_loader = make_loader(val_shard, cfg.eval.batch_size, False, 0,
                                      min(workers, 2), self.device, drop_last=False)

        parts = build_training(cfg, self.device, self.iters_per_epoch, dist)
        self.method, self.optimizer, self.scaler = parts.method, parts.optimizer, parts.scaler
        self.autocast_dtype, self.channels_last = parts.autocast_dtype, parts.channels_last
        self.ddp, self.sync_bn = parts.ddp, parts.sync_bn
        student = self.method.student_net
        if dist.enabled:  # ranks differ in their random draws (the feature perturbation), not in the model
            seed_everything(t.seed + dist.rank)

        def open_logs() -> tuple[RunLogger, TrainingMonitor]:
            # Checkpoint size: every network's state plus the optimizer's momentum (one per parameter).
            checkpoint_bytes = (state_nbytes(*(m.state_dict() for m in self.method.modules().values()))
                                + state_nbytes(dict(student.named_parameters())))
            check_free_space(run_dir, checkpoint_bytes, t.keep_last, resuming=resume is not None)
            # An existing run folder (resumed, or started over) purges what the killed run logged after it.
            resume_step = int(resume["step"]) if resume else (0 if (run_dir / "metrics.jsonl").exists() else None)
            logger = RunLogger(run_dir, self.total_iters, progress=t.progress, resume_step=resume_step)
            monitor = TrainingMonitor(cfg, run_dir, self.method, self.optimizer, logger, self.class_names,
                                      palette_for(cfg), self.iters_per_epoch, self.total_iters, val_dataset,
                                      self.device, images_per_step_scale=t.accumulate * dist.world_size)
            return logger, monitor

        # Only rank 0 writes; a problem it finds stops every rank.
        self.logger, self.monitor = run_on_main(open_logs, dist) or (_Quiet(), _Quiet())
        self.monitor.note_precision(precision_name(parts.autocast_dtype), parts.precision_reason)
        unit = "GPU" if self.device.type == "cuda" else "process"
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in student.modules())
        notes = [self.plan.lr_note(), self.plan.batch_norm_note(unit, self.sync_bn) if has_bn else None]
        self.monitor.note_plan(self.plan.to_dict(), self.plan.line(unit), [n for n in notes if n])
        self.step = 0
        self.best_miou = -1.0
        """The best mIoU so far, in percent (as evaluations report it and checkpoints store it)."""
        self.history: list[dict[str, Any]] = []
        self.nonfinite = NonFiniteWatch()
        self.last_saved: int | None = None
        self.last_eval: dict[str, Any] = {}
        self._rng_to_restore: dict[str, Any] | None = None
        if resume is not None:
            self._restore(resume)

    def _restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint: networks, optimizer, step, best score, history, RNG states."""
        replanned = self._check_replan(state)
        models = state["models"]
        for name, module in self.method.modules().items():
            if name not in models:
                raise TrainingError(f"the checkpoint in {self.run_dir} has no '{name}' network "
                                    f"(it has {', '.join(models)}); it was made by another method")
            module.load_state_dict(models[name])
        # The config decides the hyper-parameters (they differ only under train.resume=force).
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, values in zip(self.optimizer.param_groups, hyper):
            group.update(values)
        self.step = int(state["step"])
        self.best_miou = float(state["best_miou"])
        self.history = list(state.get("history", []))
        self.last_eval = dict(state.get("eval") or {})
        self.last_saved = self.step
        if "scaler" in state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        ranks = state.get("rng_ranks")
        if replanned:  # other processes: fresh random streams of their own, away from the run's first ones
            seed_everything(self.cfg.train.seed + 1_000_003 * self.step + self.dist.rank)
        elif ranks and len(ranks) == self.dist.world_size:
            self._rng_to_restore = ranks[self.dist.rank]
        elif "rng" in state:
            self._rng_to_restore = state["rng"]
        else:
            self.logger.message("warning: this checkpoint predates RNG states; the resumed run continues "
                                "with fresh random streams (not bit-identical)")
        if self.step >= self.total_iters:
            self.logger.message(f"the run in {self.run_dir} has already finished (step {self.step}/"
                                f"{self.total_iters}); nothing to train, its last scores follow")
        else:
            self.logger.message(f"resuming {self.run_dir} from step {self.step}/{self.total_iters}")

    def _check_replan(self, state: dict[str, Any]) -> bool:
        """Refuse a resume whose plan changes the run's global batch (another number of processes with
        a per-process batch set by hand, or a run folder from before the batch plan), unless
        ``train.allow_replan``. Returns whether the number of processes changed."""
        data = state.get("data", {})
        saved_world = int(data.get("world_size", 1))
        saved_global, now = _saved_global_batch(state), self.plan.global_batch
        pair = " + ".join(str(n) for n in now if n)
        if saved_global != now and not self.cfg.train.allow_replan:
            was = " + ".join(str(n) for n in saved_global if n)
            raise TrainingError(f"the run in {self.run_dir} was trained by {saved_world} process(es) with a global "
                                f"batch of {was} images per step; resumed by {self.dist.world_size} this config gives "
                                f"{pair} ({self.plan.line('process')}), which would change the run. Resume it with "
                                f"{saved_world} process(es), set the per-process batch that gives {was} "
                                "(train.batch_size, train.batch_size_unlabeled), or add train.allow_replan=true to go "
                                "on with the new batch")
        if saved_world == self.dist.world_size:
            return False
        self.logger.message(f"resumed by {self.dist.world_size} process(es) instead of {saved_world}: global batch "
                            f"{pair} per step as before; the data order and random streams differ from here on (not "
                            "bit-identical to a run that kept its processes)")
        return True

    # ---- data -----------------------------------------------------------------
    def _steps(self) -> Iterator[list[Batch]]:
        """Endless stream of optimizer steps, each ``accumulate`` batches on the device."""
        k = self.cfg.train.accumulate
        # Start where the run stands: a resumed run skips the batches its epoch already used.
        epoch, done = divmod(self.step, self.iters_per_epoch)
        while True:
            for loader in self.loaders:
                loader.sampler.set_epoch(epoch, done * k * loader.batch_size)
            stream = zip(*self.loaders)
            for _ in range(self.iters_per_epoch - done):
                yield [Batch(*to_device(next(stream), self.device, self.channels_last)) for _ in range(k)]
            epoch, done = epoch + 1, 0

    # ---- loop -----------------------------------------------------------------
    def fit(self) -> TrainResult:
        start = time.perf_counter()
        self.method.train()
        steps = self._steps()
        self._final: dict[str, EvalResult] = {}
        first_step = self.step
        with StopSignals() as signals:  # a second signal while the stop's checkpoint is written changes nothing
            stopped = self._loop(steps, signals)
            preempted = self._preempted(signals.received) if stopped == "preempted" else None
        wall = time.perf_counter() - start
        self.logger.close()
        if preempted is not None:
            raise preempted
        if stopped:
            return self._result({}, wall)
        if self.step == first_step:  # a resumed run that had already finished: report its last scores
            return self._result(self.last_eval, wall)
        summary = {name: r.summary(self.class_names) for name, r in self._final.items()}
        self.monitor.finish(summary, self.best_miou, self.step, wall)
        return self._result(summary, wall)

    def _loop(self, steps: Iterator[list[Batch]], signals: StopSignals) -> str | None:
        """Train to the last step; ``stop_after`` or ``preempted`` when stopped before it."""
        cfg = self.cfg.train
        running: dict[str, torch.Tensor] = {}
        n_running = 0
        if self._rng_to_restore is not None:  # last, so that nothing draws between it and the loop
            restore_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
        while self.step < self.total_iters:
            micro_batches = next(steps)
            for group in self.optimizer.param_groups:
                group["lr"] = poly_lr(group["base_lr"], self.step, self.total_iters, cfg.poly_power)
            self.monitor.before_step(self.step, micro_batches[0])
            step_losses = optimizer_step(self.method, self.optimizer, micro_batches, self.step, self.scaler,
                                         self.autocast_dtype, self.ddp, average=self.dist.enabled and not self.sync_bn)
            for losses in step_losses:
                for k, v in losses.items():
                    running[k] = running.get(k, 0) + v.detach()
                n_running += 1
                self.nonfinite.update(losses, self.step + 1)

            self.step += 1
            if self.step % cfg.log_every == 0 or self.step == self.total_iters:
                self.nonfinite.check(self.run_dir, self.last_saved)
                self._log_train(running, n_running)
                running, n_running = {}, 0
            self.logger.advance()

            epoch_done = self.step % self.iters_per_epoch == 0
            epoch = self.step // self.iters_per_epoch
            if (epoch_done and epoch % cfg.eval_every == 0) or self.step == self.total_iters:
                self._final = self._evaluate_and_checkpoint(epoch)
                self.method.train()
            periodic = cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0
            if (epoch_done or periodic) and self.last_saved != self.step:
                self._save(epoch)
            if self.step < self.total_iters and self._stop_requested(signals):
                if self.last_saved != self.step:
                    self._save(epoch)
                return "preempted"
            if cfg.stop_after and self.step >= cfg.stop_after and self.step < self.total_iters:
                return "stop_after"  # debugging: as if killed here (no extra checkpoint, no final evaluation)
        return None

    def _stop_requested(self, signals: StopSignals) -> bool:
        """Whether any rank got SIGTERM/SIGUSR1 (all ranks agree, so they stop after the same step)."""
        if not self.dist.enabled:
            return signals.received is not None
        flag = torch.tensor([float(signals.received is not None)], device=self.device)
        return bool(all_reduce_sum(flag).item() > 0)

    def _preempted(self, received: str | None) -> TrainingPreempted:
        """After the stop's checkpoint: requeue the SLURM job if asked, and the error every rank raises."""
        if self.cfg.train.requeue:
            self.logger.message(run_on_main(requeue_slurm_job, self.dist) or "")
        why = received or "a stop signal on another process"
        return TrainingPreempted(f"stopped by {why} after step {self.step}/{self.total_iters}; its checkpoint is "
                                 f"{self.run_dir}/{LAST} (steps lost: 0). Run the same command again to resume it "
                                 "exactly")

    def _result(self, final: dict[str, dict[str, Any]], wall: float) -> TrainResult:
        return TrainResult(self.run_dir, final, self.best_miou, self.step, wall, self.history,
                           self.dist.is_main)

    def _log_train(self, running: dict[str, torch.Tensor], n: int) -> None:
        names = list(running)
        # The mean over micro-batches and ranks; one host sync (and one all-reduce when distributed).
        values = all_reduce_sum(torch.stack([running[k].float() for k in names])).div(n * self.dist.world_size)
        values = values.tolist()
        scalars = dict(zip(names, values))  # finite: NonFiniteWatch.check ran just before
        scalars["lr"] = self.optimizer.param_groups[0]["lr"]
        self.monitor.on_log(self.step, scalars)  # adds img_s, lr_head; logs the diagnostics
        self.logger.log_train(self.step, scalars)

    def _evaluate_and_checkpoint(self, epoch: int) -> dict[str, EvalResult]:
        self.nonfinite.check(self.run_dir, self.last_saved)  # a diverged model is neither scored nor saved
        e = self.cfg.eval
        eval_start = time.perf_counter()
        results = evaluate(self.method.eval_models(), self.val_loader, self.cfg.data.num_classes, self.device,
                           e.mode, e.crop_size or self.cfg.data.crop_size, e.stride_ratio, e.scales, e.flip,
                           reduce=all_reduce_sum)  # the identity in a single process
        summary = {name: r.summary(self.class_names) for name, r in results.items()}
        self.logger.log_eval(self.step, epoch, summary)
        self.monitor.on_eval(self.step, epoch, summary, time.perf_counter() - eval_start)
        self.history.append({"step": self.step, "epoch": epoch, **{n: s["miou"] for n, s in summary.items()}})
        self.last_eval = summary
        best_now = max(s["miou"] for s in summary.values())
        improved = best_now > self.best_miou
        if improved:
            self.best_miou = best_now
        self._save(epoch, best=improved)
        return results

    def _save(self, epoch: int, best: bool = False) -> None:
        """Checkpoint the current state (``last.pt``, ``checkpoints/``, and ``best.pt`` if ``best``)."""
        self.nonfinite.check(self.run_dir, self.last_saved)  # a non-finite state is never saved
        rng_ranks = gather_to_main(capture_rng_state())  # each rank's random streams, for an exact resume

        def write() -> None:
            state = self._checkpoint_state(epoch, self.last_eval, rng_ranks)
            try:
                save_checkpoint(self.run_dir, state, self.cfg.train.keep_last, best=best)
            except OSError as err:
                kept = f"step {self.last_saved}" if self.last_saved is not None else "none yet"
                raise TrainingError(f"could not write the checkpoint of step {self.step} in {self.run_dir}: "
                                    f"{err.strerror or err}. The previous checkpoint ({kept}) is intact; free "
                                    "some space and run the same command again to resume") from None

        run_on_main(write, self.dist)
        self.last_saved = self.step

    def _checkpoint_state(self, epoch: int, summary: dict, rng_ranks: list[dict[str, Any]]) -> dict[str, Any]:
        """``rng_ranks``: every rank's RNG states (rank 0's is also stored as ``rng``)."""
        return {
            "format": FORMAT,
            "step": self.step,
            "epoch": epoch,
            "best_miou": self.best_miou,
            "models": {name: m.state_dict() for name, m in self.method.modules().items()},
            "optimizer": self.optimizer.state_dict(),
            **({"scaler": self.scaler.state_dict()} if self.scaler.is_enabled() else {}),
            "config": self.cfg.to_dict(),
            "class_names": self.class_names,
            "palette": palette_for(self.cfg),
            "eval": summary,
            "history": self.history,
            "rng": rng_ranks[0],
            **({"rng_ranks": rng_ranks} if self.dist.enabled else {}),
            "data": {"iters_per_epoch": self.iters_per_epoch, "epoch": self.step // self.iters_per_epoch,
                     "batches_done": self.step % self.iters_per_epoch, "world_size": self.dist.world_size,
                     "accumulate": self.cfg.train.accumulate, "global_batch": list(self.plan.global_batch)},
            "plan": self.plan.to_dict(),
        }


def _saved_global_batch(state: dict[str, Any]) -> tuple[int, int]:
    """The global batch (labeled, unlabeled; 0 when unused) a checkpoint's run trained with; worked
    out from its per-process batch for checkpoints written before the batch plan."""
    data = state.get("data", {})
    if "global_batch" in data:
        return tuple(int(n) for n in data["global_batch"])
    train = state.get("config", {}).get("train", {})
    share = int(data.get("world_size", 1)) * int(data.get("accumulate", 1))
    labeled, unlabeled = train.get("batch_size") or 0, train.get("batch_size_unlabeled") or 0
    method = state.get("config", {}).get("method", {}).get("name", "dssn")
    uses_unlabeled = METHODS[method].uses_unlabeled if method in METHODS else True
    return labeled * share, unlabeled * share if uses_unlabeled else 0


def train(cfg: Config) -> TrainResult:
    """Train one run described by ``cfg``; returns the final scores.

    Under torchrun every process calls this; they form one process group, rank 0 owns the run
    folder and the others learn from it where the run is and which checkpoint to resume.
    """
    dist, created_group = init_distributed(resolve_device(cfg.train.device))
    try:
        check_model_config(cfg)  # a network the config cannot build: refused before any folder exists
        # Fast data check first: stop before a run folder or model exists. Rank 0 goes first (it may
        # generate the built-in dataset), then the others check their own copy (other machines).
        run_on_main(lambda: check_before_training(cfg), dist)
        if not dist.is_main:
            check_before_training(cfg)
        # Then the encoder weights: fetched (a name, URL or hf: repository) and checked against the
        # network before any folder exists; the other ranks read the cache (or fetch on their machine).
        run_on_main(lambda: check_pretrained(cfg), dist)
        if not dist.is_main:
            check_pretrained(cfg)

        opened: dict[str, Any] = {}

        def open_run() -> tuple[Path, Path | None]:
            run_dir, opened["found"] = open_run_dir(cfg)  # a new run, or the run already in run_dir to resume
            return run_dir, opened["found"][0] if opened["found"] else None

        run_dir, checkpoint = broadcast_from_main(run_on_main(open_run, dist))
        if dist.is_main:
            resume = opened["found"][1] if opened["found"] else None
        else:  # the other ranks read the checkpoint rank 0 chose
            resume = load_checkpoint(checkpoint) if checkpoint is not None else None
        return Trainer(cfg, run_dir, resume=resume, dist=dist).fit()
    finally:
        if created_group:
            shutdown()
