"""``dssn sweep CONFIG key=v1,v2,... [key=...]``: a grid of runs, one after another, resumable.

Every ``key=v1,v2,...`` argument is an axis of the grid; a ``key=value`` without a
comma (or a YAML list/mapping such as ``model.dilations=[6,12,18]``) applies to every
run. Each grid point is a normal run folder ``OUT/<key>-<value>_...`` (keys shortened
to their last part where that is unambiguous). ``OUT/sweep.json`` lists the grid.

Resumable: a run folder that holds a finished ``result.json`` is skipped; an
unfinished one is handed to ``train`` again, which resumes it from its last
checkpoint (``train.resume``). When the grid is done, ``dssn compare OUT`` runs on
it: the table, ``compare.png`` and ``sweep.png`` (mIoU against the swept values).
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dssn.apps.train import train
from dssn.config import ConfigError, load_config
from dssn.engine.rundir import RESULT_NAME, is_finished
from dssn.errors import DssnError, TrainingPreempted
from dssn.files import atomic_write_text
from dssn.viz.compare import compare_runs

SWEEP_FILE = "sweep.json"


@dataclass
class SweepPlan:
    config: str
    axes: dict[str, list[str]]
    fixed: list[str]
    points: list[dict[str, str]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)


@dataclass
class SweepRun:
    name: str
    params: dict[str, str]
    status: str  # "trained", "skipped" (already finished), "failed", "planned" (dry run)
    miou: float | None = None
    error: str | None = None


def parse_sweep_args(items: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Split ``key=v1,v2`` axes from plain ``key=value`` overrides (order kept)."""
    axes: dict[str, list[str]] = {}
    fixed: list[str] = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"sweep argument '{item}' is not of the form key=v1,v2,... or key=value")
        raw = raw.strip()
        if "," not in raw or raw[:1] in "[{":
            fixed.append(f"{key}={raw}")
            continue
        values = [v.strip() for v in raw.split(",")]
        if any(v == "" for v in values):
            raise ConfigError(f"sweep axis '{item}' has an empty value")
        if len(set(values)) < len(values):
            raise ConfigError(f"sweep axis '{item}' repeats a value")
        if key in axes:
            raise ConfigError(f"sweep axis '{key}' is given twice")
        axes[key] = values
    return axes, fixed


def expand_grid(axes: dict[str, list[str]]) -> list[dict[str, str]]:
    """Every combination, the first axis varying slowest."""
    keys = list(axes)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(axes[k] for k in keys))]


def _short_keys(keys: list[str]) -> dict[str, str]:
    last = [k.split(".")[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def run_name(point: dict[str, str]) -> str:
    """Folder name of a grid point, e.g. ``tau_low-0.9_ratio-0.96``."""
    short = _short_keys(list(point))
    parts = [f"{short[k]}-{v}" for k, v in point.items()]
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", "_".join(parts))


def plan_sweep(config: str, items: list[str]) -> SweepPlan:
    """Parse and validate the whole grid before anything trains (a typo fails at once)."""
    axes, fixed = parse_sweep_args(items)
    if not axes:
        raise ConfigError("nothing to sweep: give at least one axis as key=v1,v2,... "
                          "(e.g. method.tau_low=0.85,0.9,0.95)")
    for key in axes:
        if key in ("run_dir", "name"):
            raise ConfigError(f"'{key}' cannot be swept: each run's folder is chosen by the sweep")
    plan = SweepPlan(config, axes, fixed, expand_grid(axes))
    plan.names = [run_name(p) for p in plan.points]
    for point in plan.points:
        load_config(config, [*fixed, *(f"{k}={v}" for k, v in point.items())])
    return plan


def _write_sweep_file(out: Path, plan: SweepPlan) -> None:
    path = out / SWEEP_FILE
    runs = [{"name": n, "params": p} for n, p in zip(plan.names, plan.points)]
    data: dict[str, Any] = {"config": plan.config, "axes": plan.axes, "fixed": plan.fixed, "runs": runs}
    if path.is_file():
        old = json.loads(path.read_text())
        if list(old.get("axes", {})) != list(plan.axes):
            raise DssnError(f"{out} holds a sweep over {', '.join(old.get('axes', {}))}, not "
                            f"{', '.join(plan.axes)}; choose another --out")
        if old.get("config") != plan.config or old.get("fixed") != plan.fixed:
            raise DssnError(f"{out} holds a sweep of '{old.get('config')}' with {old.get('fixed') or 'no'} fixed "
                            "overrides; the same folder only continues the same sweep: choose another --out")
        # The same sweep grown by more values: keep the earlier runs in the listing too.
        known = {r["name"] for r in runs}
        runs += [r for r in old.get("runs", []) if r["name"] not in known]
        for key, values in old["axes"].items():
            data["axes"][key] = list(dict.fromkeys([*values, *plan.axes[key]]))
        data["runs"] = runs
    atomic_write_text(path, json.dumps(data, indent=2))


def default_out(config: str, fixed: list[str]) -> Path:
    cfg = load_config(config, fixed)
    return Path("runs") / f"sweep-{cfg.name}-{cfg.method.name}"


def run_sweep(config: str, items: list[str], out: str | Path | None = None, dry_run: bool = False,
              compare: bool = True) -> list[SweepRun]:
    """Train every grid point not finished yet, one after another; then compare them all."""
    plan = plan_sweep(config, items)
    out = Path(out) if out else default_out(config, plan.fixed)
    total = len(plan.points)
    print(f"sweep of {config}: {total} run(s) over {', '.join(f'{k} ({len(v)})' for k, v in plan.axes.items())} "
          f"in {out}")
    results: list[SweepRun] = []
    if dry_run:
        for i, (name, point) in enumerate(zip(plan.names, plan.points), 1):
            state = "finished" if is_finished(out / name) else "to run"
            print(f"  [{i}/{total}] {name}: {state}")
            results.append(SweepRun(name, point, "planned"))
        return results
    _write_sweep_file(out, plan)
    for i, (name, point) in enumerate(zip(plan.names, plan.points), 1):
        run_dir = out / name
        if is_finished(run_dir):
            print(f"[{i}/{total}] {name}: already finished, skipped")
            results.append(SweepRun(name, point, "skipped", _final_miou(run_dir)))
            continue
        print(f"\n[{i}/{total}] {name}: {' '.join(f'{k}={v}' for k, v in point.items())}")
        cfg = load_config(config, [*plan.fixed, *(f"{k}={v}" for k, v in point.items()), f"run_dir={run_dir}"])
        try:
            result = train(cfg)
        except TrainingPreempted:  # the job is being stopped: stop the grid too (it resumes where it was)
            raise
        except DssnError as err:  # one failed point does not stop the grid
            print(f"[{i}/{total}] {name} failed: {err}")
            results.append(SweepRun(name, point, "failed", error=str(err)))
            continue
        miou = result.final.get("student", {}).get("miou")
        results.append(SweepRun(name, point, "trained", miou))
    done = [r for r in results if r.status != "failed"]
    if compare and done:
        print()
        compare_runs([out], out)
    failed = [r for r in results if r.status == "failed"]
    if failed:
        print(f"\n{len(failed)} run(s) failed: {', '.join(r.name for r in failed)}; run the same command again "
              "to retry them (finished runs are skipped)")
    return results


def _final_miou(run_dir: Path) -> float | None:
    try:
        result = json.loads((run_dir / RESULT_NAME).read_text())
        return result["final"]["student"]["miou"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        return None
