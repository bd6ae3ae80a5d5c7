"""Checkpoints that survive crashes: exact resume, atomic files, refusals, failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dssn.config import load_config
from dssn.engine import checkpoint as ckpt
from dssn.engine import rundir
from dssn.engine.trainer import TrainingError, train
from dssn.method.supervised import Supervised

TINY = ["model.backbone=resnet18", "model.backbone_width=8", "model.decoder_channels=8", "data.crop_size=32",
        "data.num_workers=0", "train.batch_size=2", "train.batch_size_unlabeled=4", "train.eval_every=100",
        "train.log_every=1", "train.progress=false", "train.threads=1", "train.deterministic=true",
        "train.report=false", "diag.panels=0", "train.device=cpu", "train.precision=fp32"]


def overrides(data_root, run_dir, *extra):
    return [f"data.root={data_root}", f"run_dir={run_dir}", *TINY, *extra]


def tiny(data_root, run_dir, *extra):
    return load_config("synthetic", overrides(data_root, run_dir, *extra))


def weights(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    return torch.load(path, weights_only=True)["models"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert set(wa) == set(wb)
    for name in wa:
        assert wa[name].keys() == wb[name].keys()
        for key in wa[name]:
            assert torch.equal(wa[name][key], wb[name][key]), f"{name}.{key} differs"


@pytest.fixture(scope="module")
def straight(data_root, tmp_path_factory):
    """DSSN, 10 steps (an epoch is 7), one run without interruption."""
    run = tmp_path_factory.mktemp("straight") / "run"
    train(tiny(data_root, run, "train.iters=10", "train.checkpoint_every=3"))
    return run


def test_interrupted_and_resumed_run_is_bit_identical(data_root, straight, tmp_path):
    run = tmp_path / "run"
    # Stopped after step 4 as if killed: the last checkpoint is step 3, step 4 is lost.
    stopped = train(tiny(data_root, run, "train.iters=10", "train.checkpoint_every=3", "train.stop_after=4"))
    assert stopped.iters == 4 and stopped.final == {}
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 3
    # Same command again (stop_after is a runtime key): resumes mid-epoch 0, crosses the epoch end.
    result = train(tiny(data_root, run, "train.iters=10", "train.checkpoint_every=3"))
    assert result.iters == 10 and set(result.final) == {"student", "teacher"}
    assert_same_weights(straight / "last.pt", run / "last.pt")
    a, b = (torch.load(r / "last.pt", weights_only=True) for r in (straight, run))
    for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(x["momentum_buffer"], y["momentum_buffer"])
    # Every step logged exactly once: what the killed run logged after step 3 was dropped.
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, 11))
    # keep_last=2 step files; last.pt and best.pt beside them.
    assert [s for s, _ in ckpt.step_files(run)] == [9, 10]


def test_checkpoint_holds_the_whole_state_readable_weights_only(straight):
    state = torch.load(straight / "last.pt", weights_only=True)
    assert state["format"] == ckpt.FORMAT and state["step"] == 10 and state["epoch"] == 1
    assert set(state["models"]) == {"student", "teacher"} and state["optimizer"]["state"]
    assert set(state["rng"]) >= {"python", "numpy", "torch"} and state["data"]["batches_done"] == 3
    assert state["best_miou"] >= 0 and state["history"] and state["class_names"]
    ckpt.restore_rng_state(state["rng"])  # round trip
    assert torch.equal(ckpt.capture_rng_state()["torch"], state["rng"]["torch"])


def test_sigkill_at_any_moment_resumes_to_the_same_weights(data_root, straight, tmp_path):
    run = tmp_path / "run"
    args = overrides(data_root, run, "train.iters=10", "train.checkpoint_every=3")
    child = subprocess.Popen([sys.executable, "-m", "dssn", "train", "synthetic", *args],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # killed as soon as its first checkpoint exists: mid-step, maybe mid-write
        deadline = time.monotonic() + 60
        while not ckpt.step_files(run) and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    killed_at = max((s for s, _ in ckpt.step_files(run)), default=0)
    result = train(tiny(data_root, run, "train.iters=10", "train.checkpoint_every=3"))
    assert result.iters == 10 and killed_at < 10
    assert_same_weights(straight / "last.pt", run / "last.pt")


def test_partial_and_temporary_files_are_never_taken_for_checkpoints(data_root, tmp_path):
    run = tmp_path / "run"
    train(tiny(data_root, run, "method.name=supervised", "train.iters=6", "train.checkpoint_every=2",
               "train.stop_after=4"))
    # What a crash could leave: temporary files, and a last.pt cut short.
    (run / ".last.pt.k3j2h1.tmp").write_bytes(b"partial")
    (run / "checkpoints" / ".step-00000006.pt.x9y8.tmp").write_bytes(b"partial")
    data = (run / "last.pt").read_bytes()
    (run / "last.pt").unlink()  # a hard link to step-4: write a separate, truncated file
    (run / "last.pt").write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="unreadable"):
        path, state = ckpt.find_resume_checkpoint(run)
    assert path.name == "step-00000004.pt" and state["step"] == 4
    assert (run / "last.pt.unreadable").exists()
    result = train(tiny(data_root, run, "method.name=supervised", "train.iters=6", "train.checkpoint_every=2"))
    assert result.iters == 6 and not list(run.glob(".*.tmp")) and not list((run / "checkpoints").glob(".*.tmp"))
    ref = tmp_path / "ref"
    train(tiny(data_root, ref, "method.name=supervised", "train.iters=6", "train.checkpoint_every=2"))
    assert_same_weights(ref / "last.pt", run / "last.pt")


def test_unreadable_checkpoints_give_a_clear_error(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(ckpt.CheckpointError, match=r"(?s)none can be read.*last\.pt"):
        ckpt.find_resume_checkpoint(tmp_path)
    assert ckpt.find_resume_checkpoint(tmp_path / "empty") is None


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt.atomic_save({"step": 1}, path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(OSError):
        ckpt.atomic_save({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_different_config_is_refused_with_the_differing_keys(data_root, tmp_path):
    run = tmp_path / "run"
    train(tiny(data_root, run, "method.name=supervised", "train.iters=2", "train.lr=0.01"))
    with pytest.raises(TrainingError) as err:
        train(tiny(data_root, run, "method.name=supervised", "train.iters=3", "train.lr=0.05"))
    message = str(err.value)
    assert "train.lr: 0.01 in the run folder, 0.05 now" in message and "train.iters: 2" in message
    assert "train.resume=force" in message
    # Forced: the run goes on from step 2 under the new config; the old config is kept.
    result = train(tiny(data_root, run, "method.name=supervised", "train.iters=3", "train.lr=0.05",
                        "train.resume=force"))
    assert result.iters == 3 and (run / "config.before-step-2.yaml").is_file()
    with pytest.raises(TrainingError, match="train.resume=never"):
        train(tiny(data_root, run, "method.name=supervised", "train.iters=3", "train.lr=0.05",
                   "train.resume=never"))


def test_nan_loss_names_step_and_term_and_keeps_the_last_good_checkpoint(data_root, tmp_path, monkeypatch):
    original = Supervised.training_step

    def diverging(self, batch, step):
        losses = original(self, batch, step)
        if step == 2:  # the third step
            losses = {k: v * float("nan") for k, v in losses.items()}
        return losses

    monkeypatch.setattr(Supervised, "training_step", diverging)
    run = tmp_path / "run"
    with pytest.raises(TrainingError) as err:
        train(tiny(data_root, run, "method.name=supervised", "train.iters=6", "train.checkpoint_every=1",
                   "train.log_every=5"))
    message = str(err.value)
    assert "non-finite loss at step 3" in message and "'x' = nan" in message
    assert "last good checkpoint (step 2)" in message
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["step"] == 2
    assert all(torch.isfinite(v.float()).all() for v in state["models"]["student"].values())


def test_full_disk_and_unusable_folders_are_reported_before_training(data_root, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(TrainingError, match="cannot create run folder"):
        train(tiny(data_root, blocker / "run", "method.name=supervised"))

    class Usage:
        free = 1000

    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(TrainingError, match=r"not enough free space.*train.keep_last"):
        train(tiny(data_root, tmp_path / "run", "method.name=supervised"))
    assert not (tmp_path / "run" / "last.pt").exists()


def test_run_folder_detection(tmp_path, data_root):
    cfg = tiny(data_root, tmp_path / "run")
    other = cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": 0.5, "threads": 2})})
    assert rundir.config_diff(cfg, other) == [("train.lr", cfg.train.lr, 0.5)]  # threads is a runtime key
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("just: some yaml\n")
    with pytest.raises(TrainingError, match="holds no dssn run"):
        rundir.open_run_dir(cfg)


def _signal_during_step(monkeypatch, at_step: int | None, signum=signal.SIGTERM) -> list[int]:
    """Deliver ``signum`` to this process in the middle of optimizer step ``at_step`` (0-based; None:
    never). Returns the list the steps that run are appended to."""
    from dssn.engine import trainer as tr

    plain = tr.optimizer_step
    ran = []

    def step_with_signal(method, optimizer, micro_batches, step, *args, **kwargs):
        ran.append(step)
        if step == at_step:
            os.kill(os.getpid(), signum)  # its handler runs here, before the step's forward pass
        return plain(method, optimizer, micro_batches, step, *args, **kwargs)

    monkeypatch.setattr(tr, "optimizer_step", step_with_signal)
    return ran


def _train_steps_logged(run: Path) -> list[int]:
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [r["step"] for r in records if r["kind"] == "train"]


def test_sigterm_mid_epoch_stops_after_the_step_and_resumes_bit_identical(data_root, straight, tmp_path, monkeypatch):
    """SIGTERM during step 5 (epoch 0 has 7): the step finishes, a checkpoint of it is written, the
    command exits with its own status; the same command resumes to the uninterrupted run's weights."""
    from dssn.cli import main
    from dssn.errors import PREEMPTED_EXIT_STATUS

    run = tmp_path / "run"
    args = ["train", "synthetic", *overrides(data_root, run, "train.iters=10", "train.checkpoint_every=3")]
    first = _signal_during_step(monkeypatch, at_step=4)
    assert main(args) == PREEMPTED_EXIT_STATUS == 75
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["step"] == 5 and _train_steps_logged(run) == [1, 2, 3, 4, 5]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back
    monkeypatch.undo()
    second = _signal_during_step(monkeypatch, at_step=None)
    assert main(args) == 0
    assert (first, second) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9])  # steps lost: 0, none trained twice
    assert_same_weights(straight / "last.pt", run / "last.pt")
    assert _train_steps_logged(run) == list(range(1, 11))


