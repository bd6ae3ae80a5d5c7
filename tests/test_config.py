"""Presets carry the paper's settings; mistakes are reported with key, place and a suggestion."""

import pytest

from dssn.config import ConfigError, load_config, preset_names


def test_presets_match_spec_table():
    assert {"pascal", "cityscapes", "coco", "synthetic"} <= set(preset_names())
    p = load_config("pascal")
    # The paper's 4 GPUs x (2 + 2), as a global batch the engine splits over the processes it has.
    assert (p.data.num_classes, p.data.crop_size) == (21, 513)
    assert (p.train.global_batch, p.train.global_batch_unlabeled) == (8, 8)
    assert p.train.batch_size is None and p.train.batch_size_unlabeled is None
    assert (p.train.epochs, p.train.lr, p.train.lr_multi, p.train.labeled_loss) == (100, 0.002, 10, "ce")
    assert (p.method.selection, p.method.tau_low, p.method.ratio, p.data.strong_ops) == ("cplg", 0.92, 0.96, True)
    assert (p.method.lambda_c, p.method.weight_x, p.method.weight_u, p.method.ema_momentum) == (0.005, 0.5, 0.125, 0.996)
    assert p.model.backbone == "resnet101" and p.model.output_stride == 16 and p.model.dilations == (6, 12, 18)
    assert p.method.warmup_steps == 1 and p.eval.mode == "whole"
    c = load_config("cityscapes")
    assert (c.data.num_classes, c.data.crop_size, c.train.global_batch, c.train.epochs) == (19, 801, 4, 240)
    assert (c.train.lr, c.train.lr_multi, c.train.labeled_loss, c.train.ohem_thresh, c.train.ohem_min_kept) == (
        0.005, 1, "ohem", 0.7, 100000)
    assert (c.method.selection, c.method.threshold, c.data.strong_ops, c.method.warmup_epochs) == (
        "threshold", 0.0, False, 5)
    assert c.eval.mode == "sliding" and c.eval.crop_size == 801 and c.eval.stride_ratio == pytest.approx(2 / 3)
    k = load_config("coco")
    assert (k.data.num_classes, k.data.crop_size, k.train.epochs, k.train.lr, k.train.lr_multi) == (81, 513, 30, 0.004, 10)


def test_overrides_are_typed():
    cfg = load_config("pascal", ["train.lr=0.01", "method.name=fixmatch", "data.strong_ops=false",
                                 "model.dilations=[12,24,36]", "model.pretrained=null"])
    assert cfg.train.lr == 0.01 and cfg.method.name == "fixmatch" and cfg.data.strong_ops is False
    assert cfg.model.dilations == (12, 24, 36) and cfg.model.pretrained is None


def test_unknown_key_names_the_key_and_the_closest():
    with pytest.raises(ConfigError, match=r"unknown key 'train\.lrr'.*'train\.lr'"):
        load_config("pascal", ["train.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"unknown key 'methd'.*'method'"):
        load_config("pascal", ["methd.name=dssn"])


def test_bad_value_names_the_key():
    with pytest.raises(ConfigError, match=r"train\.lr"):
        load_config("pascal", ["train.lr=fast"])
    with pytest.raises(ConfigError, match=r"method\.name"):
        load_config("pascal", ["method.name=meanteacher"])


def test_malformed_override():
    with pytest.raises(ConfigError, match="key=value"):
        load_config("pascal", ["train.lr"])


def test_user_file_with_base_and_its_errors(tmp_path):
    good = tmp_path / "mine.yaml"
    good.write_text("base: pascal\ntrain:\n  lr: 0.02\n")
    cfg = load_config(str(good))
    assert cfg.train.lr == 0.02 and cfg.data.crop_size == 513
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: pascal\ndata:\n  crop: 321\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*unknown key 'data\.crop'.*'data\.crop_size'"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="Did you mean: pascal"):
        load_config("pascl")
