"""SOMA atlas storage: the schema, the committed state, discarding uncommitted writes, appends.

Owns the on-disk layout described in DEVELOPERS.md ("Atlas layout"). It does not read or validate input
files (that is `_source.py`). Every write follows the commit protocol of `_commit.py` (readers see the last
committed write only); local atlases are in addition staged and published atomically (`_staging.py`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import tiledbsoma

from data_pipelines._commit import META_WRITE, CommitInfo, open_committed, read_commit

logger = logging.getLogger(__name__)

MEASUREMENT_NAME = "RNA"
LAYER_NAME = "raw"
FORMAT_VERSION = "1"
META_FORMAT = "scldm_scale.format_version"
META_DATASETS = "scldm_scale.datasets"
META_LABEL_COLUMNS = "scldm_scale.label_columns"
SPLIT_COLUMN = "split"
"""obs column holding each cell's split; ingestion always writes it (the last obs column)."""
SPLIT_VALUES = ("train", "val", "test")
GENERATED_SPLIT = "generated"
"""`split` of generated cells appended by `launchers/generate.py`: kept on ingestion, never assigned, and
outside every default training / validation / evaluation filter."""
INT32_MAX = int(np.iinfo(np.int32).max)
FLOAT32_EXACT_MAX = 2**24
"""X is float32 on disk (int and float readers agree); integers up to 2**24 are stored exactly."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def soma_context(
    uri: str, s3_endpoint_url: str | None = None, s3_verify_tls: bool = True
) -> tiledbsoma.SOMATileDBContext:
    """The shared `make_soma_context` for s3:// URIs (TLS verified unless `s3_verify_tls` is False); a
    default context for local paths.

    Imported lazily: `scldm_scale.data` pulls in torch (seconds), which local ingestion does not need.
    """
    if not is_s3(uri):
        return tiledbsoma.SOMATileDBContext()
    from scldm_scale.data.context import make_soma_context

    return make_soma_context(uri, s3_endpoint_url, verify_tls=s3_verify_tls)


def atlas_exists(uri: str, ctx: tiledbsoma.SOMATileDBContext | None = None) -> bool:
    """True when `uri` holds a SOMA Experiment (`ctx`: default `soma_context(uri)`)."""
    if not is_s3(uri) and not os.path.exists(uri):
        return False
    return bool(tiledbsoma.Experiment.exists(uri, context=ctx or soma_context(uri)))


# ---- reading the current state -------------------------------------------------------------------------


@dataclass
class AtlasState:
    """What an append needs to know about an existing atlas (empty for a new one)."""

    exists: bool = False
    n_obs: int = 0
    obs_columns: list[str] = field(default_factory=list)
    var: pd.DataFrame = field(
        default_factory=lambda: pd.DataFrame(columns=["feature_id", "feature_name", "n_cells"])
    )
    datasets: list[dict] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    commit: CommitInfo = field(default_factory=CommitInfo)
    """The commit keys (read at the latest state); everything else is read at the last commit."""

    @property
    def label_columns(self) -> list[str]:
        """obs columns other than the ids, `split` and `nnz`."""
        return [
            c
            for c in self.obs_columns
            if c not in ("soma_joinid", "obs_id", "dataset_id", SPLIT_COLUMN, NNZ_COLUMN)
        ]

    @property
    def has_split(self) -> bool:
        """A new atlas gets a split column; one written before ingestion assigned splits may lack it."""
        return not self.exists or SPLIT_COLUMN in self.obs_columns

    @property
    def dataset_ids(self) -> list[str]:
        return [d["dataset_id"] for d in self.datasets]


def read_state(uri: str, ctx: tiledbsoma.SOMATileDBContext) -> AtlasState:
    """Read obs size and columns, the whole var table and the metadata of the atlas at `uri`, as of its last
    commit (what a failed write left after it is not counted).

    Raises:
        ValueError: `uri` is not a SOMA Experiment, or one that was never committed.
    """
    if not atlas_exists(uri, ctx):
        if not is_s3(uri) and os.path.exists(uri) and os.listdir(uri):
            raise ValueError(f"{uri}: exists but is not a SOMA Experiment")
        return AtlasState()
    info = read_commit(uri, ctx)
    with open_committed(uri, ctx, info) as exp:
        if "obs" not in exp or "ms" not in exp or MEASUREMENT_NAME not in exp.ms:
            raise ValueError(
                f"{uri}: an incomplete atlas (no obs or ms/{MEASUREMENT_NAME}); delete it and ingest again"
            )
        obs_columns = list(exp.obs.schema.names)
        n_obs = int(exp.obs.count)
        var = exp.ms[MEASUREMENT_NAME].var.read().concat().to_pandas()
        metadata = dict(exp.metadata)
    var = var.sort_values("soma_joinid").reset_index(drop=True)
    return AtlasState(
        exists=True,
        n_obs=n_obs,
        obs_columns=obs_columns,
        var=var[["feature_id", "feature_name", "n_cells"]],
        datasets=json.loads(metadata.get(META_DATASETS, "[]")),
        metadata=metadata,
        commit=info,
    )


# ---- writing -----------------------------------------------------------------------------------------


NNZ_COLUMN = "nnz"
"""obs column: the cell's stored non-zero values (as in CELLxGENE Census); the loader sizes its reads by it."""
OBS_TYPES = {NNZ_COLUMN: pa.int64(), "is_primary_data": pa.bool_()}
"""obs columns that are not strings (every other obs column is a large_string label)."""