def test_a_signal_during_the_save_leaves_the_previous_checkpoint_intact(data_root, straight, tmp_path, monkeypatch):
    """SIGTERM and then SIGUSR1 arrive while step 6's checkpoint is being written: the write finishes,
    step 3's checkpoint is untouched, no temporary file is left, and the run resumes exactly."""
    run = tmp_path / "run"
    cfg = tiny(data_root, run, "train.iters=10", "train.checkpoint_every=3")
    plain_save = torch.save
    before = {}

    def save_under_signals(obj, f):
        if isinstance(obj, dict) and obj.get("step") == 6:
            before.update(step3=(run / "checkpoints" / "step-00000003.pt").read_bytes())
            os.kill(os.getpid(), signal.SIGTERM)
            plain_save(obj, f)
            os.kill(os.getpid(), signal.SIGUSR1)
        else:
            plain_save(obj, f)

    monkeypatch.setattr(ckpt.torch, "save", save_under_signals)
    with pytest.raises(TrainingError, match=r"stopped by SIGTERM after step 6/10.*steps lost: 0"):
        train(cfg)
    monkeypatch.undo()
    assert (run / "checkpoints" / "step-00000003.pt").read_bytes() == before["step3"]
    assert [s for s, _ in ckpt.step_files(run)] == [3, 6] and not list(run.rglob("*.tmp"))
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 6
    resumed = _signal_during_step(monkeypatch, at_step=None)
    train(cfg)
    assert resumed == [6, 7, 8, 9]
    assert_same_weights(straight / "last.pt", run / "last.pt")


