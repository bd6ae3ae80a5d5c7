"""Confusion-matrix mIoU and the inference modes (docs/method.md §7)."""

import math

import pytest
import torch

import dssn
from dssn.engine.evaluate import confusion_matrix, evaluate, predict, sliding_window_logits, window_starts
from nets import PixelwiseNet


def test_confusion_matrix_and_miou_by_hand():
    target = torch.tensor([[0, 0, 1, 1, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 1, 0, 2]])
    conf = confusion_matrix(pred, target, 3)
    assert conf.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]  # the 255 pixel is not counted
    miou, per_class = dssn.mean_iou(conf)
    # class 0: 1 / (2 + 2 - 1); class 1: 2 / (3 + 2 - 2); class 2: 0 / (1 + 0 - 0)
    assert per_class.tolist() == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert miou == pytest.approx(1 / 3)


def test_miou_accumulates_over_the_set_not_per_image():
    a = confusion_matrix(torch.tensor([0, 0, 0, 1]), torch.tensor([0, 0, 0, 0]), 2)
    b = confusion_matrix(torch.tensor([1]), torch.tensor([1]), 2)
    miou, per_class = dssn.mean_iou(a + b)
    assert per_class.tolist() == pytest.approx([3 / 4, 1 / 2])
    assert miou == pytest.approx(5 / 8)


def test_class_absent_everywhere_is_left_out():
    conf = confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 1]), 3)
    miou, per_class = dssn.mean_iou(conf)
    assert math.isnan(per_class[2]) and miou == 1.0


def test_window_starts_cover_and_stay_inside():
    assert window_starts(10, 4, 3) == [0, 3, 6]
    assert window_starts(4, 4, 3) == [0]
    for size, win, stride in [(97, 32, 21), (33, 32, 21), (64, 32, 21)]:
        starts = window_starts(size, win, stride)
        covered = torch.zeros(size, dtype=torch.bool)
        for s in starts:
            assert 0 <= s and s + win <= size
            covered[s : s + win] = True
        assert covered.all()



def test_sliding_window_matches_whole_image_for_a_pixelwise_model():
    net = PixelwiseNet().eval()
    image = torch.randn(2, 3, 23, 37)
    whole = net(image).argmax(1)
    slid = sliding_window_logits(net, image, 4, window=16, stride=10, batch_size=3)
    assert torch.equal(slid.argmax(1), whole)


def test_sliding_window_covering_the_image_equals_whole_image():
    model = dssn.DeepLabV3Plus(3, backbone="resnet18", decoder_channels=16).eval()
    image = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        whole = model(image).softmax(1)
        slid = predict(model, image, 3, "sliding", crop_size=48)
    assert torch.allclose(slid, whole, atol=1e-6)


def test_evaluate_scores_several_models_in_one_pass():
    net = PixelwiseNet()
    images = torch.randn(3, 3, 8, 8)
    target = net(images).argmax(1)
    target[0, 0, 0] = 255
    batches = [(images[i : i + 1], target[i : i + 1]) for i in range(3)]
    results = evaluate({"a": net, "b": net}, batches, 4, torch.device("cpu"))
    assert results["a"].miou == pytest.approx(1.0) and torch.equal(results["a"].confusion, results["b"].confusion)
    assert results["a"].confusion.sum() == 3 * 64 - 1
    assert net.training  # the mode is restored
