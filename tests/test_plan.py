"""The batch plan: a preset's global batch kept exactly on any number of processes."""

import json

import pytest

from dssn.config import load_config
from dssn.engine.plan import PlanError, apply_plan, plan_batches
from test_engine import tiny

# The papers' global batches (docs/method.md §9: batch per GPU x 4 GPUs), written out by hand.
PAPER_GLOBAL = {"pascal": (8, 8), "cityscapes": (4, 4), "coco": (8, 8), "pascal-dinov2": (16, 16),
                "cityscapes-dinov2": (8, 8), "ade20k-dinov2": (8, 8), "coco-dinov2": (16, 16)}


@pytest.mark.parametrize("preset", list(PAPER_GLOBAL))
@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_every_preset_keeps_its_papers_global_batch(preset, world):
    train = load_config(preset).train
    labeled, unlabeled = PAPER_GLOBAL[preset]
    if labeled % world:  # cityscapes on 8 GPUs: 4 images cannot be split over 8 processes
        with pytest.raises(PlanError, match=rf"cannot be split evenly over {world} process.*Run on 1, 2, 4 process"):
            plan_batches(train, world)
        return
    plan = plan_batches(train, world)
    assert (plan.global_labeled, plan.global_unlabeled) == (labeled, unlabeled)
    assert (plan.labeled, plan.unlabeled, plan.accumulate) == (labeled // world, unlabeled // world, 1)
    assert plan.line() == (f"{labeled // world} + {unlabeled // world} per GPU x {world} GPU{'s' * (world > 1)} "
                           f"x accumulate 1 = {labeled} + {unlabeled}")
    assert plan.lr_factor == 1.0 and plan.lr_note() is None


def test_the_issues_example_line():
    plan = plan_batches(load_config("pascal").train, 2)
    assert plan.line() == "4 + 4 per GPU x 2 GPUs x accumulate 1 = 8 + 8"
    assert plan.line("process") == "4 + 4 per process x 2 processes x accumulate 1 = 8 + 8"


def test_max_batch_per_gpu_accumulates_to_keep_the_global_batch():
    train = load_config("pascal-dinov2", ["train.max_batch_per_gpu=3"]).train
    one = plan_batches(train, 1)  # 16 + 16 on one GPU, at most 3: 2 + 2 x accumulate 8 (4 + 4 is too many)
    assert one.line() == "2 + 2 per GPU x 1 GPU x accumulate 8 = 16 + 16"
    assert plan_batches(train, 4).line() == "2 + 2 per GPU x 4 GPUs x accumulate 2 = 16 + 16"
    # Accumulation changes what batch norm sees: the plan says so (the release: SyncBN over the global batch).
    note = plan_batches(load_config("pascal", ["train.max_batch_per_gpu=2"]).train, 2).batch_norm_note("GPU", True)
    assert note == ("batch norm sees 4 + 4 images per pass (accumulation over 2 micro-batches; SyncBatchNorm over "
                    "2 GPUs), not the global 8 + 8")
    assert plan_batches(load_config("pascal").train, 4).batch_norm_note("GPU", True) is None
    assert "each process's own batch" in plan_batches(load_config("pascal").train, 2).batch_norm_note("process", False)
    with pytest.raises(PlanError, match="at most train.max_batch_per_gpu=1"):
        plan_batches(load_config("synthetic", ["train.max_batch_per_gpu=1", "train.global_batch=2",
                                               "train.global_batch_unlabeled=3"]).train, 1)


def test_uneven_global_batches_use_their_common_divisor():
    train = load_config("synthetic").train  # 8 + 4: gcd 4
    assert plan_batches(train, 4).line() == "2 + 1 per GPU x 4 GPUs x accumulate 1 = 8 + 4"
    with pytest.raises(PlanError, match=r"8 \+ 4 \(train.global_batch, train.global_batch_unlabeled\) cannot be "
                                        r"split evenly over 8 process.*Run on 1, 2, 4 process"):
        plan_batches(train, 8)
    # A method without unlabeled data splits the labeled batch alone.
    alone = plan_batches(train, 8, uses_unlabeled=False)
    assert alone.line() == "1 per GPU x 8 GPUs x accumulate 1 = 8" and alone.global_batch == (8, 0)


@pytest.mark.parametrize(("rule", "factor"), [("none", 1.0), ("linear", 0.5), ("sqrt", 0.5 ** 0.5)])
def test_a_hand_set_per_gpu_batch_is_honoured_with_the_lr_rule(rule, factor):
    cfg = load_config("pascal", ["train.batch_size=2", "train.batch_size_unlabeled=2", f"train.lr_scaling={rule}"])
    plan = plan_batches(cfg.train, 2)  # 2 + 2 on 2 GPUs = 4 + 4, half the paper's 8 + 8
    assert plan.line() == "2 + 2 per GPU x 2 GPUs x accumulate 1 = 4 + 4"
    assert plan.lr_factor == pytest.approx(factor)
    assert f"train.lr_scaling={rule}" in plan.lr_note() and "instead of the config's 8 + 8" in plan.lr_note()
    run = apply_plan(cfg, plan).train
    assert (run.batch_size, run.batch_size_unlabeled, run.lr) == (2, 2, pytest.approx(0.002 * factor))
    # Only the labeled batch set: the unlabeled one is still the global one's share.
    half = plan_batches(load_config("pascal", ["train.batch_size=1"]).train, 2)
    assert (half.labeled, half.unlabeled) == (1, 4)


def test_a_run_prints_and_records_its_plan(data_root, tmp_path, capsys):
    from dssn.engine.trainer import Trainer, train

    run = tmp_path / "run"
    cfg = tiny(data_root, run, "method.name=fixmatch", "train.batch_size=null", "train.batch_size_unlabeled=null",
               "train.global_batch=4", "train.global_batch_unlabeled=4", "train.max_batch_per_gpu=2",
               "train.iters=1")
    train(cfg)
    line = "2 + 2 per process x 1 process x accumulate 2 = 4 + 4"
    assert f"batch plan: {line}" in capsys.readouterr().err
    info = json.loads((run / "run_info.json").read_text())["batch_plan"]
    assert info["line"] == line and (info["global_labeled"], info["accumulate"]) == (4, 2)
    assert any("accumulation over 2 micro-batches" in n for n in info["notes"])
    (tmp_path / "run2").mkdir()
    trainer = Trainer(cfg, tmp_path / "run2")  # what the processes train with
    assert {loader.batch_size for loader in trainer.loaders} == {2} and trainer.cfg.train.accumulate == 2


def test_a_run_folder_from_before_the_plan_still_resumes(data_root, tmp_path):
    """A config.yaml and checkpoint written before the batch plan existed (per-process batch keys only)."""
    import torch
    import yaml

    from dssn.config import load_config as load
    from dssn.engine.trainer import train

    run = tmp_path / "run"
    common = ("method.name=supervised", "train.iters=4", "train.checkpoint_every=2")
    train(tiny(data_root, run, *common, "train.stop_after=2"))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    for key in ("global_batch", "global_batch_unlabeled", "max_batch_per_gpu", "lr_scaling", "allow_replan",
                "requeue"):
        del saved["train"][key]
    saved["train"]["stop_after"] = None  # the debugging stop of the first session
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    state = torch.load(run / "last.pt", weights_only=True)
    del state["data"]["global_batch"], state["plan"]
    (run / "last.pt").unlink()
    torch.save(state, run / "last.pt")
    result = train(load(str(run / "config.yaml")))
    assert result.iters == 4


def test_dssn_plan_prints_the_plan_for_each_number_of_processes(capsys):
    from dssn.cli import main

    assert main(["plan", "pascal-dinov2", "--processes", "1", "2", "8"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "  1: 16 + 16 per GPU x 1 GPU x accumulate 1 = 16 + 16",
        "  2: 8 + 8 per GPU x 2 GPUs x accumulate 1 = 16 + 16",
        "  8: 2 + 2 per GPU x 8 GPUs x accumulate 1 = 16 + 16"]
    assert main(["plan", "cityscapes", "--processes", "8"]) == 2
    assert "cannot be split evenly over 8 process" in capsys.readouterr().out


def test_a_stopped_run_stops_the_sweep(tmp_path, monkeypatch):
    """SIGTERM stops the grid at its current run (the next `dssn sweep` resumes it), not just that run."""
    from dssn.apps import sweep
    from dssn.errors import TrainingPreempted

    calls = []

    def stopped(cfg):
        calls.append(cfg.run_dir)
        raise TrainingPreempted("stopped by SIGTERM after step 1/3")

    monkeypatch.setattr(sweep, "train", stopped)
    with pytest.raises(TrainingPreempted):
        sweep.run_sweep("synthetic", ["train.lr=0.1,0.2"], tmp_path / "out", compare=False)
    assert len(calls) == 1


def test_another_number_of_processes_that_keeps_the_global_batch_resumes(data_root, tmp_path, capsys):
    """A run planned from the global batch, checkpointed by 2 processes (2 + 2 each), goes on in one
    (4 + 4): same global batch, so it is accepted, and the log says what differs."""
    import torch

    from dssn.engine.trainer import train

    run = tmp_path / "run"
    common = ("method.name=fixmatch", "train.batch_size=null", "train.batch_size_unlabeled=null",
              "train.global_batch=4", "train.global_batch_unlabeled=4", "train.iters=4", "train.checkpoint_every=2")
    train(tiny(data_root, run, *common, "train.stop_after=2"))
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["data"]["global_batch"] == [4, 4] and state["plan"]["world_size"] == 1
    state["data"]["world_size"] = 2  # as if two processes of 2 + 2 had written it
    (run / "last.pt").unlink()
    torch.save(state, run / "last.pt")
    capsys.readouterr()
    assert train(tiny(data_root, run, *common)).iters == 4
    err = capsys.readouterr().err
    assert "resumed by 1 process(es) instead of 2: global batch 4 + 4 per step as before" in err
    assert "batch plan: 4 + 4 per process x 1 process x accumulate 1 = 4 + 4" in err
