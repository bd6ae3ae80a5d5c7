"""The teacher's batch-norm schedule: ``released`` is ``batch`` in epoch 0 and ``running`` after,
checked against the two whole-run modes on the same batches, in a real run, and across resumes."""

from __future__ import annotations

import copy

import pytest
import torch

from dssn.config import load_config
from dssn.engine.trainer import train
from dssn.method.dssn import DSSN
from test_checkpoints import tiny
from test_methods import make_batch, make_method

ITERS_PER_EPOCH = 10  # make_method's
RELEASED = "method.teacher_bn=released"  # whatever the synthetic preset keeps


def step_outcome(mode: str, step: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Losses and the teacher's state after one step (and its EMA update) in ``mode``."""
    method, _ = make_method(f"method.teacher_bn={mode}")
    torch.manual_seed(1)  # the feature dropout draws the same masks in every mode
    losses = method.training_step(make_batch(), step)
    method.after_optimizer_step(step)
    return losses, copy.deepcopy(method.teacher.state_dict())


@pytest.mark.parametrize("step, same_as", [(1, "batch"), (ITERS_PER_EPOCH - 1, "batch"),
                                           (ITERS_PER_EPOCH, "running"), (3 * ITERS_PER_EPOCH + 2, "running")])
def test_released_equals_batch_in_epoch_0_and_running_after(step, same_as):
    released_losses, released_teacher = step_outcome("released", step)
    expected_losses, expected_teacher = step_outcome(same_as, step)
    other = "running" if same_as == "batch" else "batch"
    other_losses, _ = step_outcome(other, step)
    for name, value in expected_losses.items():
        assert torch.equal(released_losses[name], value), name
    for key, value in expected_teacher.items():
        assert torch.equal(released_teacher[key], value), key
    # The two whole-run modes really differ here, so the equalities above can tell them apart.
    assert any(not torch.equal(released_losses[name], other_losses[name]) for name in other_losses)


def test_released_is_the_default_of_every_paper_preset():
    for preset in ("pascal", "cityscapes", "coco", "folder"):
        assert load_config(preset).method.teacher_bn == "released", preset


def bn_buffers(module: torch.nn.Module) -> list[torch.Tensor]:
    return [b.detach().clone() for name, b in module.named_buffers() if name.endswith(("running_mean", "running_var"))]


@pytest.fixture
def observed(monkeypatch):
    """For every DSSN step of the runs in the test: whether the step's own forward passes moved
    the teacher's BN running statistics, and whether the EMA alone explains them afterwards."""
    seen: list[tuple[int, bool, bool]] = []
    step_fn, ema_fn = DSSN.training_step, DSSN.after_optimizer_step

    def training_step(self, batch, step):
        before = bn_buffers(self.teacher)
        out = step_fn(self, batch, step)
        moved = any(not torch.equal(a, b) for a, b in zip(before, bn_buffers(self.teacher)))
        self._seen = (step, moved, bn_buffers(self.teacher), bn_buffers(self.student_net))
        return out

    def after_optimizer_step(self, step):
        ema_fn(self, step)
        step_seen, moved, teacher_before, student = self._seen
        a = 0.0 if step == 0 else self.cfg.ema_momentum
        explained = all(torch.allclose(t, a * t0 + (1 - a) * s, atol=1e-6)
                        for t, t0, s in zip(bn_buffers(self.teacher), teacher_before, student))
        seen.append((step_seen, moved, explained))

    monkeypatch.setattr(DSSN, "training_step", training_step)
    monkeypatch.setattr(DSSN, "after_optimizer_step", after_optimizer_step)
    return seen


def test_two_epoch_run_moves_teacher_statistics_only_through_the_ema_after_epoch_0(data_root, tmp_path, observed):
    result = train(tiny(data_root, tmp_path / "run", "train.iters=14", RELEASED))
    ipe = 7  # 30 unlabeled images in batches of 4
    assert result.iters == 2 * ipe and [s for s, _, _ in observed] == list(range(2 * ipe))
    for step, moved, explained in observed:
        assert moved == (step < ipe), f"step {step}: forward passes moved the statistics: {moved}"
        assert explained, f"step {step}: the EMA does not account for the teacher's statistics"


@pytest.mark.parametrize("stop_after, resumed_from", [(4, 3), (8, 7)])
def test_resumed_run_continues_in_the_right_mode(data_root, tmp_path, observed, stop_after, resumed_from):
    """Stopped in epoch 0 (last checkpoint step 3) or in epoch 1 (last checkpoint at the epoch end, 7)."""
    run = tmp_path / "run"
    args = ("train.iters=12", "train.checkpoint_every=3", RELEASED)
    train(tiny(data_root, run, *args, f"train.stop_after={stop_after}"))
    observed.clear()
    train(tiny(data_root, run, *args))
    assert [s for s, _, _ in observed] == list(range(resumed_from, 12))
    for step, moved, _ in observed:
        assert moved == (step < 7), f"resumed step {step}: forward passes moved the statistics: {moved}"
