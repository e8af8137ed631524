"""How well a loader's batches mix an atlas, measured against uniformly random batches of the same sizes.

Atlases store cells in runs: each dataset one after another (as Census does), and within a dataset often
sorted by donor or cell type. A loader that reads contiguous chunks for speed hands the model batches drawn
from few of those runs. Every number here compares the loader's batches with a *random reference*: the same
cells (the multiset the loader yielded), uniformly permuted and cut into batches of exactly the loader's
sizes, in the same streams. The reference is what a perfect shuffle would give on this atlas at this batch
size, so the entropy and runs scores mean the same thing on 8 equal datasets as on 600 of log-normal size (where raw entropies
differ a lot), and a filter such as `split == 'train'` is accounted for (the reference draws from the cells
the loader covered, not from the whole atlas).

Numbers (`mixing_report`):

* entropy, for each label (int codes indexed by soma_joinid, e.g. dataset_id, cell_type, donor_id): mean
  over batches of the Shannon entropy (nats) of the label within a batch; `entropy_ratio` = loader / random.
  1.0: batches as diverse as random ones; ~0: each batch holds one value (a sequential order over sorted
  cells). Within-dataset labels (cell_type, donor) show mixing inside a dataset, which the dataset_id entropy
  cannot see.
* lag-1 similarity of the batch composition (the `composition` label, dataset_id by default): `lag1`, the
  mean cosine similarity of the label's count histograms of consecutive batches of a stream. Consecutive
  batches cut from one shuffle buffer are alike, which correlates consecutive gradient steps; random batches
  are alike only as much as the label's distribution forces them to be (a dominant dataset makes any two
  batches similar). `score` = (1 - lag1) / (1 - lag1_random): 1.0 when consecutive batches are as different
  as random ones; ~0 when they have the same composition, as in a sequential order; above 1 when they differ
  more than random ones (e.g. each batch from one random dataset: the entropy shows that). Ill-conditioned
  when lag1_random is near 1 (a few equal datasets: any two random batches look alike), where each change
  of dataset of a sequential order (cosine ~0) can push the score above 1. `serial_score` =
  (1 - lag1) / (1 - lag_far) compares consecutive batches with the loader's own batches half a stream apart
  instead: ~0 when consecutive batches are more alike than distant ones (steps are correlated: sequential,
  or batches cut from one buffer), ~1 when adjacency does not matter (random), whatever the within-batch
  diversity. Both only for a label stored in long runs: on a label sorted within datasets a sequential order
  changes value every few batches. A score is None where its reference cosine is above 1 -
  `MIN_DISSIMILARITY` (nothing to measure).

and, for storage:

* storage runs: distinct runs of `run_cells` consecutive joinids (joinid // run_cells) per batch, i.e. how
  many places of the stored atlas a batch draws from; `storage_runs.ratio` = (runs - 1) / (runs_random - 1):
  ~0 when a batch is one contiguous read (sequential), 1.0 when it is as scattered as a random batch.

Ranks (`rank_mixing_report`): with data parallelism each rank yields its own micro-batches, and the optimiser
steps on the *global* batch t: rank 0's batch t, rank 1's batch t, ... concatenated. The global batch mixes
better than a rank's when ranks read different parts of the atlas, so both are reported.

This module imports only numpy (the package `scldm_scale.data` itself imports torch): usable from the
benchmarks and the tests without building a loader.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

DEFAULT_RUN_CELLS = 2048
"""Storage run length in cells (fixed, not the loader's chunk size, so that loaders with different chunks are
compared on the same storage runs)."""
MIN_RANDOM_BATCHES = 256
"""The random reference repeats its permutation until it has at least this many batches (few batches are
noisy)."""

MIN_DISSIMILARITY = 0.01
"""A lag-1 score is None when its reference pairs are this close to identical (1 - cosine below it): with a
few equal datasets and large batches every batch looks like every other, and the score would be noise."""

Streams = Sequence[Sequence[np.ndarray]]


def global_batches(per_rank: Streams) -> list[np.ndarray]:
    """The global batches across ranks: batch t = concatenation of every rank's batch t, in rank order.

    Args:
        per_rank: per rank, its batches in order (each an int array of soma_joinids).

    Raises:
        ValueError: no ranks, or ranks with different numbers of batches (data-parallel ranks step in lockstep,
            so a loader that yields unequal counts would hang or drop steps in training).
    """
    if not per_rank:
        raise ValueError("no ranks")
    counts = [len(b) for b in per_rank]
    if len(set(counts)) != 1:
        raise ValueError(f"ranks yield different numbers of batches: {counts}")
    return [np.concatenate([np.asarray(rank[t]) for rank in per_rank]) for t in range(counts[0])]


def _flatten(streams: Streams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(joinids of all batches, batch sizes, stream index per batch), empty batches left out."""
    batches = [(np.asarray(b, np.int64).ravel(), s) for s, stream in enumerate(streams) for b in stream]
    batches = [(b, s) for b, s in batches if len(b)]
    if not batches:
        raise ValueError("no cells in the batches")
    sizes = np.array([len(b) for b, _ in batches], np.int64)
    return np.concatenate([b for b, _ in batches]), sizes, np.array([s for _, s in batches], np.int64)


