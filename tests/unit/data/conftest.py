"""Small SOMA experiments shared by the loader tests (built once per session)."""

from __future__ import annotations

import pytest
from soma_test_atlas import write_test_atlas


@pytest.fixture(scope="session")
def small_atlas(tmp_path_factory) -> str:
    """600 cells (3 datasets stored one after another) x 50 genes; every 5th cell is `split == 'val'`."""
    return write_test_atlas(str(tmp_path_factory.mktemp("atlas") / "small"))


@pytest.fixture(scope="session")
def remapped_atlas(tmp_path_factory) -> str:
    """Same genes as `small_atlas` in reverse var order, 5 of them replaced by genes of another name."""
    uri = str(tmp_path_factory.mktemp("atlas") / "remapped")
    return write_test_atlas(uri, n_cells=120, seed=3, reverse_genes=True, extra_genes=5)
