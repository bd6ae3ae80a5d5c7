"""Fixtures shared by the test modules."""

import pytest

from dssn.apps.synthetic import make_synthetic


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """A tiny built-in dataset (32 train, 4 val images of 48x48), generated once per session.

    Tests only read it; their runs write to their own run folders."""
    return make_synthetic(tmp_path_factory.mktemp("synthetic"), seed=0, num_train=32, num_val=4, size=48)
