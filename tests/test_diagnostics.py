"""Pseudo-label statistics and health checks against direct counts on hand-made tensors."""

import copy
import math

import pytest
import torch

import dssn
from dssn.config import load_config
from dssn.data.batch import UnlabeledViews
from dssn.method import Batch, build_method
from dssn.method.diagnostics import (
    HealthRules,
    class_selection_counts,
    cplg_thresholds,
    cplg_vs_fixed_counts,
    gaussian_similarity,
    health_warnings,
    loss_shares,
    parameter_distance,
    positive_vs_random_similarity,
    prediction_agreement,
    prediction_spread,
)


def logits_from_probs(prob: torch.Tensor) -> torch.Tensor:
    """Logits whose softmax is exactly ``prob`` ([B, C, H, W])."""
    return prob.log()


def hand_made_probs() -> torch.Tensor:
    """Two 2x3 images, 3 classes. Class 2 (the 'tail') is never above 0.95 but tops out at 0.93."""
    rows = [  # per pixel: (p0, p1, p2)
        [(0.98, 0.01, 0.01), (0.90, 0.05, 0.05), (0.02, 0.97, 0.01),
         (0.04, 0.03, 0.93), (0.05, 0.05, 0.90), (0.10, 0.10, 0.80)],
        [(0.60, 0.20, 0.20), (0.30, 0.60, 0.10), (0.96, 0.02, 0.02),
         (0.05, 0.91, 0.04), (0.34, 0.33, 0.33), (0.02, 0.02, 0.96)],
    ]
    return torch.tensor(rows, dtype=torch.float64).reshape(2, 2, 3, 3).permute(0, 3, 1, 2).contiguous()


def test_class_selection_counts_equal_a_direct_count():
    pseudo = torch.tensor([[[0, 1, 2], [2, 2, 0]], [[1, 1, 0], [2, 0, 1]]])
    selected = torch.tensor([[[1, 0, 1], [1, 0, 0]], [[1, 1, 1], [0, 1, 0]]], dtype=torch.bool)
    ignore = torch.tensor([[[0, 0, 0], [0, 255, 0]], [[0, 0, 255], [0, 0, 0]]])
    counts = class_selection_counts(pseudo, selected, ignore, 4)
    for c in range(4):
        valid = ignore != 255
        assert counts[0, c] == ((pseudo == c) & valid).sum()
        assert counts[1, c] == ((pseudo == c) & valid & selected).sum()
    # by hand: class 0 has valid pixels (0,0,0) sel, (0,1,2) not, (1,1,1) sel -> 3 / 2
    assert counts[:, 0].tolist() == [3, 2]
    assert counts[:, 2].tolist() == [3, 2]  # (0,0,2) sel, (0,1,0) sel, (1,1,0) not; (0,1,1) is ignored
    assert counts[:, 3].tolist() == [0, 0]
    assert counts.dtype == torch.int64


def test_cplg_against_fixed_threshold_counts_on_the_same_predictions():
    prob = hand_made_probs()
    ignore = torch.zeros(2, 2, 3, dtype=torch.long)
    ignore[1, 1, 1] = 255  # the 0.34/0.33/0.33 pixel
    counts = cplg_vs_fixed_counts(logits_from_probs(prob), ignore, tau_low=0.92, ratio=0.96, threshold=0.95)
    pseudo = prob.argmax(1)
    valid = ignore != 255
    # CPLG, written out: per image and class, threshold 0.96 * max where max > 0.92.
    cplg = torch.zeros_like(valid)
    for b in range(2):
        for c in range(3):
            m = prob[b, c].max()
            if m > 0.92:
                cplg[b] |= prob[b, c] > 0.96 * m
    fixed = prob.amax(1) >= 0.95
    for c in range(3):
        is_c = (pseudo == c) & valid
        assert counts[:, c].tolist() == [is_c.sum(), (is_c & cplg).sum(), (is_c & fixed).sum()]
    # By hand, the tail class 2: four valid pixels labelled 2 (0.93, 0.90, 0.80 in image 0; 0.96 in
    # image 1). Image 0's class-2 threshold is 0.96 * 0.93 = 0.893, so CPLG keeps 0.93 and 0.90; the
    # fixed 0.95 threshold keeps only image 1's 0.96 pixel.
    assert counts[:, 2].tolist() == [4, 3, 1]


