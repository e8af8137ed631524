"""The loader's cell index (position -> joinid in under a byte per cell) and its nnz-driven unit sizing."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import tiledbsoma
from soma_test_atlas import write_test_atlas

from scldm_scale.config.data import SomaDataConfig
from scldm_scale.data import build_loader
from scldm_scale.data.budget import (
    BYTES_PER_CELL,
    READ_BYTES_PER_NNZ,
    READS_IN_FLIGHT,
    UNIT_BYTES_PER_NNZ,
    UNITS_IN_FLIGHT,
)
from scldm_scale.data.index import CellIndex, IndexBuilder
from scldm_scale.data.stream import _units

_N = 1_000_000
_rng = np.random.default_rng(0)
SELECTIONS = {
    "every cell": np.arange(_N),
    "split == 'train' (80 % at random)": np.flatnonzero(_rng.random(_N) < 0.8),
    "two datasets": np.concatenate([np.arange(10, 5_000), np.arange(9_000, 700_000)]),
    "0.1 % at random": np.flatnonzero(_rng.random(_N) < 0.001) + 5,
}


@pytest.mark.parametrize("name", SELECTIONS)
def test_index_maps_positions_to_joinids_in_under_a_fifth_of_a_byte_per_atlas_cell(name):
    joinids = SELECTIONS[name]
    builder = IndexBuilder()
    for lo in range(0, len(joinids), 77_777):  # as the obs slices arrive
        builder.add(joinids[lo : lo + 77_777])
    index = builder.finish()
    positions = np.random.default_rng(1).permutation(len(joinids))[:50_000]
    np.testing.assert_array_equal(index.joinids(positions), joinids[positions])
    np.testing.assert_array_equal(index.joinids(np.arange(len(joinids))), joinids)
    assert index.sha1 == hashlib.sha1(joinids.astype(np.int64).tobytes()).hexdigest()[:16]  # old fingerprint
    assert len(index) == len(joinids)
    # whichever encoding is smaller: at most the ranked bitmap, 1/8 + 4/64 B per joinid of the atlas span
    assert index.nbytes <= 0.1875 * (joinids[-1] + 64)
    if name in ("every cell", "two datasets"):
        assert index.encoding == "runs" and index.nbytes <= 64
    if name.startswith("split"):
        assert index.encoding == "bitmap" and index.nbytes / len(joinids) < 0.25


def test_index_refuses_unsorted_joinids_and_out_of_range_positions():
    builder = IndexBuilder()
    builder.add(np.array([3, 5, 9]))
    with pytest.raises(ValueError, match="ascending"):
        builder.add(np.array([7, 8]))
    index = CellIndex.from_joinids(np.array([3, 5, 9]))
    with pytest.raises(IndexError, match=r"\[0, 3\)"):
        index.joinids(np.array([3]))


def test_loader_holds_no_per_cell_array(tmp_path):
    """The loader spec's arrays: the index, one float per chunk, one token per gene: nothing per cell."""
    uri = write_test_atlas(str(tmp_path / "a"), n_cells=6_000, n_genes=20, density=0.3)
    cfg = SomaDataConfig(
        atlas_uri=uri,
        value_filter="split == 'train'",
        seed=0,
        micro_batch_size=64,
        shuffle_chunk_cells=64,
        shuffle_buffer_cells=512,
    )
    loader = build_loader(cfg, rank=0, world_size=2)
    spec = loader.dataset.spec
    arrays = [v for v in vars(spec).values() if isinstance(v, np.ndarray)]
    per_cell = spec.index.nbytes + sum(a.nbytes for a in arrays) - spec.var_to_token.nbytes
    assert per_cell <= spec.n_cells * 1.0, per_cell / spec.n_cells
    batch = next(iter(loader))  # labels still arrive, read with the cells
    assert batch["labels"].shape == (64, 2) and (batch["labels"] > 0).all()


@pytest.mark.parametrize("nnz_column", [True, False], ids=["obs nnz", "sampled nnz"])
def test_unit_sizes_keep_the_budget_on_a_heterogeneous_atlas(tmp_path, nnz_column):
    """Sparse datasets first, a dense one last (one dataset per block): units of the dense block shrink, and
    every unit stays within the worker's share.

    Sizing from the first cells (the old rule) would give every unit the sparse datasets' size: the dense
    blocks would then take ~10x the share.
    """
    uri = write_test_atlas(
        str(tmp_path / "h"),
        n_cells=4_000,
        n_genes=400,
        n_datasets=4,
        density=[0.02, 0.02, 0.02, 0.6],
        nnz_column=nnz_column,
    )
    with tiledbsoma.Experiment.open(uri) as exp:
        table = exp.ms["RNA"].X["raw"].read().tables().concat()
    true_nnz = np.bincount(table.column("soma_dim_0").to_numpy(), minlength=4_000)
    workers, budget_mb = 2, 4
    cfg = SomaDataConfig(
        atlas_uri=uri,
        value_filter=None,
        seed=0,
        micro_batch_size=16,
        num_workers=workers,
        shuffle_chunk_cells=1_000,
        shuffle_buffer_cells=1_000,
        memory_budget_mb=budget_mb,
    )
    spec = build_loader(cfg, rank=0, world_size=1).dataset.spec
    share = budget_mb * 2**20 / workers
    pieces = spec.order(0).fresh_pieces()
    sizes = []
    for worker in range(workers):
        for positions, _, read in _units(spec, 0, pieces, spec.slot(pieces, worker)):
            nnz = true_nnz[spec.index.joinids(positions)]
            held = len(positions) * (nnz.mean() * UNITS_IN_FLIGHT * UNIT_BYTES_PER_NNZ + BYTES_PER_CELL)
            held += READS_IN_FLIGHT * read * nnz.mean() * READ_BYTES_PER_NNZ
            assert held <= share * 1.1, (len(positions), nnz.mean(), held / share)
            sizes.append((nnz.mean(), len(positions)))
    dense = [n for m, n in sizes if m > 100]
    sparse = [n for m, n in sizes if m < 20]
    assert dense and sparse
    if nnz_column:  # measured per chunk: the dense block was cut smaller, the sparse ones stay whole
        assert max(dense) < min(sparse) / 3 and max(sparse) == 1_000
    else:  # sampled over the whole atlas: every block is sized for the densest part seen
        assert max(sparse) <= max(dense)
