"""The loader's read path: point reads in groups, batch gathers and padding, the memory model, worker threads."""

from __future__ import annotations

import numpy as np
import pytest
import tiledbsoma

from scldm_scale.config.data import SomaDataConfig
from scldm_scale.data import build_loader
from scldm_scale.data.budget import (
    BYTES_PER_CELL,
    READ_BYTES_PER_NNZ,
    READS_IN_FLIGHT,
    UNIT_BYTES_PER_NNZ,
    UNITS_IN_FLIGHT,
    unit_sizes,
)
from scldm_scale.data.collate import unpack_batch
from scldm_scale.data.packed import RowBatch
from scldm_scale.data.reader import TokenMap, _row_lengths, read_block, token_dtype


def _dense(uri: str) -> np.ndarray:
    with tiledbsoma.Experiment.open(uri) as exp:
        X = exp.ms["RNA"].X["raw"]
        t = X.read().tables().concat()
        out = np.zeros(X.shape, np.float32)
    out[t.column("soma_dim_0").to_numpy(), t.column("soma_dim_1").to_numpy()] = t.column(
        "soma_data"
    ).to_numpy()
    return out


@pytest.mark.parametrize("group_cells", [1, 7, 10_000])
def test_read_block_matches_a_dense_read(small_atlas, group_cells):
    dense = _dense(small_atlas)
    rng = np.random.default_rng(0)
    joinids = np.unique(np.concatenate([rng.choice(600, 40, replace=False), np.arange(100, 120)]))
    lut = np.arange(1, dense.shape[1] + 1)
    lut[[3, 4]] = 0  # two genes outside the vocabulary: dropped, library over the vocabulary only
    with tiledbsoma.Experiment.open(small_atlas) as exp:
        X = exp.ms["RNA"].X["raw"]
        block = read_block(X, joinids, TokenMap(lut), group_cells)
    assert block.tokens.dtype == np.uint16 and np.array_equal(block.joinids, joinids)
    for i, j in enumerate(joinids):
        lo, hi = block.indptr[i], block.indptr[i + 1]
        row = np.zeros(dense.shape[1] + 1, np.float32)
        row[block.tokens[lo:hi]] = block.counts[lo:hi]
        want = dense[j] * (lut > 0)
        np.testing.assert_array_equal(row[1:], want)
        assert block.library_size[i] == pytest.approx(want.sum())


def test_row_lengths_counts_cells_without_values_and_rejects_strays():
    d0 = np.array([2, 2, 5, 9, 9, 9])
    assert _row_lengths(d0, np.array([2, 3, 5, 7, 9])).tolist() == [2, 0, 1, 0, 3]
    assert _row_lengths(d0[:0], np.array([1, 2])).tolist() == [0, 0]
    with pytest.raises(RuntimeError, match="not asked for"):
        _row_lengths(d0, np.array([2, 9]))


def test_pack_and_pad_a_batch_straddling_two_blocks(small_atlas):
    dense = _dense(small_atlas)
    with tiledbsoma.Experiment.open(small_atlas) as exp:
        X = exp.ms["RNA"].X["raw"]
        tokens = TokenMap(np.arange(1, dense.shape[1] + 1))
        a = read_block(X, np.arange(0, 50), tokens, 16)
        b = read_block(X, np.arange(300, 330), tokens, 64)
    rows_a, rows_b = np.array([49, 3, 3, 10]), np.array([29, 0])
    rb = RowBatch([(a, rows_a), (b, rows_b)], np.arange(6)[:, None], np.array([0, 0, 1, 0, 0, 0], bool))
    batch = unpack_batch(rb.pack())
    cells = np.concatenate([rows_a, 300 + rows_b])
    assert batch["soma_joinid"].tolist() == cells.tolist()
    assert batch["gene_ids"].shape[1] == int((dense[cells] > 0).sum(1).max())
    for i, c in enumerate(cells):
        m = batch["mask"][i].numpy()
        assert m.sum() == (dense[c] > 0).sum() and not (batch["gene_ids"][i].numpy()[~m]).any()
        row = np.zeros(dense.shape[1] + 1, np.float32)
        row[batch["gene_ids"][i].numpy()[m]] = batch["counts"][i].numpy()[m]
        np.testing.assert_array_equal(row[1:], dense[c])
    assert batch["is_padding"].tolist() == [False, False, True, False, False, False]


def test_token_dtype_widens_past_uint16():
    assert token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.int32
    assert TokenMap(np.arange(1, 70_001)).dtype == np.int32


@pytest.mark.parametrize("workers", [0, 1, 2, 8])
@pytest.mark.parametrize("budget_mb", [16, 256, 1024])
def test_unit_sizes_keep_every_worker_within_its_share(workers, budget_mb):
    nnz, block = 130.0, 65_536
    unit, read = unit_sizes(budget_mb, workers, nnz, 256, block)
    held = unit * (nnz * UNITS_IN_FLIGHT * UNIT_BYTES_PER_NNZ + BYTES_PER_CELL)
    held += READS_IN_FLIGHT * read * nnz * READ_BYTES_PER_NNZ
    assert held <= budget_mb * 2**20 / max(1, workers) or unit == 256
    assert unit <= block and 1 <= read <= unit
    if budget_mb == 1024 and workers <= 1:
        assert (unit, read) == (block, block), "a whole block in one read when it fits"


def test_worker_thread_errors_reach_the_consumer(small_atlas, tmp_path):
    cfg = SomaDataConfig(atlas_uri=small_atlas, micro_batch_size=8, seed=0, num_workers=2, label_columns=[])
    loader = build_loader(cfg, rank=0, world_size=1)
    spec = loader.dataset.spec
    loader.dataset.spec = type(spec)(**{**spec.__dict__, "uri": str(tmp_path / "gone")})
    with pytest.raises(Exception, match="gone"):
        next(iter(loader))


def test_decode_sorts_an_unordered_read_result():
    import pyarrow as pa

    from scldm_scale.data.reader import decode_group

    table = pa.table(
        {
            "soma_dim_0": np.array([5, 5, 2, 2, 9, 2], np.int64),
            "soma_dim_1": np.array([0, 1, 2, 3, 4, 0], np.int64),
            "soma_data": np.arange(1, 7, dtype=np.float32),
        }
    )
    lengths, tok, val = decode_group(table, np.array([2, 5, 7, 9]), TokenMap(np.arange(1, 6)))
    assert lengths.tolist() == [3, 2, 0, 1]
    assert sorted(zip(tok[:3].tolist(), val[:3].tolist())) == [(1, 6.0), (3, 3.0), (4, 4.0)]
    assert tok[3:].tolist() == [1, 2, 5] and val[3:].tolist() == [1.0, 2.0, 5.0]


def test_arrow_memory_is_released_only_while_no_reading_thread_is_alive(small_atlas):
    """mimalloc's forced collection next to a reading thread crashed CI runs: a build skips it then."""
    from scldm_scale.data import reader

    assert reader.release_arrow_memory() is True
    cfg = SomaDataConfig(
        atlas_uri=small_atlas, micro_batch_size=8, shuffle_chunk_cells=8, shuffle_buffer_cells=16, seed=0
    )
    stream = iter(build_loader(cfg, rank=0, world_size=1))
    next(stream)  # the reading thread is alive, reading ahead
    assert reader.release_arrow_memory() is False
    # a build now (its obs pass would release the pool) still works, and releases nothing
    assert len(build_loader(cfg, rank=0, world_size=1)) > 0
    stream.close()  # joins the reading thread
    assert reader.release_arrow_memory() is True
