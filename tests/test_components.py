"""The DSSN building blocks against hand-computed values (docs/method.md §3, §4)."""

import math

import pytest
import torch
from torch import nn

import dssn
import dssn.method.components
from dssn.method.components import (
    cplg_mask,
    cutmix,
    masked_unlabeled_ce,
    ohem_ce,
    poly_lr,
    threshold_mask,
)


def logits_from_probs(probs):
    """[B, H, W, C] probabilities -> [B, C, H, W] logits whose softmax gives them back."""
    return torch.tensor(probs, dtype=torch.float64).log().permute(0, 3, 1, 2)


# Image 0: class 0 peaks at 0.95 (threshold 0.912); class 1 peaks at 0.89 <= tau_low: selects nothing.
# Image 1: class 0 peaks at 0.93 (threshold 0.8928), so 0.90 passes here but would fail image 0's threshold.
PROBS = [
    [[[0.95, 0.03, 0.02], [0.93, 0.05, 0.02], [0.10, 0.89, 0.01]]],
    [[[0.93, 0.05, 0.02], [0.90, 0.05, 0.05], [0.02, 0.02, 0.96]]],
]


def test_cplg_hand_computed():
    mask = dssn.cplg_mask(logits_from_probs(PROBS), tau_low=0.92, ratio=0.96)
    assert mask.dtype == torch.bool and mask.shape == (2, 1, 3)
    assert mask.tolist() == [[[True, True, False]], [[True, True, True]]]


def test_cplg_scope_is_per_image():
    # Image 1 alone gives the same answer as in the batch: thresholds are not shared across images.
    batch = dssn.cplg_mask(logits_from_probs(PROBS))
    alone = dssn.cplg_mask(logits_from_probs(PROBS[1:]))
    assert torch.equal(batch[1:], alone)
    assert alone[0, 0, 1]  # 0.90 > 0.96 * 0.93, though 0.90 < 0.96 * 0.95 (image 0's threshold)


def test_cplg_inequality_is_strict():
    # With ratio 1 a class's threshold is its own maximum, which no pixel strictly exceeds.
    assert not dssn.cplg_mask(logits_from_probs(PROBS), tau_low=0.0, ratio=1.0).any()


def test_cplg_class_below_tau_low_selects_nothing():
    # tau_low 0.955: image 0's best class (0.95) and image 1's class 0 (0.93) drop out; only 0.96 remains.
    mask = dssn.cplg_mask(logits_from_probs(PROBS), tau_low=0.955, ratio=0.96)
    assert mask.tolist() == [[[False, False, False]], [[False, False, True]]]


def test_threshold_mask():
    mask = threshold_mask(logits_from_probs(PROBS), 0.93)
    assert mask.tolist() == [[[True, True, False]], [[True, False, True]]]
    assert threshold_mask(logits_from_probs(PROBS), 0.0).all()


def test_alignment_hand_value():
    a = torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    b = torch.tensor([3.0, 2.0, 1.0]).view(1, 3, 1, 1)
    # mean 2, unbiased std 1: z_a = (-1, 0, 1), z_b = (1, 0, -1); squared differences (4, 0, 4).
    assert dssn.contrastive_alignment(a, b).item() == pytest.approx(8 / 3)


def test_alignment_gradients_reach_both_views():
    torch.manual_seed(1)
    a, b = torch.randn(2, 4, 3, 3, requires_grad=True), torch.randn(2, 4, 3, 3, requires_grad=True)
    dssn.contrastive_alignment(a, b).backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


def test_alignment_equals_mean_squared_difference_of_standardized_logits():
    torch.manual_seed(0)
    a, b = torch.randn(2, 5, 4, 3), torch.randn(2, 5, 4, 3)

    def z(v):  # unbiased std over classes, written out
        mean = v.sum(1, keepdim=True) / v.shape[1]
        var = ((v - mean) ** 2).sum(1, keepdim=True) / (v.shape[1] - 1)
        return (v - mean) / var.sqrt()

    expected = ((z(a) - z(b)) ** 2).sum() / a.numel()
    assert dssn.contrastive_alignment(a, b).item() == pytest.approx(expected.item(), rel=1e-5)
    # Standardisation removes per-pixel scale and shift: an affine copy is a perfect positive.
    assert dssn.contrastive_alignment(a, 3 * a + 7).item() == pytest.approx(0.0, abs=1e-10)


