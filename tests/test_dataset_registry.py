"""Datasets come from one registry: a layout registered in a test alone is accepted by the config,
offered by the command line and checked by ``dssn check-data``, with its own class names."""

from pathlib import Path

import pytest

from dssn.cli import build_parser, main
from dssn.config import ConfigError, load_config
from dssn.data import DatasetSpec, class_names_for, palette_for
from dssn.data.check import check_full
from dssn.data.layouts import voc_pool
from dssn.registry import DATASETS

TOY_CLASSES = ("sky", "ground", "disc", "square", "star", "stripe", "blob")  # 7, as the built-in dataset


@pytest.fixture
def toy():
    """A layout known to nothing but this registration (the built-in dataset's files, other names)."""
    DATASETS.add("toy", DatasetSpec("JPEGImages/<id>.jpg, SegmentationClass/<id>.png", voc_pool, TOY_CLASSES,
                                    palette=((1, 2, 3),)))
    yield "toy"
    DATASETS.remove("toy")


def test_an_unregistered_dataset_is_refused_with_the_registered_ones():
    with pytest.raises(ConfigError, match=r"data\.dataset.*'toy'.*pascal, cityscapes, coco, ade20k, folder"):
        load_config("synthetic", ["data.dataset=toy"])


def test_a_dataset_registered_in_the_test_alone_is_everywhere(toy, data_root, capsys):
    cfg = load_config("synthetic", ["data.dataset=toy", f"data.root={data_root}"])
    assert class_names_for(cfg) == list(TOY_CLASSES) and palette_for(cfg)[:3] == [1, 2, 3]

    # The command line offers it to `dssn splits` (choices are read when the parser is built).
    args = build_parser().parse_args(["splits", "toy", str(data_root), "--labeled", "2"])
    assert args.dataset == "toy"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["prepare", "toy", str(data_root)])  # it has no prepare step
    capsys.readouterr()

    # check-data reads it with its own class names.
    report = check_full(cfg, workers=0, progress=False)
    assert report.dataset == "toy" and report.class_names == list(TOY_CLASSES) and not report.problems
    assert main(["check-data", "synthetic", "data.dataset=toy", f"data.root={data_root}", "--fast"]) == 0


def test_the_docs_table_lists_every_registered_layout():
    text = (Path(__file__).parents[1] / "docs" / "design.md").read_text()
    for name in DATASETS:
        assert f"| `{name}` | {DATASETS[name].layout} |" in text, name
