"""Each method's own ``method`` section: every key is read, another method's key is refused
with who reads it, and configs saved with the old shared section still load."""

import pytest
import torch
import yaml
from tests.test_methods import N_CLASSES, make_batch

import dssn
from dssn.cli import main
from dssn.config import FLAT_METHOD_KEYS, ConfigError, build_config, load_config, method_config_class
from dssn.engine.rundir import config_diff, read_run_config
from dssn.method import METHODS, Batch
from dssn.models import check_model_config


class ReadRecorder:
    """Stands in for a method's config section and records each key the method reads."""

    def __init__(self, section):
        object.__setattr__(self, "_section", section)
        object.__setattr__(self, "reads", set())

    def __getattr__(self, key):
        self.reads.add(key)
        return getattr(self._section, key)


def exercise(name, *overrides):
    """Every path of the method: construction, a logged step, the teacher update, pseudo labels, weights."""
    cfg = load_config("synthetic", ["model.backbone=resnet18", "model.decoder_channels=16",
                                    f"data.num_classes={N_CLASSES}", f"method.name={name}", *overrides])
    torch.manual_seed(0)
    student = dssn.DeepLabV3Plus(N_CLASSES, backbone="resnet18", decoder_channels=16, backbone_width=8)
    recorder = ReadRecorder(cfg.method)
    method = METHODS[name](student, recorder, cfg.train, 10)
    method.collect_diagnostics = True
    batch = make_batch()
    if not method.uses_partner_batch:
        batch = Batch(batch.labeled, batch.unlabeled)
    for step in (0, 20):  # inside and after the first epoch (DSSN's teacher batch norm, its warm-up)
        method.training_step(batch, step)
        method.after_optimizer_step(step)
    method.pseudo_labels(batch.unlabeled.weak if batch.unlabeled is not None else batch.labeled[0])
    method.loss_weights()
    return recorder.reads


@pytest.mark.parametrize("name, variants", [
    ("dssn", [[], ["method.selection=threshold"]]),
    ("fixmatch", [[]]),
    ("unimatch_v2", [[]]),
    ("supervised", [[]]),
])
def test_every_key_of_each_method_section_is_read_by_that_method(name, variants):
    reads = set().union(*(exercise(name, *v) for v in variants))
    keys = set(method_config_class(name).model_fields) - {"name"}  # the name is read by build_method
    assert keys - reads == set(), f"{name} never reads these method.* keys"


def test_methods_have_sections_of_their_own():
    assert set(method_config_class("supervised").model_fields) == {"name"}
    assert set(method_config_class("fixmatch").model_fields) == {"name", "threshold", "tau_low", "ratio"}
    assert "weight_u" not in method_config_class("unimatch_v2").model_fields
    assert set(method_config_class("dssn").model_fields) == FLAT_METHOD_KEYS