def test_requeue_calls_scontrol_after_the_checkpoint(data_root, tmp_path, monkeypatch):
    """train.requeue=true under SLURM: ``scontrol requeue $SLURM_JOB_ID`` once the checkpoint exists
    (a fake scontrol on PATH records its arguments and whether last.pt was there)."""
    from dssn.errors import TrainingPreempted

    run, bin_dir = tmp_path / "run", tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "scontrol"
    fake.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/called\n'
                    f'test -f {run}/last.pt && echo saved >> {tmp_path}/called\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    _signal_during_step(monkeypatch, at_step=1, signum=signal.SIGUSR1)
    with pytest.raises(TrainingPreempted, match="stopped by SIGUSR1 after step 2/4"):
        train(tiny(data_root, run, "method.name=supervised", "train.iters=4", "train.requeue=true"))
    assert (tmp_path / "called").read_text().split() == ["requeue", "4242", "saved"]


def test_sigterm_from_outside_gives_exit_status_75_and_a_checkpoint_of_the_last_step(data_root, tmp_path):
    """The real thing: `dssn train` in its own process, SIGTERM sent to it mid-run by another process."""
    run = tmp_path / "run"
    args = overrides(data_root, run, "method.name=supervised", "train.iters=500", "train.checkpoint_every=0")
    child = subprocess.Popen([sys.executable, "-m", "dssn", "train", "synthetic", *args],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while child.poll() is None and time.monotonic() < deadline:
            try:
                if len(_train_steps_logged(run)) >= 2:
                    break
            except (OSError, ValueError):  # not written yet, or a line being written
                pass
            time.sleep(0.01)
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 75, err[-2000:]
    step = torch.load(run / "last.pt", weights_only=True)["step"]
    assert 2 <= step < 500 and _train_steps_logged(run) == list(range(1, step + 1))  # steps lost: 0
    assert f"stopped by SIGTERM after step {step}/500" in err and "steps lost: 0" in err
