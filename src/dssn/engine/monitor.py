"""Live diagnostics of a run: the engine calls four hooks, the monitor does the rest.

- ``before_step``: asks the method for diagnostics on the steps that will be logged
  (``Method.collect_diagnostics``) and keeps a few unlabeled weak views for the panels.
- ``on_log``: adds throughput and both learning rates to the logged scalars, reads the
  method's diagnostic tensors in one host transfer, accumulates the CPLG-vs-fixed
  counts, writes them to TensorBoard and ``metrics.jsonl`` (``kind: diag``) and applies
  the health rules (``kind: warning`` records and a console line).
- ``on_eval``: timing, the evaluation health rules (teacher vs student, single class) and the
  image panels.
- ``finish``: ``result.json`` (the marker of a finished run) and a summary of the
  warnings.

Nothing here changes what training computes: the diagnostics run under ``no_grad``
with their own random generator, and any failure to draw is reported, not raised.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dssn.config import Config
from dssn.data.colors import denormalise, fit_box
from dssn.engine.evaluate import center_crop, predict_tta
from dssn.engine.panels import Panels
from dssn.engine.rundir import METRICS_NAME, PANELS_NAME, RESULT_NAME, RUN_INFO_NAME, read_metrics, write_json
from dssn.method.base import Batch, Method
from dssn.method.diagnostics import HealthWarning, health_warnings, loss_shares


def _finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None


class TrainingMonitor:
    def __init__(self, cfg: Config, run_dir: Path, method: Method, optimizer: torch.optim.Optimizer, logger,
                 class_names: list[str], palette: list[int], iters_per_epoch: int, total_iters: int,
                 val_dataset, device: torch.device, images_per_step_scale: int = 1) -> None:
        """``images_per_step_scale``: micro-batches per step times processes (for ``img_s``)."""
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.method = method
        self.optimizer = optimizer
        self.logger = logger
        self.class_names = class_names
        self.palette = palette
        self.iters_per_epoch = iters_per_epoch
        self.total_iters = total_iters
        self.val_dataset = val_dataset
        self.device = device
        d, t = cfg.diag, cfg.train
        self.rules = d
        method.diag_threshold = d.fixed_threshold
        self.images_per_step = images_per_step_scale * (
            t.batch_size + (t.batch_size_unlabeled if method.uses_unlabeled else 0))
        self.grace_step = max(getattr(method, "warmup_steps", 0), math.ceil(d.grace * total_iters))
        self.cumulative: dict[str, torch.Tensor] = {}
        self.best_selected: float | None = None
        self.warning_counts: dict[str, int] = {}
        self.warning_steps: dict[str, list[int]] = {}
        self._streaks: dict[str, dict[str, int]] = {}
        self.unlabeled_views: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._panel_error_shown = False
        self._started = False  # set at the first step of this session (after a resume: the resumed step)
        self._start = self._last_time = time.perf_counter()
        self._last_step = self._last_step_at_start = 0
        self._eval_pending = 0.0  # evaluation seconds since the last log step
        self.eval_seconds = 0.0
        self._prior_train_s = 0.0  # training time of the sessions before a resume
        run_info = {
            "method": method.name, "class_names": class_names, "palette": list(palette)[:768],
            "iters_per_epoch": iters_per_epoch, "total_iters": total_iters,
            "images_per_step": self.images_per_step, "loss_weights": method.loss_weights(),
            "log_every": t.log_every, "grace_step": self.grace_step, "fixed_threshold": d.fixed_threshold,
        }
        write_json(self.run_dir / RUN_INFO_NAME, run_info)
        self.run_info = run_info

    def note_precision(self, precision: str, reason: str) -> None:
        """The training step's precision and why: a log line and ``run_info.json``."""
        self.run_info.update(precision=precision, precision_reason=reason)
        write_json(self.run_dir / RUN_INFO_NAME, self.run_info)
        self._message(f"precision: {precision} ({reason})")

    def note_plan(self, plan: dict[str, Any], line: str, notes: list[str]) -> None:
        """The batch plan (``engine.plan``): log lines (the plan, then its notes: the learning-rate
        rule, what batch norm sees) and ``run_info.json``."""
        self.run_info.update(batch_plan={**plan, "line": line, "notes": notes})
        write_json(self.run_dir / RUN_INFO_NAME, self.run_info)
        for text in (line, *notes):
            self._message(f"batch plan: {text}")

    # ---- hooks ---------------------------------------------------------------------------------
    def before_step(self, step: int, batch: Batch) -> None:
        """``step``: the 0-based index of the step about to run."""
        if not self._started:
            self._begin(step)
        done = step + 1
        logged = done % self.cfg.train.log_every == 0 or done == self.total_iters
        self.method.collect_diagnostics = self.cfg.diag.enabled and logged
        want = self.cfg.diag.panels
        if want and batch.unlabeled is not None and sum(len(w) for w, _ in self.unlabeled_views) < want:
            views = batch.unlabeled
            self.unlabeled_views.append((views.weak.detach().clone(), views.ignore.detach().clone()))

    def on_log(self, step: int, scalars: dict[str, float]) -> None:
        """Adds ``img_s`` and ``lr_head`` to ``scalars`` (logged with the losses), logs the diagnostics."""
        now = time.perf_counter()
        train_seconds = max(now - self._last_time - self._eval_pending, 1e-9)
        scalars["img_s"] = (step - self._last_step) * self.images_per_step / train_seconds
        if len(self.optimizer.param_groups) > 1:
            scalars["lr_head"] = self.optimizer.param_groups[-1]["lr"]
        self._last_time, self._last_step, self._eval_pending = now, step, 0.0

        stats: dict[str, float] = dict(scalars)
        if "selected_t" not in stats and "selected_w" in stats:  # fixmatch: its one selection
            stats["selected_t"] = stats["selected_w"]
        record: dict[str, Any] = {"kind": "diag", "step": step}
        shares = loss_shares(scalars, self.method.loss_weights())
        record["share"] = shares
        stats.update({f"share/{k}": v for k, v in shares.items()})
        diag = self.method.pop_diagnostics()
        if diag:
            stats.update(self._read_diagnostics(diag, record))
        self._log_record(step, record)
        if step >= self.grace_step:
            found = health_warnings(stats, self.rules, self.best_selected, step / self.total_iters)
            self._check(step, found, "log", self.cfg.diag.patience)
        if "selected_t" in stats and math.isfinite(stats["selected_t"]):
            self.best_selected = max(self.best_selected or 0.0, stats["selected_t"])

    def on_eval(self, step: int, epoch: int, summary: dict[str, dict[str, Any]], seconds: float) -> None:
        start = time.perf_counter()
        if step >= self.grace_step:
            stats = {f"spread/{name}": s["prediction_spread"] for name, s in summary.items()
                     if s.get("prediction_spread") is not None}
            if "teacher" in summary and "student" in summary:
                stats.update({"miou/student": summary["student"]["miou"], "miou/teacher": summary["teacher"]["miou"]})
            self._check(step, health_warnings(stats, self.rules), "eval", 1)
        if self.cfg.diag.panels > 0:
            try:
                self.draw_panels(step)
            except Exception as err:  # a drawing problem must never stop training
                if not self._panel_error_shown:
                    self._panel_error_shown = True
                    self._message(f"warning: could not draw the image panels: {type(err).__name__}: {err}")
        seconds += time.perf_counter() - start
        self._eval_pending += seconds
        self.eval_seconds += seconds
        session_s = max(time.perf_counter() - self._start - self.eval_seconds, 1e-9)  # since this session began
        self.logger.log_record({"kind": "timing", "step": step, "epoch": epoch, "eval_s": round(seconds, 3),
                                "train_s": round(self._prior_train_s + session_s, 3),
                                "img_s": (step - self._last_step_at_start) * self.images_per_step / session_s})

    def finish(self, final: dict[str, dict[str, Any]], best_miou: float, iters: int, wall: float) -> None:
        """Write ``result.json``; summarise the warnings; write the report (``train.report``)."""
        if not self._started and (self.run_dir / RESULT_NAME).is_file():
            return  # a resumed run that had already finished: its result and report stand
        session_steps = max(iters - self._last_step_at_start, 0)
        session_s = max(time.perf_counter() - self._start - self.eval_seconds, 1e-9)
        result = {
            "finished": iters >= self.total_iters, "iters": iters, "total_iters": self.total_iters,
            "method": self.method.name, "best_miou": best_miou, "final": final, "wall_time": wall,
            "train_time": self._prior_train_s + session_s, "eval_time": self.eval_seconds,
            "images_per_s": session_steps * self.images_per_step / session_s,
            "time_per_epoch": session_s / max(session_steps, 1) * self.iters_per_epoch,
            "warnings": self.warning_counts,
        }
        write_json(self.run_dir / RESULT_NAME, result)
        for rule, count in self.warning_counts.items():
            steps = self.warning_steps[rule]
            print(f"health warning '{rule}': {count} log step(s), steps {steps[0]}..{steps[-1]} "
                  f"(see metrics.jsonl / report)", file=sys.stderr)

    # ---- internals -----------------------------------------------------------------------------
    def _begin(self, step: int) -> None:
        """Start the clocks at the first step (setup time is not training time). A resumed run
        (``step > 0``) takes back what its earlier sessions logged up to ``step``: the
        cumulative counts, the best selected fraction, warnings and training time."""
        self._started = True
        self._start = self._last_time = time.perf_counter()
        self._last_step = self._last_step_at_start = step
        if step == 0:
            return
        records = {k: [r for r in v if (r.get("step") or 0) <= step]
                   for k, v in read_metrics(self.run_dir / METRICS_NAME).items()}
        names = self.class_names
        device = self.device
        for r in reversed(records.get("diag", [])):
            if "counts" in r and "selection_counts" in r:
                c, sc = r["counts"], r["selection_counts"]
                as_tensor = lambda rows: torch.tensor([[d.get(n) or 0 for n in names] for d in rows],  # noqa: E731
                                                      dtype=torch.int64, device=device)
                self.cumulative["cplg_vs_fixed"] = as_tensor([c["pseudo"], c["cplg"], c["fixed"]])
                self.cumulative["select_counts"] = as_tensor([sc["pseudo"], sc["selected"]])
                break
        selected = [r.get("selected_t", r.get("selected_w")) for r in records.get("train", [])]
        selected = [v for v in selected if v is not None]
        self.best_selected = max(selected) if selected else None
        for w in records.get("warning", []):
            self.warning_counts[w["rule"]] = self.warning_counts.get(w["rule"], 0) + 1
            self.warning_steps.setdefault(w["rule"], []).append(w["step"])
        timing = records.get("timing", [])
        if timing:
            self._prior_train_s = float(timing[-1].get("train_s", 0.0))

    def _read_diagnostics(self, diag: dict[str, torch.Tensor], record: dict[str, Any]) -> dict[str, float]:
        """One host transfer for every diagnostic tensor; fills ``record`` and returns flat stats."""
        for key in ("select_counts", "cplg_vs_fixed"):
            if key in diag:
                total = self.cumulative.get(key)
                self.cumulative[key] = diag[key] if total is None else total + diag[key]
        names = sorted(diag)
        cum_names = sorted(self.cumulative)
        tensors = [diag[k] for k in names] + [self.cumulative[k] for k in cum_names]
        flat = torch.cat([t.detach().double().reshape(-1) for t in tensors]).tolist()
        values: dict[str, np.ndarray] = {}
        offset = 0
        for key, tensor in zip([*names, *(f"cum/{k}" for k in cum_names)], tensors):
            values[key] = np.asarray(flat[offset: offset + tensor.numel()]).reshape(tensor.shape)
            offset += tensor.numel()

        names_c = self.class_names
        stats: dict[str, float] = {}
        per_class = lambda arr: {n: _finite_or_none(float(v)) for n, v in zip(names_c, arr)}  # noqa: E731
        with np.errstate(divide="ignore", invalid="ignore"):
            if "select_counts" in values:
                total, chosen = values["select_counts"]
                record["selected"] = per_class(chosen / total)
                record["pseudo_share"] = per_class(total / max(total.sum(), 1))
            if "cum/select_counts" in values:
                total, chosen = values["cum/select_counts"]
                record["selected_cum"] = per_class(chosen / total)
                record["selection_counts"] = {"pseudo": per_class(total), "selected": per_class(chosen)}
            if "cplg_thr" in values:
                thr_sum, active = values["cplg_thr"]
                record["cplg_threshold"] = per_class(thr_sum / active)
                record["cplg_active"] = per_class(active)
            if "cum/cplg_vs_fixed" in values:
                pseudo, cplg, fixed = values["cum/cplg_vs_fixed"]
                record["counts"] = {"pseudo": per_class(pseudo), "cplg": per_class(cplg), "fixed": per_class(fixed)}
        for key in ("agreement", "teacher_distance"):
            if key in values:
                record[key] = stats[key] = float(values[key])
        similarity = {}
        for level in ("img", "feat"):
            if f"sim/{level}" in values:
                pos, rand = values[f"sim/{level}"]
                similarity[f"{level}_pos"] = stats[f"sim/{level}_pos"] = float(pos)
                similarity[f"{level}_rand"] = stats[f"sim/{level}_rand"] = float(rand)
        if similarity:
            record["similarity"] = similarity
        return stats

    def _log_record(self, step: int, record: dict[str, Any]) -> None:
        tb = self.logger.tb
        for group in ("selected", "cplg_threshold"):
            for cls, v in record.get(group, {}).items():
                if v is not None:
                    tb.add_scalar(f"diag/{group}/{cls}", v, step)
        for kind, counts in record.get("counts", {}).items():
            for cls, v in counts.items():
                if v is not None:
                    tb.add_scalar(f"diag/pixels_{kind}/{cls}", v, step)
        for term, v in record.get("share", {}).items():
            tb.add_scalar(f"diag/loss_share/{term}", v, step)
        for key in ("agreement", "teacher_distance"):
            if key in record:
                tb.add_scalar(f"diag/{key}", record[key], step)
        for key, v in record.get("similarity", {}).items():
            tb.add_scalar(f"diag/similarity/{key}", v, step)
        self.logger.log_record(record)

    def _check(self, step: int, found: list[HealthWarning], source: str, patience: int) -> None:
        """Report the rules that have held at ``patience`` consecutive checks of this source."""
        streak = self._streaks.setdefault(source, {})
        holding = {w.rule for w in found}
        for rule in [r for r in streak if r not in holding]:
            del streak[rule]
        ready = []
        for w in found:
            streak[w.rule] = streak.get(w.rule, 0) + 1
            if streak[w.rule] >= patience:
                ready.append(w)
        self._emit(step, ready)

    def _emit(self, step: int, warnings: list[HealthWarning]) -> None:
        for w in warnings:
            self.logger.log_record({"kind": "warning", "step": step, "rule": w.rule, "message": w.message})
            first = w.rule not in self.warning_counts
            self.warning_counts[w.rule] = self.warning_counts.get(w.rule, 0) + 1
            self.warning_steps.setdefault(w.rule, []).append(step)
            if first:  # the console gets each rule once; metrics.jsonl and the report get every step
                self._message(f"health warning at step {step} [{w.rule}]: {w.message}")

    def _message(self, text: str) -> None:
        self.logger.message(text)

    @torch.inference_mode()
    def draw_panels(self, step: int):
        """Predict on the first ``diag.panels`` validation images and on kept unlabeled views;
        write the grids to TensorBoard and ``panels/latest.npz``."""
        n = self.cfg.diag.panels
        e, c = self.cfg.eval, self.cfg.data.num_classes
        crop = e.crop_size or self.cfg.data.crop_size
        samples = [self.val_dataset[i] for i in range(min(n, len(self.val_dataset)))]
        models = self.method.eval_models()
        was_training = {k: m.training for k, m in models.items()}
        images, masks, names, preds = [], [], [], {k: [] for k in models}
        try:
            for m in models.values():
                m.eval()
            for image, mask, name, *_ in samples:
                x = image[None].to(self.device)
                if e.mode == "center_crop":
                    x, mask = center_crop(x, crop), center_crop(mask, crop)
                images.append(denormalise(x[0]))
                masks.append(mask.numpy().astype(np.uint8))
                names.append(str(name))
                for k, model in models.items():
                    pred = predict_tta(model, x, c, e.mode, crop, e.stride_ratio, e.scales, e.flip).argmax(dim=1)[0]
                    preds[k].append(pred.cpu().numpy().astype(np.uint8))
        finally:
            for k, m in models.items():
                m.train(was_training[k])
        size = min(256, max(max(im.shape[:2]) for im in images))
        fitted = [fit_box(im, size, nearest=False) for im in images]
        panels = Panels(step, np.stack([f[0] for f in fitted]), np.stack([f[1] for f in fitted]),
                        np.stack([fit_box(m, size, nearest=True)[0] for m in masks]),
                        {k: np.stack([fit_box(p, size, nearest=True)[0] for p in v]) for k, v in preds.items()},
                        names=names)
        if self.unlabeled_views:
            w = torch.cat([v[0] for v in self.unlabeled_views])[:n]
            ign = torch.cat([v[1] for v in self.unlabeled_views])[:n]
            out = self.method.pseudo_labels(w)
            if out is not None:
                logits, selected = out
                pseudo = logits.argmax(dim=1).cpu().numpy().astype(np.uint8)
                valid = (ign != 255).cpu().numpy()
                selected = selected.cpu().numpy()
                u_size = min(256, w.shape[-1])
                ims = [fit_box(denormalise(im), u_size, nearest=False) for im in w]
                panels.unl_image = np.stack([i[0] for i in ims])
                panels.unl_valid = np.stack([i[1] & fit_box(v.astype(np.uint8), u_size, True)[0].astype(bool)
                                             for i, v in zip(ims, valid)])
                panels.unl_pseudo = np.stack([fit_box(p, u_size, True)[0] for p in pseudo])
                panels.unl_selected = np.stack([fit_box(s.astype(np.uint8), u_size, True)[0].astype(bool)
                                                for s in selected])
        for tag, arr in panels.tensorboard_images(self.palette).items():
            self.logger.tb.add_image(f"panels/{tag}", arr, step, dataformats="HWC")
        panels.save(self.run_dir / PANELS_NAME)
        return panels