@pytest.mark.parametrize("overrides, message", [
    (["method.name=unimatch_v2", "method.weight_u=2"],
     r"method\.weight_u: unimatch_v2 does not read it; it is a setting of dssn"),
    (["method.threshold=0.5"], r"method\.threshold: dssn reads it only with method\.selection=threshold"),
    (["method.name=fixmatch", "method.lambda_c=0.1"], r"method\.lambda_c: fixmatch does not read it; .*dssn"),
    (["method.name=supervised", "method.threshold=0.9"],
     r"method\.threshold: supervised does not read it; it is a setting of dssn, fixmatch, unimatch_v2"),
    (["train.iters=-5"], r"key 'train\.iters': Input should be greater than 0 \(got -5\)"),
    (["method.tau_low=1.5"], r"key 'method\.tau_low': Input should be less than or equal to 1"),
    (["train.lr=.nan"], r"key 'train\.lr'"),
])
def test_a_setting_that_would_change_nothing_is_refused_before_a_run_folder(overrides, message, tmp_path,
                                                                             capsys):
    with pytest.raises(ConfigError, match=message):
        load_config("synthetic", overrides)
    run_dir = tmp_path / "run"
    assert main(["train", "synthetic", f"run_dir={run_dir}", *overrides]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not run_dir.exists()


@pytest.mark.parametrize("content", [b"hello\n", b"", b"\x89PNG\r\n\x1a\n0000", b"{\"model\": 1}"])
def test_a_weights_file_that_is_not_one_is_named_before_a_run_folder(content, data_root, tmp_path, capsys):
    weights = tmp_path / "weights.pth"
    weights.write_bytes(content)
    run_dir = tmp_path / "run"
    assert main(["train", "synthetic", f"data.root={data_root}", f"run_dir={run_dir}",
                 f"model.pretrained={weights}"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "model.pretrained" in err and str(weights) in err and "neither a PyTorch" in err
    assert not run_dir.exists()
    missing = tmp_path / "missing.pth"
    assert main(["train", "synthetic", f"data.root={data_root}", f"run_dir={run_dir}",
                 f"model.pretrained={missing}"]) == 2
    assert "not found" in capsys.readouterr().err and not run_dir.exists()


def test_switching_the_method_leaves_the_presets_keys_for_the_old_one_behind():
    cfg = load_config("pascal-dinov2", ["method.name=unimatch_v2"])  # the preset writes selection: cplg
    assert cfg.method.name == "unimatch_v2" and cfg.method.ema_rule == "ramp"  # a key both read carries over
    assert not hasattr(cfg.method, "selection")
    assert load_config("cityscapes", ["method.name=fixmatch"]).method.threshold == 0.0
    assert load_config("cityscapes", ["method.selection=cplg"]).method.selection == "cplg"  # its threshold dropped
    with pytest.raises(ConfigError, match=r"method\.teacher_bn: fixmatch does not read it"):
        load_config("pascal", ["method.name=fixmatch", "method.teacher_bn=batch"])


def test_a_user_file_for_another_method_is_refused_with_the_file(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("base: pascal\nmethod:\n  name: unimatch_v2\n  lambda_c: 0.1\n")
    with pytest.raises(ConfigError, match=r"mine\.yaml.*method\.lambda_c: unimatch_v2 does not read it"):
        load_config(str(mine))


def flat_section(name, **values):
    """A method section in the form every version before per-method sections saved."""
    section = {"name": name, "selection": "cplg", "tau_low": 0.92, "ratio": 0.96, "threshold": 0.95,
               "loss_image": True, "loss_feature": True, "align_image": True, "align_feature": True,
               "lambda_c": 0.005, "weight_x": 0.5, "weight_u": 0.125, "ema_momentum": 0.996,
               "ema_rule": "copy_first", "teacher_bn": "released", "warmup_steps": 1, "warmup_epochs": 0.0}
    assert set(section) == FLAT_METHOD_KEYS
    return {**section, **values}


@pytest.mark.parametrize("name", ["dssn", "fixmatch", "unimatch_v2", "supervised"])
def test_a_run_folder_saved_with_the_shared_section_still_resumes(name, tmp_path):
    today = load_config("synthetic", [f"method.name={name}", f"run_dir={tmp_path}"])
    saved = today.model_dump(mode="json")
    saved["method"] = flat_section(name, threshold=0.8, tau_low=0.5, ema_rule="ramp")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    old = read_run_config(tmp_path)
    assert old is not None and old.method.name == name
    for key in ("threshold", "tau_low", "ema_rule"):  # the values it ran with, where the method reads them
        if key in type(old.method).model_fields:
            expected = 0.95 if (name, key) == ("dssn", "threshold") else saved["method"][key]
            assert getattr(old.method, key, expected) == expected
    resumed = load_config(str(tmp_path / "config.yaml"))  # dssn train RUN/config.yaml run_dir=RUN
    assert config_diff(old, resumed) == []
    assert build_config(old.to_dict()) == old  # today's saved form loads as itself


def test_train_help_lists_each_methods_keys(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "fixmatch: threshold, tau_low, ratio;" in text
    assert "unimatch_v2: threshold, ema_momentum, ema_rule, tau_low, ratio;" in text
    assert "supervised: none." in text
    assert "dssn: tau_low, ratio, threshold, ema_momentum, ema_rule, selection, loss_image" in text


@pytest.mark.parametrize("preset, overrides, message", [
    ("pascal", ["model.registers=4"], r"model\.registers: model\.name=deeplabv3plus does not read it; .*=dpt"),
    ("pascal-dinov2", ["model.output_stride=8"], r"model\.output_stride: model\.name=dpt does not read it"),
    ("pascal-dinov2", ["method.name=unimatch_v2", "model.feature_dropout=complementary"],
     r"model\.feature_dropout: unimatch_v2 perturbs no feature streams; it is read with method\.name=dssn"),
])
def test_a_model_key_the_network_or_method_does_not_read_is_refused(preset, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(preset, overrides)


def test_switching_the_network_leaves_the_base_networks_keys_behind(tmp_path):
    dinov2 = load_config("synthetic-dinov2")  # its base, synthetic, sets decoder_channels for DeepLabV3+
    assert dinov2.model.name == "dpt" and "decoder_channels" not in dinov2.to_dict()["model"]
    saved = dinov2.model_dump(mode="json")  # as earlier versions saved it: every model key
    saved["model"]["decoder_channels"] = 32
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    assert config_diff(read_run_config(tmp_path), dinov2) == []


def test_a_crop_the_vit_cannot_take_is_refused_with_the_resize_rule(tmp_path, capsys):
    overrides = ["model.backbone=dinov2_tiny", "model.pretrained=null", "data.crop_size=13"]
    cfg = load_config("synthetic-dinov2", overrides)
    with pytest.raises(ConfigError, match=r"data\.crop_size=13 is smaller than the ViT's patch \(14 pixels\).*nearest"):
        check_model_config(cfg)
    check_model_config(load_config("synthetic-dinov2", [*overrides[:2], "data.crop_size=15"]))  # resized to 14
    assert main(["train", "synthetic-dinov2", f"run_dir={tmp_path / 'run'}", *overrides]) == 2
    assert "data.crop_size=13" in capsys.readouterr().err and not (tmp_path / "run").exists()
