"""Shared fixtures: the embedded demo atlas and small synthetic SOMA atlases, built once per test session.

The whole session points `SCLDM_SCALE_DEMO_ATLAS` at a pytest temp dir, so no test writes to ~/.cache and code
that builds the demo atlas by default (launchers, `ensure_demo_atlas()`) finds the session's copy.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

DEMO_ATLAS_ENV = "SCLDM_SCALE_DEMO_ATLAS"
NODE_CACHE_ENV = "SCLDM_SCALE_NODE_CACHE"


def _set_env(name: str, value: str) -> Iterator[str]:
    """Set an environment variable for the session, restoring the earlier value (or its absence) afterwards."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield value
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


@pytest.fixture(scope="session", autouse=True)
def _node_cache_location(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Point the loaders' default node-local cache (`data.node_cache_dir: auto`) at a session temp dir."""
    yield from _set_env(NODE_CACHE_ENV, str(tmp_path_factory.mktemp("node_cache")))


@pytest.fixture(scope="session", autouse=True)
def _demo_atlas_location(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Point the default demo atlas location at a session temp dir (restored afterwards)."""
    yield from _set_env(DEMO_ATLAS_ENV, str(tmp_path_factory.mktemp("demo") / "demo_atlas"))


@pytest.fixture(scope="session")
def demo_atlas(_demo_atlas_location: str) -> str:
    """Path of the demo atlas (10,900 cells, 3 datasets, `split` column), built once per session (~3 s)."""
    from data_pipelines.demo import ensure_demo_atlas

    return ensure_demo_atlas(_demo_atlas_location)


@pytest.fixture(scope="session")
def synthetic_atlas_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., str]:
    """`make(n_cells=2000, n_genes=200, n_datasets=4, seed=0) -> path`; each distinct argument set is built once.

    Atlases are shared across tests: treat them as read-only (copy one before appending to it).
    """
    from data_pipelines.synthetic_atlas import write_synthetic_atlas

    cache: dict[tuple[int, int, int, int], str] = {}
    root = tmp_path_factory.mktemp("synthetic")

    def make(n_cells: int = 2000, n_genes: int = 200, n_datasets: int = 4, seed: int = 0) -> str:
        key = (n_cells, n_genes, n_datasets, seed)
        if key not in cache:
            path = str(root / f"synth_{n_cells}x{n_genes}_k{n_datasets}_s{seed}")
            write_synthetic_atlas(
                path, n_cells=n_cells, n_genes=n_genes, n_datasets=n_datasets, seed=seed, chunk_cells=1000
            )
            cache[key] = path
        return cache[key]

    return make


@pytest.fixture(scope="session")
def synthetic_atlas(synthetic_atlas_factory: Callable[..., str]) -> str:
    """A 2,000 cells x 200 genes x 4 datasets synthetic atlas (read-only, shared by the session)."""
    return synthetic_atlas_factory()
