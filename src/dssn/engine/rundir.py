"""The run folder: its file names, starting a new run or resuming the one already there
safely, and reading a run back (``load_run``, for reports, comparisons and sweeps).

``open_run_dir`` decides, before any model exists:

- missing or empty folder: a new run (``config.yaml`` written first);
- a folder holding a dssn run (its ``config.yaml`` reads as a dssn config): resume
  from its newest readable checkpoint (or start it over if it was killed before
  the first one), but only if the config is the same up to the keys that do not
  change what is trained (``RUNTIME_KEYS``); otherwise refuse and list the
  differing keys, unless ``train.resume=force``;
- any other non-empty folder: refused, nothing in it is touched.

It also checks that the folder is writable and has room for the checkpoints,
so that a full disk or a read-only folder is reported before training starts.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from dssn.config import Config, ConfigError, build_config
from dssn.data.colors import voc_palette
from dssn.engine.checkpoint import find_resume_checkpoint, remove_stale_temporaries
from dssn.errors import DssnError, TrainingError
from dssn.files import atomic_write_text

CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.jsonl"
RUN_INFO_NAME = "run_info.json"
RESULT_NAME = "result.json"
"""Written when training ends: the marker of a finished run."""
REPORT_NAME = "report.html"
PANELS_NAME = "panels/latest.npz"
TENSORBOARD_DIR = "tb"

RUNTIME_KEYS = (
    "name", "run_dir",
    "train.progress", "train.log_every", "train.threads", "train.device", "train.report",
    "train.checkpoint_every", "train.keep_last", "train.resume", "train.stop_after", "train.eval_every",
    "train.channels_last", "train.compile", "model.checkpoint_backbone",
    "data.root", "data.num_workers", "eval.batch_size",
    "diag",  # a whole section: the diagnostics only read the step's tensors
    "train.allow_replan", "train.requeue",
    # How the global batch is split (engine.plan): the trainer compares the global batch itself on resume.
    "train.batch_size", "train.batch_size_unlabeled", "train.global_batch", "train.global_batch_unlabeled",
    "train.accumulate", "train.max_batch_per_gpu",
)
"""Keys that may differ when a run is resumed: where things are, how it reports, how often it
saves or evaluates, and how the global batch is split over processes (the trainer refuses a
resume that changes the global batch itself, ``Trainer._check_replan``)."""


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{path}."))
        else:
            out[path] = value
    return out


def config_diff(old: Config, new: Config, ignore: tuple[str, ...] = RUNTIME_KEYS) -> list[tuple[str, Any, Any]]:
    """``(key, old value, new value)`` for every key that differs, runtime keys left out."""
    a, b = _flatten(old.to_dict()), _flatten(new.to_dict())
    keys = sorted(set(a) | set(b))
    ignored = [k for k in keys if any(k == i or k.startswith(i + ".") for i in ignore)]
    return [(k, a.get(k), b.get(k)) for k in keys if k not in ignored and a.get(k) != b.get(k)]


def _format_diff(diff: list[tuple[str, Any, Any]]) -> str:
    return "\n".join(f"  {k}: {json.dumps(a)} in the run folder, {json.dumps(b)} now" for k, a, b in diff)


def default_run_dir(cfg: Config) -> Path:
    if cfg.run_dir:
        return Path(cfg.run_dir).expanduser()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.name}-{cfg.method.name}-{stamp}"


def read_run_config(run_dir: Path) -> Config | None:
    """The config of the dssn run in ``run_dir``, or None if it holds no dssn run."""
    path = run_dir / CONFIG_NAME
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
        return build_config(data, str(path)) if isinstance(data, dict) else None
    except (yaml.YAMLError, ConfigError, OSError, UnicodeDecodeError):
        return None


def _write_config(run_dir: Path, cfg: Config) -> None:
    try:
        atomic_write_text(run_dir / CONFIG_NAME, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    except OSError as err:
        raise TrainingError(f"cannot write to run folder '{run_dir}': {err.strerror or err}; "
                            "choose a writable folder with run_dir=PATH") from None


def open_run_dir(cfg: Config) -> tuple[Path, tuple[Path, dict[str, Any]] | None]:
    """The run folder and, when resuming, ``(checkpoint path, checkpoint)`` to resume from."""
    run_dir = default_run_dir(cfg)
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainingError(f"run folder '{run_dir}' exists and is not a folder; choose another with run_dir=PATH")
    if not (run_dir.exists() and any(run_dir.iterdir())):
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TrainingError(f"cannot create run folder '{run_dir}': {err.strerror or err}; "
                                "choose another with run_dir=PATH") from None
        check_writable(run_dir)
        _write_config(run_dir, cfg)
        return run_dir, None

    saved = read_run_config(run_dir)
    if saved is None:
        raise TrainingError(f"run folder '{run_dir}' already exists and is not empty, and holds no dssn run "
                            f"(no readable {CONFIG_NAME}); choose another with run_dir=PATH "
                            "(nothing was overwritten)")
    mode = cfg.train.resume
    if mode == "never":
        raise TrainingError(f"run folder '{run_dir}' already exists and holds a run, and train.resume=never; "
                            "choose another run_dir=PATH, or resume it with train.resume=auto "
                            "(nothing was overwritten)")
    diff = config_diff(saved, cfg)
    if diff and mode != "force":
        raise TrainingError(f"run folder '{run_dir}' holds a run made with a different config, so it is not "
                            f"resumed (nothing was changed). Differing keys:\n{_format_diff(diff)}\n"
                            f"Resume it with its own config (dssn train {run_dir / CONFIG_NAME} "
                            f"run_dir={run_dir}), choose another run_dir=PATH, or add train.resume=force "
                            "to resume it with the new values.")
    check_writable(run_dir)
    remove_stale_temporaries(run_dir)
    found = find_resume_checkpoint(run_dir)
    if diff:  # forced: the run goes on under the new config; keep the old one beside it
        step = int(found[1]["step"]) if found else 0
        shutil.copyfile(run_dir / CONFIG_NAME, run_dir / f"config.before-step-{step}.yaml")
        _write_config(run_dir, cfg)
    truncate_metrics(run_dir, int(found[1]["step"]) if found else 0)
    return run_dir, found


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop ``metrics.jsonl`` records after ``step`` (work lost with the run that was killed)."""
    path = run_dir / METRICS_NAME
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the kill
        if not isinstance(record, dict) or record.get("step", 0) <= step:
            kept.append(line)
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


