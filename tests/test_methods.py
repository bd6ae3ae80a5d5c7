"""The DSSN step against a literal, research-code style reading of docs/method.md §3, and the baselines."""

import copy

import pytest
import torch
import torch.nn.functional as F

import dssn
from dssn.config import load_config
from dssn.data.batch import UnlabeledViews
from dssn.method import Batch, build_method

N_CLASSES = 4


def make_batch(seed=0, n=2, size=32):
    g = torch.Generator().manual_seed(seed)

    def unlabeled():
        ign = torch.zeros(n, size, size, dtype=torch.long)
        ign[:, :, -5:] = 255  # padding on the right
        box = torch.zeros(n, size, size, dtype=torch.bool)
        box[0, 4:20, 8:30] = True  # the second image draws no box
        weak, strong1, strong2 = (torch.randn(n, 3, size, size, generator=g) for _ in range(3))
        return UnlabeledViews(weak, strong1, strong2, ignore=ign, box1=box, box2=box.flip(-1))

    y = torch.randint(0, N_CLASSES, (n, size, size), generator=g)
    y[:, 0] = 255
    return Batch((torch.randn(n, 3, size, size, generator=g), y), unlabeled(), unlabeled())


def make_method(*overrides):
    cfg = load_config("synthetic", ["model.backbone=resnet18", "model.decoder_channels=16",
                                    f"data.num_classes={N_CLASSES}", "method.name=dssn",
                                    "method.teacher_bn=batch", *overrides])  # the doc's default, not the preset's
    torch.manual_seed(0)
    student = dssn.DeepLabV3Plus(N_CLASSES, backbone="resnet18", decoder_channels=16)
    with torch.no_grad():  # confident predictions, so that CPLG selects pixels
        student.classifier.weight.mul_(40)
    method = build_method(cfg, student, iters_per_epoch=10)
    method.teacher.load_state_dict(student.state_dict())
    # Make the teacher differ from the student so that mixing up the two would show.
    with torch.no_grad():
        for p in method.teacher.parameters():
            p.mul_(0.9)
    return method, cfg


def literal_step(student, teacher, batch, step, tau_low=0.92, ratio=0.96, warmup=1):
    """docs/method.md §3 as research code writes it: masks by indexing, loops, separate passes."""
    x, y = batch.labeled
    u, um = batch.unlabeled, batch.partner

    def paste(base, donor, box):
        out = base.clone()
        idx = box.unsqueeze(1).expand(base.shape) if base.dim() == 4 else box
        out[idx] = donor[idx]
        return out

    def cplg(logits):
        prob = logits.softmax(1)
        out = torch.zeros(prob.shape[0], *prob.shape[2:], dtype=torch.bool)
        for b in range(prob.shape[0]):
            for c in range(prob.shape[1]):
                best = prob[b, c].max()
                if best > tau_low:
                    out[b] |= prob[b, c] > ratio * best
        return out

    def ceu(q, t, m, ign):
        ce = F.cross_entropy(q, t, reduction="none")
        return (ce * m * (ign != 255)).sum() / (ign != 255).sum()

    def standard(v):
        return (v - v.mean(1, keepdim=True)) / v.std(1, keepdim=True)

    def align(a, b):
        return ((standard(a) - standard(b)) ** 2).mean()

    s1, s2 = paste(u.strong1, um.strong1, u.box1), paste(u.strong2, um.strong2, u.box2)
    with torch.no_grad():
        teacher.train()
        t_mix = teacher(um.weak)
        t = teacher(u.weak)
    t1, t2 = paste(t, t_mix, u.box1), paste(t, t_mix, u.box2)
    ign1, ign2 = paste(u.ignore, um.ignore, u.box1), paste(u.ignore, um.ignore, u.box2)
    student.train()
    p, (f1, f2) = student(torch.cat((x, u.weak)), n_perturb=2)
    n = x.shape[0]
    p_x, p_w, f1, f2 = p[:n], p[n:].detach(), f1[n:], f2[n:]
    q1, q2 = student(torch.cat((s1, s2))).chunk(2)
    y_w = p_w.argmax(1)
    l_x = F.cross_entropy(p_x, y, ignore_index=255)
    l_s = ceu(q1, t1.argmax(1), cplg(t1), ign1) + ceu(q2, t2.argmax(1), cplg(t2), ign2)
    if step < warmup:
        l_s = torch.zeros(())
    m_w = cplg(p_w)
    l_fp = ceu(f1, y_w, m_w, u.ignore) + ceu(f2, y_w, m_w, u.ignore)
    l_c = align(q1, q2) + align(f1, f2)
    return {"loss": 0.5 * l_x + 0.125 * (l_s + l_fp) + 0.005 * l_c, "x": l_x, "s": l_s, "fp": l_fp,
            "c_img": align(q1, q2), "c_feat": align(f1, f2)}


