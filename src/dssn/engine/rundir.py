"""The run folder: start a new run, or resume the one already there, safely.

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
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from dssn.config import Config, ConfigError, build_config
from dssn.engine.checkpoint import find_resume_checkpoint, remove_stale_temporaries
from dssn.errors import TrainingError

CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.jsonl"

RUNTIME_KEYS = (
    "name", "run_dir",
    "train.progress", "train.log_every", "train.threads", "train.device", "train.report",
    "train.checkpoint_every", "train.keep_last", "train.resume", "train.stop_after", "train.eval_every",
    "train.channels_last", "train.compile", "model.checkpoint_backbone",
    "data.root", "data.num_workers", "eval.batch_size",
    "diag",  # a whole section: the diagnostics only read the step's tensors
)
"""Keys that may differ when a run is resumed: where things are, how it reports, how often it
saves or evaluates; none of them changes the weights a run ends with."""


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
    path = run_dir / CONFIG_NAME
    tmp = run_dir / f".{CONFIG_NAME}.tmp"
    try:
        tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
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
    tmp = path.with_name(f".{METRICS_NAME}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    os.replace(tmp, path)


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