def test_cplg_thresholds_mean_over_active_images():
    prob = hand_made_probs()
    sums, active = cplg_thresholds(logits_from_probs(prob), tau_low=0.92, ratio=0.96)
    # class 0: max 0.98 (img 0), 0.96 (img 1) -> both active; class 2: 0.93 and 0.96 -> both;
    # class 1: 0.97 (img 0) active, 0.91 (img 1) not.
    assert active.tolist() == [2, 1, 2]
    assert (sums / active).tolist() == pytest.approx([0.96 * (0.98 + 0.96) / 2, 0.96 * 0.97, 0.96 * (0.93 + 0.96) / 2])


def test_gaussian_similarity_is_one_on_identical_views_and_lower_on_random_pairs():
    torch.manual_seed(0)
    a = torch.randn(2, 5, 8, 8)
    assert gaussian_similarity(a, a.clone()) == pytest.approx(torch.ones(128))
    pos, rand = positive_vs_random_similarity(a, a.clone(), generator=torch.Generator().manual_seed(0)).tolist()
    assert pos == pytest.approx(1.0)
    assert rand < 0.6  # unrelated standardised vectors: about exp(-(C-1)/C) ~ 0.45 for C=5
    # similarity depends on the standardised vectors only: scaling and shifting a logit vector changes nothing
    assert gaussian_similarity(a, 3 * a + 1) == pytest.approx(torch.ones(128), abs=1e-5)
    # sigma^2 = C: two standardised vectors that are exact opposites give exp(-4(C-1)/2C)
    assert gaussian_similarity(a, -a)[0].item() == pytest.approx(math.exp(-2 * 4 / 5), rel=1e-4)


def test_agreement_distance_and_loss_shares():
    a = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])  # [1, 2, 1, 2]: argmax 0, 1
    b = torch.tensor([[[[1.0, 1.0]], [[0.0, 2.0]]]])  # argmax 0, 1
    c = torch.tensor([[[[0.0, 1.0]], [[1.0, 0.0]]]])  # argmax 1, 0
    assert prediction_agreement(a, b).item() == 1.0 and prediction_agreement(a, c).item() == 0.0
    ignore = torch.tensor([[[0, 255]]])
    assert prediction_agreement(a, b, ignore).item() == 1.0

    net = torch.nn.Linear(3, 2)
    assert parameter_distance(copy.deepcopy(net), net).item() == 0.0
    other = copy.deepcopy(net)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(2)  # T = 2S: ||T - S|| / ||S|| = 1
    assert parameter_distance(other, net).item() == pytest.approx(1.0)

    shares = loss_shares({"x": 1.0, "s": 2.0, "c_img": 10.0, "lr": 0.1}, {"x": 0.5, "s": 0.125, "c_img": 0.005})
    assert shares == pytest.approx({"x": 0.5 / 0.8, "s": 0.25 / 0.8, "c_img": 0.05 / 0.8})


def rules_fired(stats, best=None, progress=1.0):
    return [w.rule for w in health_warnings(stats, HealthRules(), best, progress)]


def test_health_rules():
    healthy = {"c_img": 0.3, "c_feat": 0.1, "share/x": 0.8, "share/s": 0.1, "share/c_img": 0.05,
               "share/c_feat": 0.05, "sim/img_pos": 0.9, "sim/img_rand": 0.6, "sim/feat_pos": 0.95,
               "sim/feat_rand": 0.7, "selected_t": 0.4, "teacher_distance": 0.02}
    assert rules_fired(healthy, best=0.5) == []
    assert rules_fired({**healthy, "share/c_img": 0.4, "share/c_feat": 0.2}) == ["alignment_dominates"]
    assert rules_fired({**healthy, "share/c_img": 1e-6, "share/c_feat": 0.0}) == ["alignment_vanishes"]
    # switched off (both raw terms 0): not a warning
    assert rules_fired({**healthy, "c_img": 0.0, "c_feat": 0.0, "share/c_img": 0.0, "share/c_feat": 0.0}) == []
    assert rules_fired({**healthy, "sim/feat_pos": 1.0, "sim/feat_rand": 0.995}) == ["collapse_feat"]
    assert rules_fired({**healthy, "selected_t": 0.05}, best=0.5) == ["selection_collapse"]
    assert rules_fired({**healthy, "selected_t": 0.005}, progress=0.3) == []  # early: still warming up
    assert rules_fired({**healthy, "selected_t": 0.005}, progress=0.6) == ["selection_starved"]
    assert rules_fired({**healthy, "teacher_distance": 0.8}) == ["teacher_diverges"]
    assert rules_fired({"miou/student": 50.0, "miou/teacher": 35.0}) == ["teacher_diverges"]
    assert rules_fired({"miou/student": 50.0, "miou/teacher": 45.0}) == []
    assert rules_fired({"spread/student": 0.9, "spread/teacher": 1.1}) == []
    assert rules_fired({"spread/student": 0.02, "spread/teacher": 0.3}) == ["single_class"]
    assert rules_fired({"spread/student": float("nan")}) == []  # the truth is one class: nothing to tell


