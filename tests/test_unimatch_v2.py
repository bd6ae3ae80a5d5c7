"""The UniMatch V2 step against a literal reading of its rules (docs/method.md §5.3), the EMA
momentum rules (§8), CutMix partners from the mirrored batch position, and one engine step."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dssn.config import load_config
from dssn.data.batch import UnlabeledViews
from dssn.engine import trainer as trainer_module
from dssn.engine.trainer import train
from dssn.method import Batch, UniMatchV2, build_method
from dssn.method.components import ema_momentum_at
from dssn.method.unimatch_v2 import from_partner
from dssn.models import DeepLabV3Plus

N_CLASSES = 5


class CompDropNet(nn.Module):
    """A few convs with batch norm, and UniMatch V2's complementary dropout on its features.

    ``forward(x, comp_drop=True)`` expects ``cat(view1, view2)``: the first half's features are
    multiplied by a channel mask m (0 or 2 per image and channel), the second half's by 2 - m,
    and a random half of the pairs get all-ones masks. Draws from torch's global generator.
    Records ``(batch size, comp_drop)`` of every call.
    """

    def __init__(self, classes: int = N_CLASSES, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.classifier = nn.Conv2d(width, classes, 1)
        self.calls: list[tuple[int, bool]] = []

    def forward(self, x: torch.Tensor, comp_drop: bool = False) -> torch.Tensor:
        self.calls.append((x.shape[0], comp_drop))
        features = self.body(self.stem(x))
        if comp_drop:
            half, channels = x.shape[0] // 2, features.shape[1]
            first = torch.bernoulli(torch.full((half, channels), 0.5)) * 2
            second = 2 - first
            unperturbed = torch.randperm(half)[: half // 2]
            first[unperturbed] = 1
            second[unperturbed] = 1
            features = features * torch.cat((first, second))[:, :, None, None]
        return self.classifier(features)

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        return list(self.stem.parameters()), [*self.body.parameters(), *self.classifier.parameters()]


def make_batch(n_labeled: int = 2, n_unlabeled: int = 4, size: int = 12, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ign = torch.zeros(n_unlabeled, size, size, dtype=torch.long)
    ign[0, :, -3:] = 255  # padding differs between images, so mixing the ignore maps shows
    ign[2, -4:, :] = 255
    box1 = torch.zeros(n_unlabeled, size, size, dtype=torch.bool)
    box1[0, 2:8, 1:9] = True
    box1[1, 5:12, 0:6] = True  # image 2 draws no box
    box1[3, 0:5, 4:12] = True
    box2 = torch.zeros_like(box1)
    box2[0, 6:12, 3:10] = True
    box2[2, 1:7, 1:7] = True
    unlabeled = UnlabeledViews(weak=torch.randn(n_unlabeled, 3, size, size, generator=g),
                               strong1=torch.randn(n_unlabeled, 3, size, size, generator=g),
                               strong2=torch.randn(n_unlabeled, 3, size, size, generator=g),
                               ignore=ign, box1=box1, box2=box2)
    y = torch.randint(0, N_CLASSES, (n_labeled, size, size), generator=g)
    y[:, 0] = 255
    return Batch((torch.randn(n_labeled, 3, size, size, generator=g), y), unlabeled)


def make_method(*overrides: str) -> UniMatchV2:
    cfg = load_config("synthetic", [f"data.num_classes={N_CLASSES}", "method.name=unimatch_v2", *overrides])
    torch.manual_seed(0)
    student = CompDropNet()
    method = build_method(cfg, student, iters_per_epoch=10)
    assert isinstance(method, UniMatchV2)
    with torch.no_grad():  # a teacher unlike the student, confident on some pixels and not on others
        for p in method.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
        method.teacher.classifier.weight.mul_(100)
        for m in (method.teacher, method.student):  # running statistics unlike batch statistics
            m.stem[1].running_mean.fill_(0.3)
            m.stem[1].running_var.fill_(2.0)
    return method


def literal_step(student: nn.Module, teacher: nn.Module, batch: Batch, threshold: float = 0.95) -> dict:
    """The rules as research code writes them: loops over images, masks by indexing."""
    x, y = batch.labeled
    u = batch.unlabeled
    n = u.weak.shape[0]

    teacher.eval()
    with torch.no_grad():
        t = teacher(u.weak)
        conf = t.softmax(dim=1).max(dim=1)[0]
        label = t.argmax(dim=1)

    def paste(values, box):  # image i takes the pixels inside its box from image n-1-i
        out = values.clone()
        for i in range(n):
            if values.dim() == 4:
                out[i][:, box[i]] = values[n - 1 - i][:, box[i]]
            else:
                out[i][box[i]] = values[n - 1 - i][box[i]]
        return out

    s1, s2 = paste(u.strong1, u.box1), paste(u.strong2, u.box2)
    student.train()
    p_x = student(x)
    q1, q2 = student(torch.cat((s1, s2)), comp_drop=True).chunk(2)

    def l_u(q, box):
        lab, cf, ign = paste(label, box), paste(conf, box), paste(u.ignore, box)
        ce = F.cross_entropy(q, lab, reduction="none")
        return (ce * ((cf >= threshold) & (ign != 255))).sum() / (ign != 255).sum()

    l_x = F.cross_entropy(p_x, y, ignore_index=255)
    u1, u2 = l_u(q1, u.box1), l_u(q2, u.box2)
    return {"loss": (l_x + (u1 + u2) / 2) / 2, "x": l_x, "u": (u1 + u2) / 2, "u1": u1, "u2": u2}


def test_step_equals_the_literal_rules():
    """Losses and gradients on the same weights, batch and dropout draws; the teacher runs in eval
    mode and the step leaves it untouched; the student's two passes are the labeled batch alone
    and cat(s1, s2) with complementary dropout, and only the first moves running statistics."""
    method = make_method()
    student, teacher = copy.deepcopy(method.student), copy.deepcopy(method.teacher)
    teacher_before = copy.deepcopy(method.teacher.state_dict())
    teacher.train()  # the literal step must put it in eval mode itself
    batch = make_batch()
    method.student.calls.clear()
    torch.manual_seed(123)
    ours = method.training_step(batch, step=7)
    torch.manual_seed(123)  # the same complementary dropout masks
    ref = literal_step(student, teacher, batch)

    assert method.student.calls == [(2, False), (8, True)]
    for key in ("loss", "x", "u"):
        assert ours[key].item() == pytest.approx(ref[key].item(), rel=1e-5, abs=1e-7), key
    # Both unlabeled terms keep some pixels and drop others: the threshold is exercised.
    assert 0 < ref["u1"].item() and 0 < ref["u2"].item()
    assert 0 < ours["selected_t"].item() < 1
    ours["loss"].backward()
    ref["loss"].backward()
    for (name, a), b in zip(method.student.named_parameters(), student.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-7), name
    # Batch norm's running statistics moved with the labeled pass alone (momentum 0.1 by hand from
    # make_method's 0.3 / 2.0), not with the complementary-dropout pass as well, as the literal
    # step's did.
    bn_input = method.student.stem[0](batch.labeled[0]).detach()
    bn = method.student.stem[1]
    expected_mean = 0.9 * 0.3 + 0.1 * bn_input.mean(dim=(0, 2, 3))
    expected_var = 0.9 * 2.0 + 0.1 * bn_input.var(dim=(0, 2, 3), unbiased=True)
    assert torch.allclose(bn.running_mean, expected_mean, atol=1e-6)
    assert torch.allclose(bn.running_var, expected_var, atol=1e-5)
    assert bn.num_batches_tracked.item() == 1
    assert not torch.allclose(student.stem[1].running_var, expected_var, atol=1e-3)
    assert not method.teacher.training
    for key, value in method.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key
    assert all(p.grad is None for p in method.teacher.parameters())


def test_the_threshold_counts_all_valid_pixels_but_trains_on_the_confident():
    """With threshold 0 every valid pixel is trained on; above 1 none, and the term is 0."""
    batch = make_batch()
    everything = make_method("method.threshold=0.0").training_step(batch, 3)
    assert everything["selected_t"].item() == pytest.approx(1.0) and everything["u"] > 0
    above_one = make_method()
    # The config refuses a threshold above 1 (a fraction); set on the section itself, past validation.
    above_one.cfg = above_one.cfg.model_copy(update={"threshold": 1.01})
    nothing = above_one.training_step(batch, 3)
    assert nothing["selected_t"].item() == 0 and nothing["u"].item() == 0
    assert nothing["loss"].item() == pytest.approx(nothing["x"].item() / 2, rel=1e-6)


def test_partner_is_the_mirrored_batch_position():
    images = torch.arange(3, dtype=torch.float32).view(3, 1, 1, 1).expand(3, 2, 4, 4).clone()
    box = torch.zeros(3, 4, 4, dtype=torch.bool)
    box[0, :2, :2] = True
    box[1, 1:, 3] = True
    box[2, 3, :] = True
    mixed = from_partner(images, box)
    for i, partner in enumerate((2, 1, 0)):  # image i takes its box from image 2 - i
        assert (mixed[i][:, box[i]] == partner).all() and (mixed[i][:, ~box[i]] == i).all()
    labels = torch.tensor([[[10, 11]], [[20, 21]]])
    assert from_partner(labels, torch.tensor([[[True, False]], [[False, True]]])).tolist() == [
        [[20, 11]], [[20, 11]]]


def test_ema_momentum_rules_by_hand():
    ramp = [ema_momentum_at(s, "ramp", 0.996) for s in (0, 1, 2, 3, 9, 249, 250, 10_000)]
    assert ramp == pytest.approx([0.0, 1 / 2, 2 / 3, 3 / 4, 9 / 10, 0.996, 0.996, 0.996])
    assert ema_momentum_at(99, "ramp", 0.996) == pytest.approx(0.99)
    assert ema_momentum_at(4, "ramp", 0.5) == 0.5  # capped by the momentum
    assert [ema_momentum_at(s, "copy_first", 0.996) for s in (0, 1, 2, 500)] == [0.0, 0.996, 0.996, 0.996]
    with pytest.raises(ValueError, match="unknown EMA rule"):
        ema_momentum_at(1, "linear", 0.99)


def test_ramp_teacher_is_the_running_mean_then_an_ema():
    """Under the ramp the teacher after step s is the mean of the students of steps 0..s, while
    1 - 1/(s+1) is below the momentum; after that it is the usual EMA."""
    method = make_method("method.ema_rule=ramp", "method.ema_momentum=0.7")
    students = []
    for step in range(5):
        with torch.no_grad():
            for p in method.student.parameters():
                p.copy_(torch.randn_like(p))
        students.append([p.detach().clone() for p in method.student.parameters()])
        before = [p.clone() for p in method.teacher.parameters()]
        method.after_optimizer_step(step)
        if step < 3:  # momenta 0, 1/2, 2/3 (below 0.7)
            mean = [torch.stack(ps).mean(0) for ps in zip(*students)]
            for t, m in zip(method.teacher.parameters(), mean):
                assert torch.allclose(t, m, atol=1e-6)
        else:
            for t, t0, s in zip(method.teacher.parameters(), before, students[-1]):
                assert torch.allclose(t, 0.7 * t0 + 0.3 * s, atol=1e-6)


def test_copy_first_rule_in_the_method():
    method = make_method("method.ema_rule=copy_first")
    method.after_optimizer_step(0)
    for a, b in zip(method.teacher.state_dict().values(), method.student.state_dict().values()):
        assert torch.equal(a, b)


def test_hooks_pseudo_labels_eval_models_and_weights():
    method = make_method()
    method.train()
    assert method.student.training and not method.teacher.training
    assert set(method.eval_models()) == {"student", "teacher"} == set(method.modules())
    assert method.loss_weights() == {"x": 0.5, "u": 0.5}
    weak = make_batch().unlabeled.weak
    state = copy.deepcopy(method.teacher.state_dict())
    logits, selected = method.pseudo_labels(weak)
    assert logits.shape == (4, N_CLASSES, 12, 12) and selected.dtype == torch.bool
    assert torch.equal(selected, logits.softmax(1).amax(1) >= 0.95)
    assert all(torch.equal(v, state[k]) for k, v in method.teacher.state_dict().items())
    method.collect_diagnostics = True
    method.training_step(make_batch(), 1)
    diag = method.pop_diagnostics()
    assert diag["select_counts"].shape == (2, N_CLASSES) and diag["cplg_vs_fixed"].shape == (3, N_CLASSES)
    assert diag["teacher_distance"].dim() == 0


@pytest.mark.parametrize("model", ["test-local", "deeplabv3plus"])
def test_engine_loads_no_partner_stream(data_root, tmp_path, monkeypatch, model):
    """Two training steps through the engine: a single unlabeled stream, ``Batch.partner`` is None;
    with this file's network and with the preset's DeepLabV3+ (its own comp_drop)."""
    seen = []
    step = UniMatchV2.training_step

    def spy(self, batch, step_index):
        seen.append(batch.partner)
        return step(self, batch, step_index)

    monkeypatch.setattr(UniMatchV2, "training_step", spy)
    if model == "test-local":
        monkeypatch.setattr(trainer_module, "build_model", lambda cfg: CompDropNet(cfg.data.num_classes))
    cfg = load_config("synthetic", [
        f"data.root={data_root}", f"run_dir={tmp_path / 'run'}", "method.name=unimatch_v2", "method.ema_rule=ramp",
        "model.decoder_channels=16", "data.crop_size=32", "data.num_workers=0", "train.batch_size=2",
        "train.batch_size_unlabeled=2", "train.iters=2", "train.progress=false", "train.threads=1",
        "train.report=false"])
    result = train(cfg)
    assert result.iters == 2 and seen == [None, None]
    assert set(result.final) == {"student", "teacher"}


def test_only_the_labeled_pass_moves_deeplab_running_statistics():
    """On DeepLabV3+ (batch norm behind the complementary dropout, in ASPP and the decoder) a step
    leaves every running statistic where one train-mode pass over the labeled batch alone puts
    it; the strong pass still normalises with its own batch statistics (the losses are those of
    a student whose statistics the strong pass does move)."""
    cfg = load_config("synthetic", [f"data.num_classes={N_CLASSES}", "method.name=unimatch_v2"])
    torch.manual_seed(0)
    student = DeepLabV3Plus(N_CLASSES, backbone="resnet18", backbone_width=8, decoder_channels=16)
    method = build_method(cfg, student, iters_per_epoch=10)
    moving = copy.deepcopy(student)  # the release: both passes move the statistics
    labeled_only = copy.deepcopy(student)
    batch = make_batch(size=32)
    with torch.no_grad():
        labeled_only.train()(batch.labeled[0])
    torch.manual_seed(5)
    ours = method.training_step(batch, step=3)
    torch.manual_seed(5)
    released = literal_step(moving, method.teacher, batch)
    assert ours["loss"].item() == pytest.approx(released["loss"].item(), rel=1e-5)
    names = [n for n, _ in student.named_buffers()]
    assert any(n.startswith(("head.", "reduce.", "fuse.")) for n in names)
    for name, ours_buf, expected, release_buf in zip(names, student.buffers(), labeled_only.buffers(),
                                                     moving.buffers(), strict=True):
        assert torch.allclose(ours_buf, expected, atol=1e-6), name
    decoder_var = [(a, b) for n, a, b in zip(names, student.buffers(), moving.buffers())
                   if n.startswith("reduce.") and n.endswith("running_var")]
    assert decoder_var and not torch.allclose(*decoder_var[0], atol=1e-4)
