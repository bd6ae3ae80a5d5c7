"""The engine end to end on a tiny synthetic dataset: every method, files, checkpoints, errors."""

import json

import pytest
import torch

from dssn.cli import main
from dssn.config import load_config
from dssn.data import DataError
from dssn.engine.trainer import TrainingError, train


def tiny_overrides(data_root, run_dir, *extra):
    # A narrow DeepLabV3+ decoder; the DPT network has no such key (a key it does not read is refused).
    narrow = [] if "model.name=dpt" in extra else ["model.decoder_channels=16"]
    return [
        f"data.root={data_root}", f"run_dir={run_dir}", *narrow, "data.crop_size=32",
        "data.num_workers=0", "train.batch_size=2", "train.batch_size_unlabeled=2", "train.iters=3",
        "train.eval_every=1", "train.log_every=1", "train.progress=false", "train.threads=1", "train.report=false",
        "train.precision=fp32", *extra]  # fp32 pinned: tests compare float32 numbers on any CPU


def tiny(data_root, run_dir, *extra):
    return load_config("synthetic", tiny_overrides(data_root, run_dir, *extra))


@pytest.mark.parametrize("method", ["supervised", "fixmatch", "dssn"])
def test_every_method_trains_on_the_same_engine(data_root, tmp_path, method):
    result = train(tiny(data_root, tmp_path / "run", f"method.name={method}"))
    assert result.iters == 3
    expected = {"student", "teacher"} if method == "dssn" else {"student"}
    assert set(result.final) == expected
    for summary in result.final.values():
        assert 0 <= summary["miou"] <= 100 and len(summary["per_class"]) == 7
    run = tmp_path / "run"
    assert {"config.yaml", "metrics.jsonl", "last.pt", "best.pt", "tb"} <= {p.name for p in run.iterdir()}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3] and all("lr" in r and "loss" in r for r in train_rows)
    assert any(r["kind"] == "eval" for r in records)
    ckpt = torch.load(run / "last.pt", weights_only=True)  # nothing needs unpickling
    assert ckpt["step"] == 3 and set(ckpt["models"]) == expected
    assert ckpt["class_names"][0] == "background" and len(ckpt["palette"]) == 768


def test_poly_schedule_and_param_groups_in_a_run(data_root, tmp_path):
    result = train(tiny(data_root, tmp_path / "run", "method.name=supervised", "train.lr=0.1", "train.lr_multi=10",
                        "train.iters=4"))
    lrs = [json.loads(line)["lr"] for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
           if '"train"' in line]
    # lr logged after step k was the one used for iteration k-1: 0.1 * (1 - (k-1)/4) ** 0.9
    assert lrs == pytest.approx([0.1 * (1 - i / 4) ** 0.9 for i in range(4)])
    opt = torch.load(result.run_dir / "last.pt", weights_only=True)["optimizer"]
    assert [g["base_lr"] for g in opt["param_groups"]] == pytest.approx([0.1, 1.0])


def test_run_folder_is_never_overwritten(data_root, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(TrainingError, match="already exists"):
        train(tiny(data_root, run, "method.name=supervised"))
    assert (run / "notes.txt").read_text() == "mine"


def test_missing_data_root_names_the_path(tmp_path):
    cfg = load_config("pascal", [f"data.root={tmp_path / 'nowhere'}", f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(DataError, match=r"nowhere.*data\.root"):
        train(cfg)


def test_cli_train_and_eval(data_root, tmp_path, capsys):
    args = [f"data.root={data_root}", "model.decoder_channels=16", "data.crop_size=32", "data.num_workers=0",
            "train.batch_size=2", "train.batch_size_unlabeled=2", "train.iters=2", "train.progress=false", "train.threads=1"]
    assert main(["train", "synthetic", f"run_dir={tmp_path / 'run'}", *args]) == 0
    assert "teacher: mIoU" in capsys.readouterr().out
    out_json = tmp_path / "scores.json"
    assert main(["eval", str(tmp_path / "run" / "best.pt"), "--json", str(out_json)]) == 0
    scores = json.loads(out_json.read_text())
    assert set(scores) == {"student", "teacher"} and "star" in scores["student"]["per_class"]


def test_cli_reports_config_errors_without_traceback(capsys):
    assert main(["train", "synthetic", "train.lrr=0.1"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'train.lrr'" in err and "train.lr" in err and "Traceback" not in err


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_and_checkpoints_the_loss_scale(data_root, tmp_path, precision):
    run = tmp_path / "run"
    result = train(tiny(data_root, run, "method.name=dssn", "train.iters=2", f"train.precision={precision}"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 2 and all(0 < v < 100 for v in losses)
    assert 0 <= result.final["teacher"]["miou"] <= 100
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ("scaler" in ckpt) == (precision == "fp16")  # fp16's dynamic loss scale resumes with the run
    # The networks stay float32 (autocast computes in low precision, the weights are not cast).
    assert all(v.dtype == torch.float32 for v in ckpt["models"]["student"].values() if v.is_floating_point())


def test_compiled_student_trains(data_root, tmp_path):
    result = train(tiny(data_root, tmp_path / "run", "method.name=supervised", "train.iters=2", "train.compile=true",
                        "model.checkpoint_backbone=true"))
    assert result.iters == 2 and 0 <= result.final["student"]["miou"] <= 100
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert not any(k.startswith("_orig_mod") for k in ckpt["models"]["student"])  # the network's own names
