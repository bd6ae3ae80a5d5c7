"""Report, comparison and sweep, generated from tiny runs and hand-made run folders."""

import json
import re

import numpy as np
import pytest
import torch
import yaml

from dssn.apps.sweep import expand_grid, parse_sweep_args, plan_sweep, run_name, run_sweep
from dssn.apps.train import train
from dssn.cli import main
from dssn.config import load_config
from dssn.engine.trainer import TrainResult
from dssn.viz.compare import compare_runs
from dssn.viz.report import SECTIONS

TINY = ["model.backbone=resnet18", "model.backbone_width=8", "model.decoder_channels=8", "data.crop_size=32",
        "data.num_workers=0", "train.iters=3", "train.batch_size=2", "train.batch_size_unlabeled=2",
        "train.threads=1", "train.progress=false", "train.log_every=1"]


@pytest.fixture(scope="module")
def runs(data_root, tmp_path_factory):
    """A tiny dssn run and a tiny supervised run, each with its automatic report."""
    out = tmp_path_factory.mktemp("runs")
    results = {}
    for method in ("dssn", "supervised"):
        cfg = load_config("synthetic", [f"data.root={data_root}", f"run_dir={out / method}",
                                        f"method.name={method}", *TINY])
        results[method] = train(cfg)
    return out, results


def test_tiny_run_logs_diagnostics_panels_and_result(runs):
    out, _ = runs
    run = out / "dssn"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    diag = [r for r in records if r["kind"] == "diag"]
    assert [r["step"] for r in diag] == [1, 2, 3]  # every log step (log_every=1)
    names = ["background", "disc", "square", "triangle", "cross", "ring", "star"]
    for key in ("selected", "cplg_threshold", "selected_cum"):
        assert list(diag[-1][key]) == names
    assert set(diag[-1]["counts"]) == {"pseudo", "cplg", "fixed"}
    assert set(diag[-1]["similarity"]) == {"img_pos", "img_rand", "feat_pos", "feat_rand"}
    assert {"agreement", "teacher_distance", "share"} <= set(diag[-1])
    assert sum(diag[-1]["share"].values()) == pytest.approx(1.0)
    # CPLG-vs-fixed counts accumulate over the log steps
    for cls in names:
        assert diag[-1]["counts"]["pseudo"][cls] >= diag[0]["counts"]["pseudo"][cls]
    train_rows = [r for r in records if r["kind"] == "train"]
    assert all(r["img_s"] > 0 and "lr_head" in r for r in train_rows)
    assert train_rows[-1]["lr_head"] == pytest.approx(train_rows[-1]["lr"])  # the synthetic preset: lr_multi 1
    assert any(r["kind"] == "timing" for r in records)
    result = json.loads((run / "result.json").read_text())
    assert result["finished"] and result["iters"] == 3 and result["images_per_s"] > 0
    panels = np.load(run / "panels" / "latest.npz")
    assert panels["val_image"].shape[0] == 4 and panels["unl_image"].shape[0] == 4
    assert {"val_pred__student", "val_pred__teacher", "unl_selected"} <= set(panels.files)
    assert list((run / "tb").glob("events.out.tfevents.*"))


def test_report_has_every_section(runs):
    out, _ = runs
    for method in ("dssn", "supervised"):
        html = (out / method / "report.html").read_text()
        for section in SECTIONS:
            assert f'id="{section}"' in html, (method, section)
        # self-contained: every plot embedded, nothing fetched
        assert 'src="http' not in html and "<link" not in html
        images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
        assert len(images) >= (8 if method == "dssn" else 7)  # supervised: no CPLG-vs-fixed plot
        assert "background" in html and "star" in html  # class names in the tables and plots
    html = (out / "dssn" / "report.html").read_text()
    assert "CPLG px" in html and "fixed 0.95 px" in html  # the per-class CPLG-vs-fixed table
    assert "images / s" in html and "time per epoch" in html


