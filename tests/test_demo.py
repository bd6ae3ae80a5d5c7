"""The demo's comparison over seeds: paired differences and their standard error against hand-computed
values, and what ``run_demo`` writes (training replaced by fixed scores)."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from dssn.apps import demo
from dssn.apps.demo import run_demo
from dssn.errors import TrainingError
from dssn.viz.paired import paired_by_seed, paired_difference, signed

# Student mIoU by (method, seed). DSSN minus supervised: +2, -1, +5 -> mean 2; deviations 0, -3, 3,
# sample variance (0 + 9 + 9) / 2 = 9, standard deviation 3, standard error 3 / sqrt(3) = sqrt(3).
SCORES = {("supervised", 0): 55.0, ("dssn", 0): 57.0, ("supervised", 1): 56.5, ("dssn", 1): 55.5,
          ("supervised", 2): 54.25, ("dssn", 2): 59.25, ("fixmatch", 0): 54.0, ("fixmatch", 2): 55.0}


def test_paired_difference_by_hand():
    d = paired_difference([57.0, 55.5, 59.25], [55.0, 56.5, 54.25])
    assert d.differences == pytest.approx([2.0, -1.0, 5.0])
    assert d.mean == pytest.approx(2.0)
    assert d.std_error == pytest.approx(math.sqrt(3))
    one = paired_difference([60.0], [57.5])
    assert one.mean == pytest.approx(2.5) and one.std_error is None
    assert paired_difference([1.0, 2.0], [1.0, 2.0]).std_error == 0.0
    with pytest.raises(ValueError, match="equally long"):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="non-empty"):
        paired_difference([], [])
    assert (signed(2.0), signed(-0.404), signed(0.0)) == ("+2.00", "-0.40", "+0.00")


def rows(order=SCORES):
    return [{"method": m, "seed": s, "miou": v} for (m, s), v in order.items()]


def test_paired_by_seed_pairs_the_same_seed():
    paired = paired_by_seed(rows())
    assert list(paired) == ["dssn", "fixmatch"]
    assert paired["dssn"]["seeds"] == [0, 1, 2]
    assert paired["dssn"]["differences"] == pytest.approx([2.0, -1.0, 5.0])
    assert paired["dssn"]["mean"] == pytest.approx(2.0)
    assert paired["dssn"]["std_error"] == pytest.approx(math.sqrt(3))
    # fixmatch ran seeds 0 and 2 only: -1 and +0.75, mean -0.125, std 1.75 / sqrt(2), error 1.75 / 2
    assert paired["fixmatch"]["seeds"] == [0, 2]
    assert paired["fixmatch"]["differences"] == pytest.approx([-1.0, 0.75])
    assert paired["fixmatch"]["std_error"] == pytest.approx(0.875)
    # the order rows come in does not matter; without the baseline there is nothing to pair
    backwards = paired_by_seed(list(reversed(rows())))["dssn"]
    assert backwards["seeds"] == [2, 1, 0] and backwards["differences"] == pytest.approx([5.0, -1.0, 2.0])
    assert (backwards["mean"], backwards["std_error"]) == pytest.approx((2.0, math.sqrt(3)))
    assert paired_by_seed([r for r in rows() if r["method"] != "supervised"]) == {}


def test_run_demo_writes_the_paired_comparison(tmp_path, monkeypatch, capsys):
    def fake_train(cfg):
        score = SCORES[cfg.method.name, cfg.train.seed]
        final = {"student": {"miou": score, "per_class": {"background": score}}}
        return SimpleNamespace(final=final, wall_time=1.0, iters=cfg.train.iters, run_dir=Path(cfg.run_dir))

    monkeypatch.setattr(demo, "train", fake_train)
    monkeypatch.setattr(demo, "dataset_spec", lambda name: SimpleNamespace(resolve_root=lambda root, progress: root))
    monkeypatch.setattr(demo, "compare_runs", lambda paths, out: None)
    out = tmp_path / "demo"
    run_demo(out, seeds=[0, 1, 2], iters=2, data_root=tmp_path / "data", methods=["supervised", "dssn"])
    results = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["seed"]) for r in results["runs"]] == [
        ("supervised", 0), ("dssn", 0), ("supervised", 1), ("dssn", 1), ("supervised", 2), ("dssn", 2)]
    assert results["paired"]["dssn"]["mean"] == pytest.approx(2.0)
    assert results["paired"]["dssn"]["std_error"] == pytest.approx(math.sqrt(3))
    text = (out / "results.md").read_text()
    assert "| dssn - supervised | +2.00 | -1.00 | +5.00 | +2.00 | 1.73 |" in text
    assert "mean +2.00 points, standard error 1.73" in text
    assert "mean +2.00 points, standard error 1.73" in capsys.readouterr().out


def test_one_seed_says_there_is_no_standard_error(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "train", lambda cfg: SimpleNamespace(
        final={"student": {"miou": SCORES[cfg.method.name, 0], "per_class": {"background": 1.0}}},
        wall_time=1.0, iters=2, run_dir=Path(cfg.run_dir)))
    monkeypatch.setattr(demo, "dataset_spec", lambda name: SimpleNamespace(resolve_root=lambda root, progress: root))
    monkeypatch.setattr(demo, "compare_runs", lambda paths, out: None)
    run_demo(tmp_path / "demo", seeds=[0], iters=2, data_root=tmp_path / "data")
    text = (tmp_path / "demo" / "results.md").read_text()
    assert "| dssn - supervised | +2.00 | +2.00 | - |" in text
    assert "over 1 seed: mean +2.00 points, no standard error from one seed" in text


def test_the_task_names_the_preset_and_the_data_folder(tmp_path, monkeypatch):
    """Each generated dataset is a demo task; its preset trains every run, on data/<task> unless --data says."""
    assert {"glyphs", "synthetic"} <= set(demo.demo_tasks()) and "pascal" not in demo.demo_tasks()
    roots, presets = [], []
    monkeypatch.setattr(demo, "dataset_spec", lambda name: SimpleNamespace(
        resolve_root=lambda root, progress: roots.append((name, root)) or root))
    monkeypatch.setattr(demo, "train", lambda cfg: presets.append((cfg.name, cfg.data.root)) or SimpleNamespace(
        final={"student": {"miou": 1.0, "per_class": {"background": 1.0}}}, wall_time=1.0, iters=2,
        run_dir=Path(cfg.run_dir)))
    monkeypatch.setattr(demo, "compare_runs", lambda paths, out: None)
    monkeypatch.chdir(tmp_path)
    run_demo(tmp_path / "a", seeds=[0], iters=2, methods=["supervised"])
    run_demo(tmp_path / "b", seeds=[0], iters=2, methods=["supervised"], task="synthetic", data_root=tmp_path / "d")
    assert roots == [("glyphs", Path("data/glyphs")), ("synthetic", tmp_path / "d")]
    assert [name for name, _ in presets] == ["glyphs", "synthetic"]
    assert json.loads((tmp_path / "a" / "results.json").read_text())["task"] == "glyphs"
    with pytest.raises(TrainingError, match="unknown demo task 'pascal'"):
        run_demo(tmp_path / "c", task="pascal")


def test_a_stopped_demo_keeps_the_runs_that_finished(tmp_path, monkeypatch):
    """results.json and results.md are rewritten after every run, so Ctrl-C (or a crash) in the third
    run leaves the first two and their paired difference."""
    def fake_train(cfg):
        if cfg.train.seed == 1:
            raise KeyboardInterrupt
        score = SCORES[cfg.method.name, cfg.train.seed]
        final = {"student": {"miou": score, "per_class": {"background": score}}}
        return SimpleNamespace(final=final, wall_time=1.0, iters=cfg.train.iters, run_dir=Path(cfg.run_dir))

    monkeypatch.setattr(demo, "train", fake_train)
    monkeypatch.setattr(demo, "dataset_spec", lambda name: SimpleNamespace(resolve_root=lambda root, progress: root))
    out = tmp_path / "demo"
    with pytest.raises(KeyboardInterrupt):
        run_demo(out, seeds=[0, 1], iters=2, data_root=tmp_path / "data", methods=["supervised", "dssn"])
    results = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["seed"]) for r in results["runs"]] == [("supervised", 0), ("dssn", 0)]
    assert results["paired"]["dssn"]["mean"] == pytest.approx(SCORES["dssn", 0] - SCORES["supervised", 0])
    assert "| dssn |" in (out / "results.md").read_text()
