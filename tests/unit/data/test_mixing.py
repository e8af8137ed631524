"""Mixing metrics (`scldm_scale.data.mixing`) on hand-made orders over a hand-made sorted atlas (no SOMA)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scldm_scale.data.mixing import global_batches, mixing_report, rank_mixing_report

BATCH = 64
RUN = 512


@pytest.fixture(scope="module")
def atlas() -> dict[str, np.ndarray]:
    """40 datasets of log-normal sizes (706-10,340 cells, 114k in all) stored one after another, each sorted
    by one of 8 cell types: the layout where contiguous reads mix worst."""
    rng = np.random.default_rng(1)
    sizes = rng.lognormal(7.5, 0.8, 40).astype(np.int64) + 500
    dataset = np.repeat(np.arange(40), sizes)
    cell_type = np.concatenate([np.sort(rng.integers(0, 8, s)) for s in sizes])
    return {"dataset_id": dataset, "cell_type": cell_type}


def _cut(order: np.ndarray, size: int = BATCH) -> list[np.ndarray]:
    return [order[i : i + size] for i in range(0, len(order), size)]


def _block_shuffle(n: int, rng: np.random.Generator, chunk: int = RUN, block_chunks: int = 8) -> np.ndarray:
    """The loader's two-level shuffle: chunks of contiguous cells permuted, then cells within blocks."""
    chunks = [np.arange(i, min(i + chunk, n)) for i in range(0, n, chunk)]
    rng.shuffle(chunks)
    blocks = [np.concatenate(chunks[i : i + block_chunks]) for i in range(0, len(chunks), block_chunks)]
    return np.concatenate([rng.permutation(b) for b in blocks])


def _scores(report: dict) -> dict[str, float]:
    return {
        "dataset_id": report["labels"]["dataset_id"]["entropy_ratio"],
        "cell_type": report["labels"]["cell_type"]["entropy_ratio"],
        "runs": report["storage_runs"]["ratio"],
        "lag1": report["lag1"]["score"],
        "serial": report["lag1"]["serial_score"],
    }


def test_sequential_scores_about_zero(atlas):
    n = len(atlas["dataset_id"])
    scores = _scores(mixing_report(_cut(np.arange(n)), atlas, run_cells=RUN))
    assert all(0 <= v < 0.1 for v in scores.values()), scores


def test_random_scores_about_one(atlas):
    n = len(atlas["dataset_id"])
    order = np.random.default_rng(7).permutation(n)
    report = mixing_report(_cut(order), atlas, run_cells=RUN, seed=3)
    scores = _scores(report)
    assert all(abs(v - 1) < 0.05 for k, v in scores.items() if k not in ("lag1", "serial")), scores
    assert abs(scores["lag1"] - 1) < 0.1 and abs(scores["serial"] - 1) < 0.1, scores
    # the raw numbers are those of a well-mixed batch, not of the normalisation
    assert report["storage_runs"]["runs"] > 40
    assert report["labels"]["dataset_id"]["entropy"] > 2.0
    assert report["lag1"]["lag1"] < 0.9


def test_block_shuffle_lands_in_between(atlas):
    n = len(atlas["dataset_id"])
    order = _block_shuffle(n, np.random.default_rng(5))
    scores = _scores(mixing_report(_cut(order), atlas, run_cells=RUN))
    assert 0.3 < scores["dataset_id"] < 0.85, scores
    assert 0.02 < scores["runs"] < 0.5, scores
    assert 0.15 < scores["lag1"] < 0.7, scores
    assert 0.05 < scores["serial"] < 0.5, scores
    # with a buffer 4x larger the same loader mixes better on every score
    wider = _scores(
        mixing_report(
            _cut(_block_shuffle(n, np.random.default_rng(5), block_chunks=32)), atlas, run_cells=RUN
        )
    )
    assert all(wider[k] > scores[k] for k in scores), (scores, wider)


def test_reference_draws_from_the_covered_cells_only(atlas):
    """A random order over a subset (e.g. a filter) is as mixed as it can be: ~1, not its share of the atlas."""
    ds = atlas["dataset_id"]
    covered = np.flatnonzero(np.isin(ds, [5, 17, 30]))
    order = np.random.default_rng(2).permutation(covered)
    report = mixing_report(_cut(order), atlas, run_cells=RUN)
    assert abs(report["labels"]["dataset_id"]["entropy_ratio"] - 1) < 0.05
    assert report["labels"]["dataset_id"]["values"] == 3
    assert report["cells"] == len(covered)