def test_unlabeled_ce_is_normalised_by_valid_not_selected_pixels():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]]).T.reshape(1, 2, 1, 2)  # probs (.5,.5), (.75,.25)
    target = torch.zeros(1, 1, 2, dtype=torch.long)
    both_valid = torch.zeros(1, 1, 2, dtype=torch.long)
    sel = torch.tensor([[[True, False]]])
    assert masked_unlabeled_ce(logits, target, sel, both_valid).item() == pytest.approx(math.log(2) / 2)
    sel2 = torch.tensor([[[False, True]]])
    assert masked_unlabeled_ce(logits, target, sel2, both_valid).item() == pytest.approx(-math.log(0.75) / 2)
    second_ignored = torch.tensor([[[0, 255]]])
    all_sel = torch.ones(1, 1, 2, dtype=torch.bool)
    assert masked_unlabeled_ce(logits, target, all_sel, second_ignored).item() == pytest.approx(math.log(2))


def test_cutmix_images_labels_and_ignore_masks():
    box = torch.zeros(2, 4, 4, dtype=torch.bool)
    box[0, 1:3, 0:2] = True  # image 1 has no box
    base_img, donor_img = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    mixed = cutmix(base_img, donor_img, box)
    assert mixed[0, :, 1:3, 0:2].eq(1).all() and mixed[0].sum() == 3 * 4 and mixed[1].eq(0).all()
    labels = cutmix(torch.full((2, 4, 4), 5), torch.full((2, 4, 4), 7), box)
    assert labels[0, 1, 0] == 7 and labels[0, 0, 0] == 5 and labels[1].eq(5).all()
    ign = cutmix(torch.zeros(2, 4, 4, dtype=torch.long), torch.full((2, 4, 4), 255), box)
    assert ign.eq(255).sum() == 4 and ign[0, 2, 1] == 255


def _tiny_net():
    return nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))


def test_ema_momentum_params_and_buffers():
    teacher, student = _tiny_net(), _tiny_net()
    for net, value in ((teacher, 1.0), (student, 3.0)):
        for t in [*net.parameters(), net[1].running_mean, net[1].running_var]:
            t.data.fill_(value)
    student[1].num_batches_tracked.fill_(7)
    dssn.ema_update(teacher, student, 0.9)
    for t in [*teacher.parameters(), teacher[1].running_mean, teacher[1].running_var]:
        assert torch.allclose(t, torch.full_like(t, 0.9 * 1 + 0.1 * 3))
    assert teacher[1].num_batches_tracked.item() == 7  # integer buffers are copied
    assert student[0].weight.eq(3).all()  # the student is untouched


def test_ema_first_step_is_an_exact_copy():
    torch.manual_seed(0)
    teacher, student = _tiny_net(), _tiny_net()
    student[1].running_mean.normal_()
    dssn.ema_update(teacher, student, 0.0)
    for (name, t), s in zip(teacher.state_dict().items(), student.state_dict().values()):
        assert torch.equal(t, s), name


def test_poly_lr():
    assert poly_lr(0.01, 0, 100) == 0.01
    assert poly_lr(0.01, 50, 100) == pytest.approx(0.01 * 0.5**0.9)
    assert poly_lr(0.01, 100, 100) == 0.0


def test_ohem_keeps_hard_pixels():
    p = torch.tensor([0.9, 0.6, 0.8, 0.3], dtype=torch.float64)
    logits = torch.stack([p.log(), (1 - p).log()]).reshape(1, 2, 1, 4)
    target = torch.zeros(1, 1, 4, dtype=torch.long)
    # min_kept 1: cutoff max(0.7, 0.3) = 0.7 keeps 0.6 and 0.3.
    assert ohem_ce(logits, target, 0.7, 1).item() == pytest.approx(-(math.log(0.6) + math.log(0.3)) / 2)
    # min_kept 3: the third smallest (0.8) raises the cutoff.
    expected = -(math.log(0.6) + math.log(0.8) + math.log(0.3)) / 3
    assert ohem_ce(logits, target, 0.7, 3).item() == pytest.approx(expected)
    # Ignored pixels never count.
    target[0, 0, 1] = 255
    assert ohem_ce(logits, target, 0.7, 1).item() == pytest.approx(-math.log(0.3))


def test_eval_mode_logits_uses_running_stats_and_restores_the_mode():
    net = _tiny_net().train()
    net[1].running_mean.fill_(2.0)
    x = torch.randn(3, 1, 4, 4, requires_grad=True)
    out = dssn.method.components.eval_mode_logits(net, x)
    expected = net[0](x).sub(2.0).div((1 + net[1].eps) ** 0.5) * net[1].weight.view(1, -1, 1, 1) \
        + net[1].bias.view(1, -1, 1, 1)
    assert torch.allclose(out, expected, atol=1e-6) and not out.requires_grad
    assert net.training and net[1].running_mean.eq(2.0).all()  # mode restored, statistics untouched