def _string_field(name: str) -> pa.Field:
    return pa.field(name, pa.large_string(), nullable=False)


def _obs_field(name: str) -> pa.Field:
    return pa.field(name, OBS_TYPES.get(name, pa.large_string()), nullable=False)


def create_atlas(
    uri: str,
    ctx: tiledbsoma.SOMATileDBContext,
    *,
    obs_columns: list[str],
    n_obs: int,
    n_vars: int,
    timestamp: int | None = None,
) -> None:
    """Create an empty experiment (obs, ms/RNA/var, ms/RNA/X/raw) sized (n_obs, n_vars).

    With `timestamp` (the commit protocol) the experiment records the write as started before its children
    are created: an interrupted creation is then recognised (`CommitInfo.never_committed`), not read.
    """
    obs_schema = pa.schema(
        [pa.field("soma_joinid", pa.int64(), nullable=False)] + [_obs_field(c) for c in obs_columns]
    )
    var_schema = pa.schema(
        [
            pa.field("soma_joinid", pa.int64(), nullable=False),
            _string_field("feature_id"),
            _string_field("feature_name"),
            pa.field("n_cells", pa.int64(), nullable=False),
        ]
    )
    with tiledbsoma.Experiment.create(uri, context=ctx, tiledb_timestamp=timestamp) as exp:
        exp.metadata[META_FORMAT] = FORMAT_VERSION
        if timestamp is not None:
            exp.metadata[META_WRITE] = timestamp
    with tiledbsoma.Experiment.open(uri, "w", context=ctx, tiledb_timestamp=timestamp) as exp:
        exp.add_new_dataframe(
            "obs", schema=obs_schema, index_column_names=["soma_joinid"], domain=[(0, n_obs - 1)]
        )
        rna = exp.add_new_collection("ms").add_new_collection(MEASUREMENT_NAME, tiledbsoma.Measurement)
        rna.add_new_dataframe(
            "var", schema=var_schema, index_column_names=["soma_joinid"], domain=[(0, n_vars - 1)]
        )
        rna.add_new_collection("X").add_new_sparse_ndarray(
            LAYER_NAME, type=pa.float32(), shape=(n_obs, n_vars)
        )


def resize_atlas(
    uri: str, ctx: tiledbsoma.SOMATileDBContext, *, n_obs: int, n_vars: int, timestamp: int | None = None
) -> None:
    """Grow obs, var and X to at least (n_obs, n_vars) at `timestamp`; must be reopened before writing the
    new rows. Shapes never shrink: a failed write may have grown them already (they are then larger than the
    cells and genes stored; no reader relies on them)."""
    with tiledbsoma.Experiment.open(uri, "w", context=ctx, tiledb_timestamp=timestamp) as exp:
        rna = exp.ms[MEASUREMENT_NAME]
        x = rna.X[LAYER_NAME]
        n_obs, n_vars = max(n_obs, x.shape[0]), max(n_vars, x.shape[1])
        if exp.obs.domain[0][1] + 1 < n_obs:
            exp.obs.change_domain([(0, n_obs - 1)])
        if rna.var.domain[0][1] + 1 < n_vars:
            rna.var.change_domain([(0, n_vars - 1)])
        if tuple(x.shape) != (n_obs, n_vars):
            x.resize((n_obs, n_vars))