def test_exact_values_on_a_tiny_order():
    labels = {"dataset_id": np.array([0, 0, 1, 1]), "cell_type": np.array([5, 5, 5, 5])}
    apart = mixing_report([np.array([0, 1]), np.array([2, 3])], labels, run_cells=2)
    assert apart["labels"]["dataset_id"]["entropy"] == 0.0
    assert apart["lag1"]["lag1"] == 0.0  # disjoint compositions
    assert apart["storage_runs"]["runs"] == 1.0
    mixed = mixing_report([np.array([0, 2]), np.array([3, 1])], labels, run_cells=2)
    assert mixed["labels"]["dataset_id"]["entropy"] == pytest.approx(np.log(2))
    assert mixed["lag1"]["lag1"] == pytest.approx(1.0)
    assert mixed["storage_runs"]["runs"] == 2.0
    # one value: no diversity to compare with, so no ratio (and still valid JSON)
    assert mixed["labels"]["cell_type"]["entropy_ratio"] is None
    json.dumps(mixed, allow_nan=False)


def test_lag1_and_far_pairs_exact():
    """Compositions A, A, B, B: consecutive cosines 1, 0, 1; batches two apart (half the stream) 0, 0."""
    labels = {"dataset_id": np.array([0, 0, 0, 0, 1, 1, 1, 1])}
    batches = [np.array([0, 1]), np.array([2, 3]), np.array([4, 5]), np.array([6, 7])]
    lag = mixing_report(batches, labels)["lag1"]
    assert lag["lag1"] == pytest.approx(2 / 3)
    assert lag["lag_far"] == 0.0
    assert lag["serial_score"] == pytest.approx(1 / 3)


def test_lag1_score_is_none_where_every_batch_looks_alike():
    """Two equal datasets in batches of 2,000 random cells: any two batches have cosine ~1, no score."""
    labels = {"dataset_id": np.repeat([0, 1], 10_000)}
    order = np.random.default_rng(0).permutation(20_000)
    lag = mixing_report(_cut(order, 2000), labels)["lag1"]
    assert lag["lag1_random"] > 0.99 and lag["lag1"] > 0.99
    assert lag["score"] is None and lag["serial_score"] is None


def test_global_batches_concatenate_ranks_in_order():
    per_rank = [[np.array([0, 1]), np.array([2])], [np.array([10]), np.array([11, 12])]]
    got = global_batches(per_rank)
    assert [g.tolist() for g in got] == [[0, 1, 10], [2, 11, 12]]
    with pytest.raises(ValueError, match="different numbers of batches"):
        global_batches([[np.array([0])], []])


@pytest.mark.parametrize("world_size", [2, 4])
def test_global_batch_mixes_contiguous_rank_shares(atlas, world_size):
    """Ranks reading contiguous shares in order: each rank's batch is sequential, the global batch is not."""
    share = len(atlas["dataset_id"]) // world_size // RUN * RUN  # whole runs: a batch is one run of a rank
    per_rank = [_cut(np.arange(r * share, (r + 1) * share)) for r in range(world_size)]
    report = rank_mixing_report(per_rank, atlas, run_cells=RUN)
    assert report["world_size"] == world_size
    rank, glob = report["rank"], report["global"]
    assert rank["labels"]["dataset_id"]["entropy_ratio"] < 0.1
    assert glob["labels"]["dataset_id"]["entropy_ratio"] > rank["labels"]["dataset_id"]["entropy_ratio"] + 0.2
    assert rank["storage_runs"]["runs"] == 1.0
    assert glob["storage_runs"]["runs"] == world_size
    assert glob["mean_batch_cells"] == pytest.approx(world_size * BATCH, rel=0.01)
    assert glob["cells"] == rank["cells"] == world_size * share
    assert glob["batches"] * world_size == rank["batches"]


def test_lag1_pairs_stay_within_a_rank():
    """Each rank yields one dataset throughout: consecutive batches of a rank are identical (lag-1 = 1); a
    pair across the end of one rank and the start of the next (cosine 0) must not be counted."""
    labels = {"dataset_id": np.repeat(np.arange(3), 100)}
    per_rank = [_cut(np.arange(r * 100, (r + 1) * 100), 10) for r in range(3)]
    report = rank_mixing_report(per_rank, labels, run_cells=1000)
    assert report["rank"]["lag1"]["lag1"] == pytest.approx(1.0)
    assert report["rank"]["lag1"]["lag_far"] == pytest.approx(1.0)
    assert report["global"]["labels"]["dataset_id"]["entropy"] == pytest.approx(np.log(3))
