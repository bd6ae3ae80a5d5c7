"""Tests for the glyph task's pretrained encoder (dssn.apps.glyph_encoder) and the packaged weights."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dssn.apps.glyph_encoder import (ENCODER_NAME, TRAINED_ON_VERSION, Recipe, knn_probe, load_images, load_masks,
                                     nt_xent, pretrain_encoder, simclr_views)
from dssn.apps.glyphs import GENERATOR_VERSION, make_glyphs
from dssn.config import load_config
from dssn.models import build_backbone, build_model
from dssn.models.sources import is_remote, packaged_weights_path, resolve_weights
from dssn.models.weights import load_backbone_weights


@pytest.fixture(scope="module")
def signs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Freshly generated signs at the demo's size: 64 training images (16 labeled) and 48 validation ones."""
    return make_glyphs(tmp_path_factory.mktemp("glyphs"), seed=7, num_train=64, num_val=48, labeled_fraction=0.25)


def _split(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    return load_images(folder, split), load_masks(folder, split)


def test_nt_xent_by_hand():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-0.6, 0.8]])  # rows i and i+2 are a pair
    t = 0.5
    unit = z / z.norm(dim=1, keepdim=True)
    expected = 0.0
    for i in range(4):
        positive = (i + 2) % 4
        others = [j for j in range(4) if j != i]
        sims = {j: float(unit[i] @ unit[j]) / t for j in others}
        expected += -sims[positive] + math.log(sum(math.exp(s) for s in sims.values()))
    assert nt_xent(z, t).item() == pytest.approx(expected / 4, rel=1e-6)


def test_views_are_seeded_crops_that_keep_the_centre():
    images = torch.rand(4, 3, 64, 64)
    centres = torch.zeros(4, 2)
    first = simclr_views(images, centres, torch.Generator().manual_seed(1))
    again = simclr_views(images, centres, torch.Generator().manual_seed(1))
    other = simclr_views(images, centres, torch.Generator().manual_seed(2))
    assert first.shape == (4, 3, Recipe.crop, Recipe.crop)
    assert torch.equal(first, again) and not torch.equal(first, other)
    # A view of an image whose centre square is white and whose rest is black: the crop (22 to 44
    # pixels around a centre moved by at most 6) always holds white, recoloured but brighter or
    # darker than the rest as a whole, never uniform.
    square = torch.zeros(64, 3, 64, 64)
    square[:, :, 26:38, 26:38] = 1.0
    views = simclr_views(square, torch.zeros(64, 2), torch.Generator().manual_seed(3))
    spread = views.amax((1, 2, 3)) - views.amin((1, 2, 3))
    assert bool((spread > 1.0).all())


def test_pretraining_is_deterministic(signs):
    images = load_images(signs, "splits/full/labeled.txt")

    class Short(Recipe):
        batch = 8

    a, b = (pretrain_encoder(images, Short, iters=2, log_every=0).state_dict() for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    fresh = build_backbone("resnet18", 16, 16).state_dict()
    assert any(not torch.equal(a[k], fresh[k]) for k in a if a[k].is_floating_point())


def test_the_packaged_encoder_is_named_and_loads_into_the_glyphs_preset():
    assert is_remote(ENCODER_NAME)
    path = resolve_weights(ENCODER_NAME)
    assert path == packaged_weights_path(ENCODER_NAME) and path.is_file()
    cfg = load_config("glyphs")
    assert cfg.model.pretrained == ENCODER_NAME
    model = build_model(cfg)  # raises on any key that does not line up
    state = torch.load(path, weights_only=True)
    loaded = model.backbone.state_dict()
    assert set(state) == set(loaded)
    assert all(torch.equal(loaded[k], state[k].to(loaded[k].dtype)) for k in state)


def test_the_packaged_encoder_names_signs_far_above_a_random_one(signs):
    """The file's reason to exist: a k-NN on its features, from 16 labeled images, names the digit of
    sign cells of new images well above chance (25%; 46.6% measured), where the same network at
    random initialisation stays near chance (25 to 29% over three initialisations)."""
    support, query = _split(signs, "splits/1_4/labeled.txt"), _split(signs, "splits/val.txt")
    pretrained = build_backbone("resnet18", 16, 16)
    load_backbone_weights(pretrained, ENCODER_NAME)
    torch.manual_seed(0)
    random = build_backbone("resnet18", 16, 16)
    assert knn_probe(pretrained.eval(), support, query, num_classes=5) > 0.40
    assert knn_probe(random.eval(), support, query, num_classes=5) < 0.34


def test_the_encoder_was_trained_on_this_generator_version():
    """A new generator version draws other images: retrain the file (python -m dssn.apps.glyph_encoder)
    and update TRAINED_ON_VERSION with it."""
    assert TRAINED_ON_VERSION == GENERATOR_VERSION
