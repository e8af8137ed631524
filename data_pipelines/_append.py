"""Write validated input datasets into an atlas as one committed write (`_commit.py`).

A new atlas is created and committed empty first (so that an interrupted first ingest leaves an empty atlas,
not an unreadable one); then one write at a fresh timestamp discards what an earlier failed write left,
grows the shapes, appends obs and X dataset after dataset, rewrites var (union vocabulary, n_cells) and
commits the datasets metadata. Until that commit, readers (the loader, `read_state`) see the previous state.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable

import numpy as np
import pandas as pd
import tiledbsoma
from tqdm.auto import tqdm

from data_pipelines._atlas import (
    META_DATASETS,
    META_LABEL_COLUMNS,
    NNZ_COLUMN,
    SPLIT_COLUMN,
    AtlasState,
    create_atlas,
    discard_uncommitted,
    resize_atlas,
    write_obs,
    write_var,
    write_x,
)
from data_pipelines._commit import CommitInfo, begin_write, commit, next_timestamp
from data_pipelines._source import Source

logger = logging.getLogger(__name__)


def plan_var(state: AtlasState, sources: list[Source]) -> tuple[pd.DataFrame, list[np.ndarray]]:
    """Union vocabulary: stored genes keep their soma_joinid, new genes are appended; n_cells is summed."""
    var = state.var.copy()
    index = {fid: i for i, fid in enumerate(var["feature_id"].astype(str))}
    new_ids, new_names = [], []
    maps = []
    for src in sources:
        gene_map = np.empty(len(src.feature_ids), dtype=np.int64)
        for j, (fid, fname) in enumerate(zip(src.feature_ids, src.feature_names)):
            if fid not in index:
                index[fid] = len(index)
                new_ids.append(fid)
                new_names.append(fname)
            gene_map[j] = index[fid]
        maps.append(gene_map)
    n_cells = np.concatenate([var["n_cells"].to_numpy(np.int64), np.zeros(len(new_ids), np.int64)])
    for src, gene_map in zip(sources, maps):
        np.add.at(n_cells, gene_map, src.n_cells_per_gene)
    out = pd.DataFrame(
        {
            "feature_id": list(var["feature_id"].astype(str)) + new_ids,
            "feature_name": list(var["feature_name"].astype(str)) + new_names,
            "n_cells": n_cells,
        }
    )
    return out, maps


def _start(
    target: str,
    ctx: tiledbsoma.SOMATileDBContext,
    state: AtlasState,
    labels: list[str],
    n_obs: int,
    n_vars: int,
) -> int:
    """Create (and commit empty) or prepare the atlas; return the timestamp of this write, already begun.

    A pre-protocol atlas (no commit keys) is first committed as it is, so that a failure of this write leaves
    it readable (at that commit), not "never committed"."""
    info = state.commit
    if not state.exists:
        created = next_timestamp(CommitInfo())
        columns = ["obs_id", "dataset_id", *labels, SPLIT_COLUMN, NNZ_COLUMN]
        create_atlas(target, ctx, obs_columns=columns, n_obs=n_obs, n_vars=n_vars, timestamp=created)
        commit(target, ctx, created, {META_DATASETS: "[]", META_LABEL_COLUMNS: json.dumps(labels)})
        info = CommitInfo(created, created)
    elif info.committed is None:  # written before the protocol: adopt its latest state as the committed one
        adopted = next_timestamp(info)
        commit(target, ctx, adopted, {})
        info = CommitInfo(adopted, adopted)
    timestamp = next_timestamp(info)
    begin_write(target, ctx, timestamp)
    if state.exists and info.has_leftovers:
        logger.warning(
            "%s: discarding what an uncommitted write (timestamp %d) left after the last commit (%s)",
            target,
            info.last_write,
            info.committed,
        )
        discard_uncommitted(target, ctx, timestamp, n_obs=state.n_obs, n_vars=len(state.var))
    if state.exists:
        resize_atlas(target, ctx, n_obs=n_obs, n_vars=n_vars, timestamp=timestamp)
    return timestamp


def write_sources(
    target: str,
    ctx: tiledbsoma.SOMATileDBContext,
    state: AtlasState,
    sources: list[Source],
    labels: list[str],
    var: pd.DataFrame,
    maps: list[np.ndarray],
    *,
    chunk_rows: int,
    experiment_metadata: dict,
    dataset_extra: Callable[[Source], dict],
) -> list[dict]:
    """Append `sources` (gene maps `maps` into the new `var`) to the atlas at `target` and commit.

    Returns:
        The datasets metadata of the atlas after the write (stored ones first); `dataset_extra(src)` adds
        keys to a new dataset's entry.
    """
    n_total = state.n_obs + sum(s.n_obs for s in sources)
    timestamp = _start(target, ctx, state, labels, n_total, len(var))
    datasets = list(state.datasets)
    offset = state.n_obs
    with_nnz = not state.exists or NNZ_COLUMN in state.obs_columns  # atlases written before it lack it
    with (
        tiledbsoma.Experiment.open(target, "w", context=ctx, tiledb_timestamp=timestamp) as exp,
        tqdm(total=n_total - state.n_obs, unit="cells", desc="ingest", file=sys.stderr, disable=None) as bar,
    ):
        for src, gene_map in zip(sources, maps):
            for start, chunk in src.iter_chunks(chunk_rows):
                stop = start + chunk.shape[0]
                cols = {
                    "obs_id": src.obs_ids[start:stop],
                    "dataset_id": np.full(stop - start, src.dataset_id, object),
                }
                cols.update({c: src.labels[c][start:stop] for c in labels})
                if src.split is not None:
                    cols[SPLIT_COLUMN] = src.split[start:stop]
                chunk.eliminate_zeros()
                if with_nnz:
                    cols[NNZ_COLUMN] = chunk.getnnz(axis=1).astype(np.int64)
                write_obs(exp, offset + start, cols)
                coo = chunk.tocoo()
                write_x(exp, coo.row.astype(np.int64) + offset + start, gene_map[coo.col], coo.data)
                bar.update(stop - start)
            datasets.append(
                {
                    "dataset_id": src.dataset_id,
                    "source": src.name,
                    "n_cells": src.n_obs,
                    "n_genes": len(src.feature_ids),
                    "nnz": src.nnz,
                    "obs_joinid_start": offset,
                    "obs_joinid_stop": offset + src.n_obs,
                    **dataset_extra(src),
                }
            )
            offset += src.n_obs
        write_var(exp, var)
    metadata = {META_DATASETS: json.dumps(datasets), META_LABEL_COLUMNS: json.dumps(labels)}
    commit(target, ctx, timestamp, {**metadata, **experiment_metadata})
    return datasets