def test_prediction_spread_by_hand():
    """Rows truth, columns prediction. Truth: 60 background, 40 other pixels."""
    right = torch.tensor([[60, 0, 0], [0, 30, 0], [0, 0, 10]])
    assert prediction_spread(right) == 1.0
    background_everywhere = torch.tensor([[60, 0, 0], [30, 0, 0], [10, 0, 0]])
    assert prediction_spread(background_everywhere) == 0.0
    # background predicted on 95 pixels: 5 other predictions for 40 other truths
    nearly = torch.tensor([[59, 1, 0], [28, 2, 0], [8, 0, 2]])
    assert prediction_spread(nearly) == pytest.approx(5 / 40)
    # the most-predicted class need not be the most common one: class 2 predicted on 90 pixels
    wrong_class = torch.tensor([[0, 0, 60], [0, 10, 20], [0, 0, 10]])
    assert prediction_spread(wrong_class) == pytest.approx(10 / 90)
    assert math.isnan(prediction_spread(torch.tensor([[50, 0], [0, 0]])))


class ConstantNet(torch.nn.Module):
    """Logits read off the image: channel c is the score of class c."""

    def forward(self, x):
        return x


def test_an_evaluation_that_predicts_one_class_fires_the_check(tmp_path):
    """Through the engine's evaluation and the monitor: a network that predicts the background
    everywhere fires ``single_class`` at once; one that predicts the truth does not."""
    from dssn.engine.evaluate import evaluate
    from dssn.engine.monitor import TrainingMonitor

    mask = torch.zeros(2, 8, 8, dtype=torch.long)
    mask[:, 2:6, 2:6] = 1
    mask[1, 6:, :] = 2
    right = torch.nn.functional.one_hot(mask, 3).permute(0, 3, 1, 2).float()
    background = torch.zeros_like(right)
    background[:, 0] = 1.0
    results = evaluate({"student": ConstantNet(), "teacher": ConstantNet()},
                       [(right, mask)], 3, torch.device("cpu"))
    healthy = {n: r.summary(["bg", "a", "b"]) for n, r in results.items()}
    assert healthy["student"]["prediction_spread"] == 1.0
    assert healthy["student"]["predicted_share"] == pytest.approx({"bg": 80 / 128, "a": 32 / 128, "b": 16 / 128})
    collapsed = evaluate({"student": ConstantNet(), "teacher": ConstantNet()}, [(background, mask)], 3,
                         torch.device("cpu"))
    collapsed = {"student": collapsed["student"].summary(["bg", "a", "b"]), "teacher": healthy["teacher"]}
    assert collapsed["student"]["prediction_spread"] == 0.0

    cfg = load_config("synthetic", ["data.num_classes=3", "method.name=supervised", "diag.panels=0",
                                    "train.batch_size=2", "train.batch_size_unlabeled=2"])
    net = torch.nn.Conv2d(3, 3, 1)
    method = build_method(cfg, net, iters_per_epoch=10)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    logger = FakeLogger()
    monitor = TrainingMonitor(cfg, tmp_path, method, optimizer, logger, ["bg", "a", "b"], [0] * 9, 10, 100,
                              None, torch.device("cpu"))
    monitor.on_eval(50, 5, healthy, 0.1)
    assert not [r for r in logger.records if r["kind"] == "warning"]
    monitor.on_eval(60, 6, collapsed, 0.1)
    warnings = [r for r in logger.records if r["kind"] == "warning"]
    assert [(w["rule"], w["step"]) for w in warnings] == [("single_class", 60)]
    assert "another class goes to student 0% (< 25%)" in warnings[0]["message"]
    assert monitor.warning_counts == {"single_class": 1}


