"""Property-based tests of the front door: whatever a user writes (overrides, YAML files, split
files, weight files) ends in a config or a ``DssnError`` that names the key, file or line, never
a traceback, and nothing is written outside the run folder.

Bounded for the suite (``DSSN_FUZZ_EXAMPLES`` per property, 60 by default); a longer run:
``DSSN_FUZZ_EXAMPLES=2000 pytest tests/test_front_door_fuzz.py``.
"""

import io
import os
import pickle
import re
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from dssn.config import Config, ConfigError, load_config
from dssn.data.check import check_before_training
from dssn.data.datasets import load_split
from dssn.engine.checkpoint import read_torch_file
from dssn.errors import DssnError
from dssn.models import check_model_config, check_pretrained, load_state_dict_file
from dssn.models.weights import WeightsError

EXAMPLES = int(os.environ.get("DSSN_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=EXAMPLES <= 60,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# Real keys (so that many examples get past the unknown-key check) and a few that are not.
KEYS = sorted({f"{section}.{key}" for section, field in Config.model_fields.items()
               if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
               for key in field.annotation.model_fields}
              | {"method.threshold", "method.tau_low", "method.ema_rule", "method.weight_u", "method.lambda_c",
                 "method.selection", "method.teacher_bn", "method.warmup_epochs", "name", "run_dir", "train", "method",
                 "trian.lr", "model.name.x", ""})
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["fixmatch", "unimatch_v2", "supervised", "dpt", "cplg", "threshold",
                                           "ramp", "sgd", "adamw", "sliding", "pascal", "folder", "1e400", ".nan"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6),
                                                                                           inner, max_size=3),
                      max_leaves=6)


def _yaml_value(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def assert_names_where(err: DssnError, *places: str) -> None:
    text = str(err)
    assert text and "\n" not in text.split(":")[0], text
    assert any(p and p in text for p in places), f"{text!r} names none of {places}"


def test_keys_cover_every_section():
    assert {"train.iters", "model.pretrained", "data.crop_size", "method.threshold", "eval.scales"} <= set(KEYS)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=1, max_size=4))
def test_override_lists_end_in_a_config_or_a_named_error(tmp_path, monkeypatch, pairs):
    monkeypatch.chdir(tmp_path)
    before = set(tmp_path.iterdir())
    overrides = [f"{key}={_yaml_value(value)}" for key, value in pairs]
    try:
        cfg = load_config("synthetic", overrides)
        check_model_config(cfg)
        check_pretrained(cfg)
    except DssnError as err:
        assert_names_where(err, "override", *(k.split(".")[-1] for k, _ in pairs if k), "command line",
                           "model.", "method.")
    assert set(tmp_path.iterdir()) == before  # nothing written


YAML_TEXT = st.one_of(
    st.builds(lambda d: yaml.safe_dump(d, allow_unicode=True),
              st.dictionaries(st.sampled_from(["model", "data", "method", "train", "eval", "diag", "base", "name",
                                               "modle", "run_dir"]),
                              st.one_of(VALUES, st.dictionaries(st.sampled_from([k.split(".")[-1] for k in KEYS]),
                                                                VALUES, max_size=4)), max_size=4)),
    st.text(alphabet=st.sampled_from(list("ab:- \t\n[]{}'\"#&*!|>%@`é日\x00\ufeff0123456789.")), max_size=80),
)


@FUZZ
@given(YAML_TEXT)
def test_yaml_files_end_in_a_config_or_an_error_naming_the_file(tmp_path_factory, text):
    folder = tmp_path_factory.mktemp("yaml")
    path = folder / "mine.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass") if "\x00" not in text else path.write_bytes(
        text.encode("utf-8"))
    try:
        load_config(str(path))
    except DssnError as err:
        assert_names_where(err, str(path), "mine.yaml", "preset", "base")
    assert sorted(p.name for p in folder.iterdir()) == ["mine.yaml"]


LINE = st.one_of(
    st.sampled_from(["JPEGImages/train_0000.png SegmentationClass/train_0000.png", "JPEGImages/nope.png",
                     "a b c", "", "   ", "JPEGImages/train_0001.png SegmentationClass/nope.png", "../../etc/passwd"]),
    st.text(max_size=30).filter(lambda s: "\n" not in s and "\r" not in s),
)