def test_report_command_rebuilds_it(runs, tmp_path, capsys):
    out, _ = runs
    target = tmp_path / "r.html"
    assert main(["report", str(out / "dssn"), "--out", str(target)]) == 0
    assert 'id="cplg-vs-fixed"' in target.read_text()
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_compare_tiny_runs(runs, tmp_path, capsys):
    out, _ = runs
    assert main(["compare", str(out / "dssn"), str(out / "supervised"), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "dssn" in printed and "supervised" in printed and "mIoU" in printed
    assert {"compare.md", "compare.csv", "compare.png"} <= {p.name for p in tmp_path.iterdir()}
    md = (tmp_path / "compare.md").read_text()
    assert "| run | method | mIoU | background |" in md
    # a folder of runs expands into them
    comparison = compare_runs([out], tmp_path / "all", quiet=True)
    assert [r.label for r in comparison.runs] == ["dssn", "supervised"]


def write_run(path, method, per_class, miou=None, teacher=None, cfg_extra=None):
    """A hand-made finished run folder: config.yaml, run_info.json and result.json."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"name": "hand", "method": {"name": method, **(cfg_extra or {})}, "data": {"num_classes": len(per_class)}}
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    names = list(per_class)
    (path / "run_info.json").write_text(json.dumps({"method": method, "class_names": names}))
    def mean(scores):
        present = [v for v in scores.values() if v is not None]
        return sum(present) / len(present)

    final = {"student": {"miou": mean(per_class) if miou is None else miou, "per_class": per_class}}
    if teacher:
        final["teacher"] = {"miou": mean(teacher), "per_class": teacher}
    (path / "result.json").write_text(json.dumps({"finished": True, "final": final}))
    return path


def test_compare_highlights_the_right_winner(tmp_path, capsys):
    a = write_run(tmp_path / "dssn", "dssn", {"background": 90.0, "cat": 40.0, "dog": 30.0, "cow": None})
    b = write_run(tmp_path / "fixmatch", "fixmatch", {"background": 92.0, "cat": 35.0, "dog": 30.0, "cow": None})
    c = write_run(tmp_path / "supervised", "supervised", {"background": 85.0, "cat": 41.0, "dog": 30.02, "cow": None})
    comparison = compare_runs([a, b, c], tmp_path / "out", quiet=True)
    assert comparison.winners == {"background": ["fixmatch"], "cat": ["supervised"], "dog": [], "cow": []}
    assert comparison.wins == {"dssn": [], "fixmatch": ["background"], "supervised": ["cat"]}
    md = (tmp_path / "out" / "compare.md").read_text()
    assert "| dssn | dssn | **53.33** | 90.0 | 40.0 | 30.0 | - | - |" in md  # the best mIoU in bold
    assert "| fixmatch | fixmatch | 52.33 | **92.0** | 35.0 | 30.0 | - | background |" in md
    assert "**supervised** wins 1 class(es): cat" in md
    csv_rows = (tmp_path / "out" / "compare.csv").read_text().splitlines()
    assert csv_rows[0].startswith("run,path,method,model,miou,background,cat,dog,cow,classes_won")
    assert csv_rows[3].endswith(",cat")
    # the teacher's scores where a run has one
    d = write_run(tmp_path / "t", "dssn", {"background": 1.0, "cat": 1.0, "dog": 1.0, "cow": None},
                  teacher={"background": 99.0, "cat": 99.0, "dog": 99.0, "cow": None})
    best = compare_runs([a, d], quiet=True, model="best")
    assert best.runs[1].model == "teacher" and best.wins["t"] == ["background", "cat", "dog"]
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "cli")]) == 0
    table = capsys.readouterr().out
    assert re.search(r"^fixmatch\s.*92\.0\*", table, re.M)  # the console marks the winner with *
    assert (tmp_path / "cli" / "compare.png").stat().st_size > 1000


def test_sweep_grid_parsing():
    axes, fixed = parse_sweep_args(["method.tau_low=0.85,0.9,0.95", "method.ratio=0.9,0.96", "train.iters=5",
                                    "model.dilations=[6,12,18]"])
    assert axes == {"method.tau_low": ["0.85", "0.9", "0.95"], "method.ratio": ["0.9", "0.96"]}
    assert fixed == ["train.iters=5", "model.dilations=[6,12,18]"]
    grid = expand_grid(axes)
    assert len(grid) == 6 and grid[0] == {"method.tau_low": "0.85", "method.ratio": "0.9"}
    assert grid[1] == {"method.tau_low": "0.85", "method.ratio": "0.96"}
    assert run_name(grid[1]) == "tau_low-0.85_ratio-0.96"
    assert run_name({"train.lr": "0.1", "x.lr": "2"}) == "train.lr-0.1_x.lr-2"  # ambiguous short keys
    from dssn.config import ConfigError

    with pytest.raises(ConfigError, match="nothing to sweep"):
        plan_sweep("synthetic", ["train.iters=5"])
    with pytest.raises(ConfigError, match="unknown key 'method.tau_lo'"):
        plan_sweep("synthetic", ["method.tau_lo=0.1,0.2"])  # every point is checked before training


def test_sweep_skips_finished_runs_and_compares(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_train(cfg):  # writes what a finished run leaves behind
        run_dir = tmp_path / "sweep" / cfg.run_dir.split("/")[-1]
        calls.append(run_dir.name)
        miou = 100 * cfg.method.tau_low * cfg.method.ratio
        write_run(run_dir, "dssn", {"background": miou, "disc": miou / 2},
                  cfg_extra={"tau_low": cfg.method.tau_low, "ratio": cfg.method.ratio})
        return TrainResult(run_dir, {"student": {"miou": miou, "per_class": {}}}, miou, 3, 0.0)

    monkeypatch.setattr("dssn.apps.sweep.train", fake_train)
    out = tmp_path / "sweep"
    # One point is already finished: it is skipped. One was interrupted (no finished result): it runs.
    write_run(out / "tau_low-0.5_ratio-0.8", "dssn", {"background": 40.0, "disc": 20.0},
              cfg_extra={"tau_low": 0.5, "ratio": 0.8})
    (out / "tau_low-0.9_ratio-0.8").mkdir()
    (out / "tau_low-0.9_ratio-0.8" / "config.yaml").write_text("name: interrupted\n")
    results = run_sweep("synthetic", ["method.tau_low=0.5,0.9", "method.ratio=0.8,0.96", "train.iters=3"], out)
    assert calls == ["tau_low-0.5_ratio-0.96", "tau_low-0.9_ratio-0.8", "tau_low-0.9_ratio-0.96"]
    assert [r.status for r in results] == ["skipped", "trained", "trained", "trained"]
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["axes"] == {"method.tau_low": ["0.5", "0.9"], "method.ratio": ["0.8", "0.96"]}
    assert {"compare.md", "compare.csv", "compare.png", "sweep.png"} <= {p.name for p in out.iterdir()}
    assert "best: tau_low=0.9 ratio=0.96" in capsys.readouterr().out
    # Run again: everything is finished, nothing trains.
    calls.clear()
    again = run_sweep("synthetic", ["method.tau_low=0.5,0.9", "method.ratio=0.8,0.96", "train.iters=3"], out)
    assert calls == [] and all(r.status == "skipped" for r in again)
    # The swept values are the comparison's axes; mIoU is plotted against them.
    comparison = compare_runs([out], quiet=True)
    assert comparison.swept == ["method.tau_low", "method.ratio"]
    assert comparison.best().label == "tau_low=0.9 ratio=0.96"
    # Another grid in the same folder is refused.
    from dssn.errors import DssnError

    with pytest.raises(DssnError, match="holds a sweep over"):
        run_sweep("synthetic", ["method.lambda_c=0.1,0.2"], out)


def test_diagnostics_do_not_change_training(runs, data_root, tmp_path):
    out, results = runs
    cfg = load_config("synthetic", [f"data.root={data_root}", f"run_dir={tmp_path / 'plain'}", "method.name=dssn",
                                    *TINY, "diag.enabled=false", "diag.panels=0", "train.report=false"])
    plain = train(cfg)
    assert plain.final == results["dssn"].final
    a = torch.load(out / "dssn" / "last.pt", weights_only=True)["models"]
    b = torch.load(tmp_path / "plain" / "last.pt", weights_only=True)["models"]
    for name in a:
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name])
    assert not (tmp_path / "plain" / "report.html").exists()
    records = [json.loads(line) for line in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    assert not any(r["kind"] == "diag" and "counts" in r for r in records)


def test_compare_pairs_a_demos_runs_by_seed(tmp_path, capsys):
    """Supervised and DSSN on seeds 0 to 2 (DSSN minus supervised: +2, -1, +5: mean 2, standard error
    sqrt(3)); a FixMatch run of seed 1 only. A sweep, or two runs of one method and seed, pairs nothing."""
    scores = {("supervised", 0): 55.0, ("dssn", 0): 57.0, ("supervised", 1): 56.5, ("dssn", 1): 55.5,
              ("supervised", 2): 54.25, ("dssn", 2): 59.25, ("fixmatch", 1): 57.0}
    for (method, seed), miou in scores.items():
        run = write_run(tmp_path / "demo" / f"{method}-seed{seed}", method, {"background": miou, "cat": miou})
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        (run / "config.yaml").write_text(yaml.safe_dump({**cfg, "train": {"seed": seed}}))
    comparison = compare_runs([tmp_path / "demo"], tmp_path / "out")
    assert comparison.paired["dssn"]["seeds"] == [0, 1, 2]
    assert comparison.paired["dssn"]["mean"] == pytest.approx(2.0)
    assert comparison.paired["dssn"]["std_error"] == pytest.approx(3 ** 0.5)
    assert comparison.paired["fixmatch"]["differences"] == pytest.approx([0.5])
    assert comparison.paired["fixmatch"]["std_error"] is None
    printed = capsys.readouterr().out
    assert "dssn minus supervised, student mIoU paired by seed over 3 seeds: mean +2.00 points, " \
           "standard error 1.73" in printed
    md = (tmp_path / "out" / "compare.md").read_text()
    assert "| dssn - supervised | +2.00 | -1.00 | +5.00 | +2.00 | 1.73 |" in md
    assert "| fixmatch - supervised | - | +0.50 | - | +0.50 | - |" in md  # seed 1 only
    twice = write_run(tmp_path / "again", "dssn", {"background": 1.0, "cat": 1.0})
    (twice / "config.yaml").write_text(yaml.safe_dump({"method": {"name": "dssn"}, "train": {"seed": 0}}))
    assert compare_runs([tmp_path / "demo", twice], quiet=True).paired == {}
    assert compare_runs([tmp_path / "demo"], quiet=True, against=["train.seed"]).paired == {}