def check_writable(run_dir: Path) -> None:
    probe = run_dir / f".dssn-write-test-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise TrainingError(f"cannot write to run folder '{run_dir}': {err.strerror or err}; "
                            "choose a writable folder with run_dir=PATH") from None
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def check_free_space(run_dir: Path, checkpoint_bytes: int, keep_last: int, resuming: bool) -> None:
    """Refuse to start when the checkpoints the run will write cannot fit.

    A new run needs room for ``keep_last`` step files (``last.pt`` is a link to the
    newest), ``best.pt`` and one file being written; a resumed run, for the one
    being written (the others exist).
    """
    copies = 2 if resuming else max(keep_last, 1) + 2
    need = checkpoint_bytes * copies
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise TrainingError(
            f"not enough free space for checkpoints in '{run_dir}': about {_gib(need)} needed "
            f"({copies} checkpoint files of ~{_gib(checkpoint_bytes)}: train.keep_last={keep_last}, best.pt "
            f"and one being written), {_gib(free)} free. Free some space, lower train.keep_last, or choose "
            "another run_dir=PATH")


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2), durable=False)


# ---------------------------------------------------------------------------------- reading


class RunFolderError(DssnError, ValueError):
    """A folder is not a dssn run folder (or holds no result yet)."""


@dataclass
class RunData:
    path: Path
    config: dict[str, Any]
    info: dict[str, Any]
    result: dict[str, Any] | None
    records: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def method(self) -> str:
        return self.info.get("method") or self.config.get("method", {}).get("name", "?")

    @property
    def class_names(self) -> list[str]:
        if self.info.get("class_names"):
            return list(self.info["class_names"])
        for r in reversed(self.kind("eval")):
            for value in r.values():
                if isinstance(value, dict) and "per_class" in value:
                    return list(value["per_class"])
        n = self.config.get("data", {}).get("num_classes", 0)
        return [f"class_{i}" for i in range(n)]

    @property
    def palette(self) -> list[int]:
        if self.info.get("palette"):
            return list(self.info["palette"])
        return voc_palette(256)

    def kind(self, kind: str) -> list[dict[str, Any]]:
        return self.records.get(kind, [])

    def final(self) -> dict[str, dict[str, Any]]:
        """Per evaluated model: ``{"miou": .., "per_class": {name: iou or None}}`` (percent)."""
        if self.result and self.result.get("final"):
            return self.result["final"]
        evals = self.kind("eval")
        if not evals:
            return {}
        last = evals[-1]
        return {k: v for k, v in last.items() if isinstance(v, dict) and "miou" in v}

    @property
    def finished(self) -> bool:
        return bool(self.result and self.result.get("finished"))


def _dedupe(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep the last record of each step (a resumed run logs the replayed steps again), sorted by step."""
    by_step: dict[Any, dict[str, Any]] = {}
    for r in records:
        by_step[r.get("step")] = r
    return sorted(by_step.values(), key=lambda r: (r.get("step") is None, r.get("step") or 0))


def read_metrics(path: Path) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        out.setdefault(record.get("kind", "?"), []).append(record)
    deduped = {k: _dedupe(v) for k, v in out.items() if k != "warning"}
    if "warning" in out:  # one per (step, rule): a resumed run re-logs the steps it replays
        last = {(w.get("step"), w.get("rule")): w for w in out["warning"]}
        deduped["warning"] = sorted(last.values(), key=lambda w: w.get("step") or 0)
    return deduped


def load_run(path: str | Path) -> RunData:
    path = Path(path)
    if not path.is_dir():
        raise RunFolderError(f"run folder '{path}' does not exist")
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file() and not (path / METRICS_NAME).is_file():
        raise RunFolderError(f"'{path}' is not a run folder (no {CONFIG_NAME} or {METRICS_NAME})")
    config = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else {}
    info_path, result_path = path / RUN_INFO_NAME, path / RESULT_NAME
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    result = json.loads(result_path.read_text()) if result_path.is_file() else None
    return RunData(path, config or {}, info, result, read_metrics(path / METRICS_NAME))


def is_finished(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run that trained to its last step."""
    try:
        result = json.loads((run_dir / RESULT_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(result, dict) and bool(result.get("finished"))