def discard_uncommitted(
    uri: str, ctx: tiledbsoma.SOMATileDBContext, timestamp: int, *, n_obs: int, n_vars: int
) -> None:
    """Delete what writes after the last commit left: obs and X rows from `n_obs`, var rows from `n_vars`
    (the committed sizes). TileDB delete commits at `timestamp - 1`: they hide those cells from readers at or
    after it, not from the committed state (older), nor the new write's own data (at `timestamp`). var rows
    below `n_vars` that a failed write rewrote are superseded by the new write's whole var table."""
    if not hasattr(tiledbsoma.SparseNDArray, "delete_cells"):
        raise RuntimeError(
            f"{uri}: discarding what an uncommitted write left needs a tiledbsoma with delete support "
            f"(mode='d', delete_cells); this one is {tiledbsoma.__version__}: upgrade it and ingest again"
        )
    with tiledbsoma.Experiment.open(uri, "d", context=ctx, tiledb_timestamp=timestamp - 1) as exp:
        rna = exp.ms[MEASUREMENT_NAME]
        for frame, start in ((exp.obs, n_obs), (rna.var, n_vars)):
            if frame.domain[0][1] >= start:
                frame.delete_cells((slice(start, None),))
        x = rna.X[LAYER_NAME]
        if x.shape[0] > n_obs:
            x.delete_cells((slice(n_obs, None),))


def write_var(exp: tiledbsoma.Experiment, var: pd.DataFrame) -> None:
    """(Re)write the whole var table: existing rows keep their soma_joinid, n_cells is updated."""
    exp.ms[MEASUREMENT_NAME].var.write(
        pa.table(
            {
                "soma_joinid": np.arange(len(var), dtype=np.int64),
                "feature_id": pa.array(var["feature_id"].astype(str).tolist(), pa.large_string()),
                "feature_name": pa.array(var["feature_name"].astype(str).tolist(), pa.large_string()),
                "n_cells": var["n_cells"].to_numpy(np.int64),
            }
        )
    )


_GLOBAL_ORDER = tiledbsoma.TileDBWriteOptions(sort_coords=False)
"""Writes in TileDB global order: ~8x faster than letting TileDB sort an unordered write (measured)."""


def write_obs(exp: tiledbsoma.Experiment, start: int, columns: dict[str, np.ndarray | pa.Array]) -> None:
    """Write obs rows [start, start + n) with the given columns (every obs column but soma_joinid): strings,
    or the types of `OBS_TYPES`; Arrow arrays are cast, anything else converted."""
    n = len(next(iter(columns.values())))
    table = {"soma_joinid": np.arange(start, start + n, dtype=np.int64)}
    for name, values in columns.items():
        kind = OBS_TYPES.get(name, pa.large_string())
        if isinstance(values, pa.Array | pa.ChunkedArray):
            table[name] = values.cast(kind)
        elif kind == pa.large_string():
            table[name] = pa.array(np.asarray(values, dtype=object).tolist(), kind)
        else:
            table[name] = pa.array(np.asarray(values), kind)
    exp.obs.write(pa.table(table), platform_config=_GLOBAL_ORDER)  # increasing joinids: global order


def _global_order(rows: np.ndarray, cols: np.ndarray, tiles: tuple[int, int]) -> np.ndarray | None:
    """Permutation putting COO entries in TileDB global order (row-major tiles, row-major cells); None if already."""
    if cols.max() < tiles[1]:  # one column tile: global order is plain row-major order
        key = rows * (int(cols.max()) + 1) + cols
        if np.all(key[1:] > key[:-1]):
            return None
    return np.lexsort((cols, rows, cols // tiles[1], rows // tiles[0]))


def _tile_extents(array: tiledbsoma.SparseNDArray) -> tuple[int, int]:
    dims = json.loads(array.schema_config_options().dims)
    return int(dims["soma_dim_0"]["tile"]), int(dims["soma_dim_1"]["tile"])


def write_x(exp: tiledbsoma.Experiment, rows: np.ndarray, cols: np.ndarray, data: np.ndarray) -> None:
    """Write COO entries (obs soma_joinid, var soma_joinid, count; no duplicates) to X/raw as float32."""
    if len(data) == 0:
        return
    array = exp.ms[MEASUREMENT_NAME].X[LAYER_NAME]
    rows, cols = rows.astype(np.int64, copy=False), cols.astype(np.int64, copy=False)
    data = data.astype(np.float32, copy=False)
    order = _global_order(rows, cols, _tile_extents(array))
    if order is not None:
        rows, cols, data = rows[order], cols[order], data[order]
    array.write(
        pa.table({"soma_dim_0": rows, "soma_dim_1": cols, "soma_data": data}), platform_config=_GLOBAL_ORDER
    )