class FakeLogger:
    def __init__(self):
        self.records, self.messages = [], []

    def log_record(self, record):
        self.records.append(record)

    def message(self, text):
        self.messages.append(text)


def test_a_rule_is_reported_after_patience_consecutive_log_steps():
    from dssn.engine.monitor import TrainingMonitor
    from dssn.method.diagnostics import HealthWarning

    mon = TrainingMonitor.__new__(TrainingMonitor)  # only the reporting part, no run needed
    mon.logger, mon._streaks, mon.warning_counts, mon.warning_steps = FakeLogger(), {}, {}, {}
    w = HealthWarning("selection_collapse", "fell")
    mon._check(10, [w], "log", 3)
    mon._check(20, [], "log", 3)  # the streak breaks
    mon._check(30, [w], "log", 3)
    mon._check(40, [w], "log", 3)
    assert mon.logger.records == []
    mon._check(50, [w], "log", 3)
    mon._check(60, [w], "log", 3)
    assert [r["step"] for r in mon.logger.records] == [50, 60]
    assert len(mon.logger.messages) == 1 and "step 50" in mon.logger.messages[0]  # console: once per rule
    assert mon.warning_counts == {"selection_collapse": 2}


N_CLASSES = 4


def make_batch(seed=0, n=2, size=32):
    g = torch.Generator().manual_seed(seed)

    def unlabeled():
        ign = torch.zeros(n, size, size, dtype=torch.long)
        ign[:, :, -5:] = 255
        box = torch.zeros(n, size, size, dtype=torch.bool)
        box[0, 4:20, 8:30] = True
        weak, strong1, strong2 = (torch.randn(n, 3, size, size, generator=g) for _ in range(3))
        return UnlabeledViews(weak, strong1, strong2, ignore=ign, box1=box, box2=box.flip(-1))

    y = torch.randint(0, N_CLASSES, (n, size, size), generator=g)
    return Batch((torch.randn(n, 3, size, size, generator=g), y), unlabeled(), unlabeled())


@pytest.mark.parametrize("name", ["dssn", "fixmatch"])
def test_step_diagnostics_agree_with_the_logged_fractions_and_change_nothing(name):
    cfg = load_config("synthetic", ["model.backbone=resnet18", "model.decoder_channels=16",
                                    f"data.num_classes={N_CLASSES}", f"method.name={name}", "method.tau_low=0.3"])

    def run(collect):
        torch.manual_seed(0)
        student = dssn.DeepLabV3Plus(N_CLASSES, backbone="resnet18", decoder_channels=16, backbone_width=8)
        with torch.no_grad():
            student.classifier.weight.mul_(40)  # confident predictions, so that pixels get selected
        method = build_method(cfg, student, iters_per_epoch=10)
        method.collect_diagnostics = collect
        torch.manual_seed(1)
        losses = method.training_step(make_batch(), step=3)
        return method, losses

    method, losses = run(True)
    diag = method.pop_diagnostics()
    assert method.pop_diagnostics() == {}  # popped once
    counts = diag["select_counts"]
    key = "selected_t" if name == "dssn" else "selected_w"
    # the per-class counts add up to the overall selected fraction the step logs
    assert (counts[1].sum() / counts[0].sum()).item() == pytest.approx(losses[key].item(), abs=1e-6)
    assert counts[0].sum() == 2 * 32 * 27  # every valid (not padded) pixel of view 1 has a pseudo label
    assert diag["cplg_vs_fixed"].shape == (3, N_CLASSES)
    if name == "dssn":
        assert set(diag) >= {"agreement", "teacher_distance", "sim/img", "sim/feat", "cplg_thr"}
        assert 0 <= diag["agreement"].item() <= 1 and diag["sim/img"].shape == (2,)
    # The same step without diagnostics gives the very same losses: they change nothing.
    _, plain = run(False)
    assert all(torch.equal(losses[k], plain[k]) for k in plain)
