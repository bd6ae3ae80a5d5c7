"""Reading a run folder back: config, logged records, run info and final result."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dssn.errors import DssnError


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
        from dssn.data.synthetic import voc_palette

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
    cfg_path = path / "config.yaml"
    if not cfg_path.is_file() and not (path / "metrics.jsonl").is_file():
        raise RunFolderError(f"'{path}' is not a run folder (no config.yaml or metrics.jsonl)")
    config = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else {}
    info_path, result_path = path / "run_info.json", path / "result.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    result = json.loads(result_path.read_text()) if result_path.is_file() else None
    return RunData(path, config or {}, info, result, read_metrics(path / "metrics.jsonl"))