def channels_last(batch):
    def cl(t):
        return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t

    return Batch(tuple(cl(t) for t in batch.labeled), UnlabeledViews(*map(cl, batch.unlabeled)),
                 UnlabeledViews(*map(cl, batch.partner)))


@pytest.mark.parametrize("step,speed", [(0, None), (3, None), (3, "channels_last"), (3, "checkpoint_backbone")])
def test_dssn_step_equals_literal_spec(step, speed):
    """Our step (batched streams, inference-mode teacher, and optionally the speed switches:
    channels-last, activation checkpointing) against the literal reading: losses within 1e-5, gradients and BN statistics too."""
    method, _ = make_method()
    student, teacher = copy.deepcopy(method.student), copy.deepcopy(method.teacher)
    batch = make_batch()
    if speed == "channels_last":
        method.student.to(memory_format=torch.channels_last)
        method.teacher.to(memory_format=torch.channels_last)
        batch = channels_last(batch)
    elif speed == "checkpoint_backbone":
        method.student.backbone.checkpoint_stages = True
    torch.manual_seed(123)
    ours = method.training_step(batch, step)
    torch.manual_seed(123)  # same dropout masks in the perturbed streams
    ref = literal_step(student, teacher, batch, step)
    for key, value in ref.items():
        assert ours[key].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-7), key
    assert ours["fp"] > 0 and ours["c_img"] > 0 and ours["c_feat"] > 0
    assert (ours["s"] > 0) == (step >= 1)  # warm-up leaves L_s out on the first step
    # Gradients agree too (the student's parameters, through every term).
    ours["loss"].backward()
    ref["loss"].backward()
    for (name, a), b in zip(method.student.named_parameters(), student.parameters()):
        # Relative to the gradient's norm: channels-last convolutions sum in another order.
        assert (a.grad - b.grad).norm() <= 1e-4 * b.grad.norm() + 1e-7, name
    # BN statistics of the teacher moved as in two separate passes.
    for a, b in zip(method.teacher.buffers(), teacher.buffers()):
        assert torch.allclose(a, b, atol=1e-6)


def test_ablation_switches_remove_terms():
    method, _ = make_method("method.loss_feature=false", "method.align_feature=false", "method.align_image=false")
    assert method.n_perturb == 0
    losses = method.training_step(make_batch(), step=5)
    assert losses["fp"] == 0 and losses["c_feat"] == 0 and losses["c_img"] == 0 and losses["s"] > 0
    assert losses["loss"].item() == pytest.approx((0.5 * losses["x"] + 0.125 * losses["s"]).item(), rel=1e-6)
    off, _ = make_method("method.loss_image=false")
    assert off.training_step(make_batch(), step=5)["s"] == 0


def test_fixed_threshold_zero_selects_every_valid_pixel():
    method, _ = make_method("method.selection=threshold", "method.threshold=0.0")
    losses = method.training_step(make_batch(), step=5)
    assert losses["selected_w"].item() == pytest.approx(1.0)


def test_teacher_bn_running_uses_running_statistics():
    method, _ = make_method("method.teacher_bn=running")
    before = [b.clone() for b in method.teacher.buffers()]
    batch = make_batch()
    t_mix, t = method.teacher_logits(batch.partner.weak, batch.unlabeled.weak, step=0)
    assert all(torch.equal(a, b) for a, b in zip(before, method.teacher.buffers()))
    method.teacher.eval()
    with torch.no_grad():
        assert torch.allclose(t, method.teacher(batch.unlabeled.weak), atol=1e-5)


def test_teacher_is_a_copy_after_first_step_then_an_ema():
    method, _ = make_method()
    method.after_optimizer_step(0)
    for a, b in zip(method.teacher.state_dict().values(), method.student.state_dict().values()):
        assert torch.equal(a, b)
    before = copy.deepcopy(method.teacher)
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(1.0)
    method.after_optimizer_step(1)
    for t, t0, s in zip(method.teacher.parameters(), before.parameters(), method.student.parameters()):
        assert torch.allclose(t, 0.996 * t0 + 0.004 * s, atol=1e-6)


def test_fixmatch_and_supervised_on_the_same_batch():
    batch = make_batch()
    cfg = load_config("synthetic", ["model.backbone=resnet18", f"data.num_classes={N_CLASSES}",
                                    "method.name=fixmatch"])
    torch.manual_seed(0)
    student = dssn.DeepLabV3Plus(N_CLASSES, backbone="resnet18", decoder_channels=16)
    fm = build_method(cfg, student, 10)
    losses = fm.training_step(batch, 0)
    assert losses["loss"].item() == pytest.approx(((losses["x"] + losses["u"]) / 2).item())
    assert student.training
    sup = build_method(cfg.model_copy(update={"method": cfg.method.model_copy(update={"name": "supervised"})}),
                       student, 10)
    losses = sup.training_step(Batch(batch.labeled), 0)
    student.train()
    expected = F.cross_entropy(student(batch.labeled[0]), batch.labeled[1], ignore_index=255)
    assert losses["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