def _counts(codes: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Sparse per-batch histograms: (batch, code, count) of every non-zero bin, sorted, and the key width."""
    width = int(codes.max()) + 1
    batch = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
    keys, counts = np.unique(batch * width + codes, return_counts=True)
    return keys // width, keys, counts, width


def _batch_entropy(codes: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of `codes` within each batch."""
    b, _, c, _ = _counts(codes, sizes)
    p = c / sizes[b]
    return np.bincount(b, weights=-p * np.log(p), minlength=len(sizes))


def _batch_runs(joinids: np.ndarray, sizes: np.ndarray, run_cells: int) -> np.ndarray:
    """Distinct storage runs (joinid // run_cells) per batch."""
    b, _, _, _ = _counts(joinids // run_cells, sizes)
    return np.bincount(b, minlength=len(sizes)).astype(np.float64)


def _stream_pairs(stream: np.ndarray, far: bool) -> tuple[np.ndarray, np.ndarray]:
    """Batch pairs (i, j) within each stream: j = i + 1, or (far) j = i + half the stream's length."""
    bounds = np.flatnonzero(np.r_[True, stream[1:] != stream[:-1], True])
    first, second = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        k = max(1, (hi - lo) // 2) if far else 1
        i = np.arange(lo, hi - k)
        first.append(i)
        second.append(i + k)
    return np.concatenate(first), np.concatenate(second)


def _similarity(
    codes: np.ndarray, sizes: np.ndarray, stream: np.ndarray
) -> tuple[float | None, float | None]:
    """(lag-1, far): mean cosine similarity of the histograms of `codes` of consecutive batches of a stream,
    and of batches half the stream apart; None without such pairs."""
    b, keys, c, width = _counts(codes, sizes)
    c = c.astype(np.float64)
    norm = np.sqrt(np.bincount(b, weights=c * c, minlength=len(sizes)))
    out = []
    for far in (False, True):
        first, second = _stream_pairs(stream, far)
        if not len(first):
            out.append(None)
            continue
        partner = np.full(len(sizes), -1, np.int64)
        partner[second] = first  # each batch is the second of at most one pair
        e = np.flatnonzero(partner[b] >= 0)  # histogram bins of a second batch ...
        target = partner[b[e]] * width + (keys[e] - b[e] * width)  # ... the same bin of its first batch
        idx = np.minimum(np.searchsorted(keys, target), len(keys) - 1)
        hit = keys[idx] == target
        dot = np.bincount(partner[b[e[hit]]], weights=c[e[hit]] * c[idx[hit]], minlength=len(sizes))
        out.append(float(np.mean(dot[first] / (norm[first] * norm[second]))))
    return out[0], out[1]


def _random_reference(
    joinids: np.ndarray, sizes: np.ndarray, stream: np.ndarray, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The loader's cells uniformly permuted, cut into its batch sizes and streams (repeated with fresh
    permutations up to `MIN_RANDOM_BATCHES` batches)."""
    rng = np.random.default_rng(seed)
    reps = max(1, -(-MIN_RANDOM_BATCHES // len(sizes)))
    perm = np.concatenate([rng.permutation(joinids) for _ in range(reps)])
    offset = (np.arange(reps, dtype=np.int64) * (int(stream.max()) + 1))[:, None]
    return perm, np.tile(sizes, reps), (offset + stream[None, :]).ravel()


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 else None


def _lag_score(lag: float | None, ref: float | None) -> float | None:
    """(1 - lag) / (1 - ref), None when undefined or when `ref` is within MIN_DISSIMILARITY of identical."""
    if lag is None or ref is None or 1.0 - ref < MIN_DISSIMILARITY:
        return None
    return float((1.0 - lag) / (1.0 - ref))


def _report(
    streams: Streams, labels: Mapping[str, np.ndarray], run_cells: int, seed: int, composition: str
) -> dict[str, Any]:
    joinids, sizes, stream = _flatten(streams)
    rand_ids, rand_sizes, rand_stream = _random_reference(joinids, sizes, stream, seed)
    out: dict[str, Any] = {
        "batches": len(sizes),
        "cells": int(sizes.sum()),
        "mean_batch_cells": float(sizes.mean()),
        "labels": {},
        "lag1": None,
    }
    for name, table in labels.items():
        table = np.asarray(table)
        if joinids.max() >= len(table) or joinids.min() < 0:
            raise ValueError(f"label {name!r}: joinids outside its table of {len(table)} cells")
        codes, rand_codes = table[joinids].astype(np.int64), table[rand_ids].astype(np.int64)
        if codes.min() < 0:
            raise ValueError(f"label {name!r}: negative codes (expected codes >= 0 indexed by joinid)")
        h = float(_batch_entropy(codes, sizes).mean())
        h_rand = float(_batch_entropy(rand_codes, rand_sizes).mean())
        out["labels"][name] = {
            "values": int(len(np.unique(codes))),
            "entropy": h,
            "entropy_random": h_rand,
            "entropy_ratio": _ratio(h, h_rand),
        }
        if name == composition:
            lag, far = _similarity(codes, sizes, stream)
            lag_rand, _ = _similarity(rand_codes, rand_sizes, rand_stream)
            out["lag1"] = {
                "label": name,
                "lag1": lag,
                "lag1_random": lag_rand,
                "score": _lag_score(lag, lag_rand),
                "lag_far": far,
                "serial_score": _lag_score(lag, far),
            }
    runs = float(_batch_runs(joinids, sizes, run_cells).mean())
    runs_rand = float(_batch_runs(rand_ids, rand_sizes, run_cells).mean())
    out["storage_runs"] = {
        "run_cells": run_cells,
        "runs": runs,
        "runs_random": runs_rand,
        "ratio": _ratio(runs - 1.0, runs_rand - 1.0),
    }
    return out


def mixing_report(
    batches: Sequence[np.ndarray],
    labels: Mapping[str, np.ndarray],
    *,
    run_cells: int = DEFAULT_RUN_CELLS,
    seed: int = 0,
    composition: str = "dataset_id",
) -> dict[str, Any]:
    """Mixing of one stream of batches (one rank's, or the global batches), against random batches.

    Args:
        batches: the batches in the order yielded, each an int array of soma_joinids (padding left out).
        labels: per label name, int codes >= 0 indexed by soma_joinid (covering every joinid of the batches).
        run_cells: storage run length for `storage_runs` (joinid // run_cells).
        seed: seed of the random reference.
        composition: the label whose per-batch histograms `lag1` compares (`lag1` is None if it is not in `labels`).

    Returns:
        JSON-able dict: `batches`, `cells`, `mean_batch_cells`; `labels[name]` with `values` (distinct values
        seen), `entropy`, `entropy_random`, `entropy_ratio`; `lag1` with `label`, `lag1`, `lag1_random`,
        `score`, `lag_far`, `serial_score`; `storage_runs` with `run_cells`, `runs`, `runs_random`, `ratio` (module docstring). A ratio
        whose reference is 0 (a label with one value; lag-1 of fewer than 2 batches) is None, and so is a lag-1
        score whose reference cosine is within `MIN_DISSIMILARITY` of 1.
    """
    return _report([batches], labels, run_cells, seed, composition)


def rank_mixing_report(
    per_rank: Streams,
    labels: Mapping[str, np.ndarray],
    *,
    run_cells: int = DEFAULT_RUN_CELLS,
    seed: int = 0,
    composition: str = "dataset_id",
) -> dict[str, Any]:
    """Mixing of data-parallel ranks: each rank's micro-batches, and the global batches the optimiser sees.

    Args:
        per_rank: per rank, its batches in order (rank r's batch t is the r-th part of global batch t).
        labels, run_cells, seed, composition: as in `mixing_report`.

    Returns:
        `{"world_size": W, "rank": ..., "global": ...}`: `rank` is the report over every rank's batches
        (lag-1 pairs within a rank; the reference is cut into the same per-rank streams), `global` the report
        of `global_batches(per_rank)`.
    """
    return {
        "world_size": len(per_rank),
        "rank": _report(per_rank, labels, run_cells, seed, composition),
        "global": _report([global_batches(per_rank)], labels, run_cells, seed, composition),
    }