@FUZZ
@given(st.lists(LINE, max_size=6), st.binary(max_size=8))
def test_split_files_end_in_an_error_naming_the_file(data_root, tmp_path_factory, lines, tail):
    folder = tmp_path_factory.mktemp("split")
    split = folder / "labeled.txt"
    split.write_bytes("\n".join(lines).encode("utf-8", errors="surrogatepass") + tail)
    cfg = load_config("synthetic", [f"data.root={data_root}", f"data.labeled_split={split}"])
    try:
        check_before_training(cfg)
    except DssnError as err:
        assert_names_where(err, str(split), "labeled.txt")
    assert sorted(p.name for p in folder.iterdir()) == ["labeled.txt"]


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


GOOD = _torch_bytes({"w": torch.ones(2)})


class Foreign:
    """A class a weights file must never be allowed to instantiate."""


WEIGHTS = st.one_of(
    st.binary(max_size=64),
    st.integers(0, len(GOOD) - 1).map(lambda n: GOOD[:n]),  # truncated zips
    st.tuples(st.integers(0, len(GOOD) - 1), st.binary(min_size=1, max_size=4)).map(  # corrupted zips
        lambda t: GOOD[:t[0]] + t[1] + GOOD[t[0] + len(t[1]):]),
    st.sampled_from([pickle.dumps(Foreign()), pickle.dumps({"model": Foreign()}), pickle.dumps([1, 2]),
                     _torch_bytes([torch.ones(1)]), _torch_bytes({"a": 1}), b"hello\n", b"PK\x03\x04",
                     b"\x80\x02}q\x00.", b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}" + b" " * 8]),
)


@FUZZ
@given(WEIGHTS)
def test_weight_files_end_in_an_error_naming_the_file(tmp_path_factory, content):
    folder = tmp_path_factory.mktemp("weights")
    path = folder / "weights.pth"
    path.write_bytes(content)
    try:
        state = load_state_dict_file(path)
    except WeightsError as err:
        assert_names_where(err, str(path))
    else:
        assert all(isinstance(v, torch.Tensor) for v in state.values())
    cfg = load_config("synthetic", [f"model.pretrained={path}"])
    try:
        check_pretrained(cfg)
    except ConfigError as err:
        assert_names_where(err, str(path))
    assert sorted(p.name for p in folder.iterdir()) == ["weights.pth"]


def test_the_good_weights_file_loads(tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(GOOD)
    assert torch.equal(load_state_dict_file(path)["w"], torch.ones(2))
    with zipfile.ZipFile(io.BytesIO(GOOD)):  # the truncations above start from a real zip
        pass
    assert Path(path).stat().st_size == len(GOOD)


def test_a_split_file_that_is_not_utf8_names_its_line(tmp_path):
    """Found by the split-file property: a byte that is not UTF-8 ended in a UnicodeDecodeError traceback."""
    split = tmp_path / "labeled.txt"
    split.write_bytes(b"a.png b.png\nc\x80.png\n")
    with pytest.raises(DssnError, match=r"labeled\.txt.*2.*not UTF-8"):
        load_split(split)


@FUZZ
@given(WEIGHTS)
def test_checkpoint_files_end_in_an_error_naming_the_file(tmp_path_factory, content):
    """What ``dssn eval`` / ``predict`` / ``export`` and resuming read a checkpoint with."""
    folder = tmp_path_factory.mktemp("checkpoint")
    path = folder / "last.pt"
    path.write_bytes(content)
    try:
        read_torch_file(path)
    except DssnError as err:
        assert_names_where(err, str(path))
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt"]


@pytest.mark.parametrize("content", [b"t", b"q", b"\x80\x02"])
def test_a_one_byte_checkpoint_is_named(tmp_path, content):
    """Found by the checkpoint property: such files ended in IndexError from the unpickler."""
    path = tmp_path / "last.pt"
    path.write_bytes(content)
    with pytest.raises(DssnError, match=re.escape(str(path))):
        read_torch_file(path)
