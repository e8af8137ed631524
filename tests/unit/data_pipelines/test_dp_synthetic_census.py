"""Synthetic atlas, census layout: obs schema, log-normal contiguous datasets, the within-dataset sort order,
per-cell nnz, determinism, Census-style value filters; and the layout argument."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import scipy.sparse as sp
import tiledbsoma

from data_pipelines import _census_layout as census
from data_pipelines import synthetic_atlas as syn

N_CELLS, N_GENES, N_DATASETS, CHUNK = 4000, 30, 50, 700
"""CHUNK is smaller than the largest datasets: they are written in several chunks."""


def _write(path: str, *, seed: int = 0, chunk_cells: int = CHUNK, layout: str = "census") -> dict:
    return syn.write_synthetic_atlas(
        path,
        n_cells=N_CELLS,
        n_genes=N_GENES,
        n_datasets=N_DATASETS,
        seed=seed,
        chunk_cells=chunk_cells,
        layout=layout,
    )


def _read(uri: str) -> tuple[pd.DataFrame, sp.csr_matrix, dict, pa.Schema]:
    """(obs in joinid order, X as CSR, metadata, obs schema)."""
    with tiledbsoma.Experiment.open(uri) as exp:
        obs = exp.obs.read().concat().to_pandas().sort_values("soma_joinid").reset_index(drop=True)
        x = exp.ms["RNA"].X["raw"]
        t = x.read().tables().concat()
        shape, meta, schema = x.shape, dict(exp.metadata), exp.obs.schema
    coo = (t["soma_data"].to_numpy(), (t["soma_dim_0"].to_numpy(), t["soma_dim_1"].to_numpy()))
    return obs, sp.csr_matrix(coo, shape=shape), meta, schema


@pytest.fixture(scope="module")
def atlas(tmp_path_factory) -> tuple[str, dict]:
    path = str(tmp_path_factory.mktemp("census") / "atlas")
    return path, _write(path, seed=3)


@pytest.fixture(scope="module")
def atlas_data(atlas) -> tuple[pd.DataFrame, sp.csr_matrix, dict, pa.Schema]:
    return _read(atlas[0])


def test_obs_columns_and_types(atlas_data):
    obs, _, meta, schema = atlas_data
    string = pa.large_string()
    assert [(f.name, f.type) for f in schema] == [
        ("soma_joinid", pa.int64()),
        ("obs_id", string),
        ("dataset_id", string),
        ("cell_type", string),
        ("donor_id", string),
        ("assay", string),
        ("tissue", string),
        ("is_primary_data", pa.bool_()),
        ("split", string),
        ("nnz", pa.int64()),
    ]
    assert obs["soma_joinid"].tolist() == list(range(N_CELLS)) and obs["obs_id"].is_unique
    assert obs["obs_id"].iloc[0] == "ds00_c000000000"
    assert set(obs["cell_type"]) <= set(census.CELL_TYPES) and set(obs["assay"]) <= set(census.ASSAYS)
    assert set(obs["tissue"]) <= set(census.TISSUES) and set(obs["split"]) == {"train", "val", "test"}
    assert abs((obs["split"] == "train").mean() - 0.8) < 0.03
    per = obs.groupby("dataset_id")
    assert (per[["assay", "tissue", "is_primary_data"]].nunique() == 1).all().all()  # one per dataset
    assert per["cell_type"].nunique().max() <= 30 and per["donor_id"].nunique().max() <= 20
    assert (obs["donor_id"].str.rsplit("_d", n=1).str[0] == obs["dataset_id"]).all()
    primary = per["is_primary_data"].first()
    assert 0 < (~primary).sum() < 0.4 * N_DATASETS  # ~15 % of datasets are not primary
    assert meta["synthetic_layout"] == "census"


def test_datasets_lognormal_and_contiguous(atlas, atlas_data):
    obs, _, meta, _ = atlas_data
    datasets = json.loads(meta["scldm_scale.datasets"])
    assert datasets == atlas[1]["datasets"] and len(datasets) == N_DATASETS
    sizes = np.array([d["n_cells"] for d in datasets])
    assert sizes.sum() == N_CELLS and sizes.min() >= 1
    assert sizes.max() / np.median(sizes) > 5  # log-normal, sigma 1.5: a few big datasets, many small ones
    assert sizes.max() > 2 * CHUNK  # the largest datasets span several chunks
    stops = np.cumsum(sizes)
    assert [(d["obs_joinid_start"], d["obs_joinid_stop"]) for d in datasets] == list(
        zip(np.r_[0, stops[:-1]].tolist(), stops.tolist())
    )
    expected = np.repeat([d["dataset_id"] for d in datasets], sizes)
    assert (obs["dataset_id"].to_numpy() == expected).all()  # stored one after another, in joinid order


def test_sorted_by_donor_and_cell_type_within_each_dataset(atlas_data):
    obs = atlas_data[0]
    for _, cells in obs.groupby("dataset_id", sort=False):
        keys = list(zip(cells["donor_id"], cells["cell_type"]))
        assert keys == sorted(keys)
        assert cells["soma_joinid"].diff().iloc[1:].eq(1).all()


def test_nnz_column_is_the_stored_row_nnz(atlas_data, tmp_path):
    obs, x, _, _ = atlas_data
    assert x.nnz > 0 and (x.data > 0).all()
    assert (obs["nnz"].to_numpy() == np.diff(x.indptr)).all()
    path = str(tmp_path / "blocks")
    syn.write_synthetic_atlas(path, n_cells=300, n_genes=N_GENES, n_datasets=3, chunk_cells=64)
    obs_b, x_b, meta_b, schema_b = _read(path)
    assert schema_b.names == ["soma_joinid", "obs_id", "dataset_id", "cell_type", "split", "nnz"]
    assert schema_b.field("nnz").type == pa.int64() and meta_b["synthetic_layout"] == "blocks"
    assert (obs_b["nnz"].to_numpy() == np.diff(x_b.indptr)).all()


def test_deterministic_by_seed(atlas_data, tmp_path):
    obs, x, meta, _ = atlas_data
    same = _read(_write(str(tmp_path / "same"), seed=3)["atlas_uri"])
    assert (
        same[0].equals(obs)
        and (same[1] != x).nnz == 0
        and same[2]["scldm_scale.datasets"] == meta["scldm_scale.datasets"]
    )
    other = _write(str(tmp_path / "other"), seed=4)
    assert [d["n_cells"] for d in other["datasets"]] != [
        d["n_cells"] for d in json.loads(meta["scldm_scale.datasets"])
    ]


def test_labels_and_order_do_not_depend_on_the_chunk_size(atlas_data, tmp_path):
    """The plan (sizes, donors, cell types, storage order) is decided before sampling, whatever the chunks."""
    obs = atlas_data[0]
    whole = _read(_write(str(tmp_path / "one_chunk"), seed=3, chunk_cells=N_CELLS)["atlas_uri"])[0]
    planned = ["obs_id", "dataset_id", "cell_type", "donor_id", "assay", "tissue", "is_primary_data"]
    assert whole[planned].equals(obs[planned])


@pytest.mark.parametrize(
    ("value_filter", "expected"),
    [
        ("is_primary_data == True and tissue == 'lung'", lambda o: o.is_primary_data & (o.tissue == "lung")),
        ("is_primary_data == False", lambda o: ~o.is_primary_data),
        (
            "assay in ['10x 3\\' v3', 'Smart-seq2'] and split == 'train'",
            lambda o: o.assay.isin(["10x 3' v3", "Smart-seq2"]) & (o.split == "train"),
        ),
        (
            """assay in ["10x 3' v2", "10x 5' v1"] or cell_type == 'type_010'""",
            lambda o: o.assay.isin(["10x 3' v2", "10x 5' v1"]) | (o.cell_type == "type_010"),
        ),
        ("dataset_id == 'ds07' and nnz >= 3", lambda o: (o.dataset_id == "ds07") & (o.nnz >= 3)),
    ],
)
def test_census_style_value_filters(atlas, atlas_data, value_filter, expected):
    obs = atlas_data[0]
    with tiledbsoma.Experiment.open(atlas[0]) as exp:
        got = exp.obs.read(value_filter=value_filter, column_names=["soma_joinid"]).concat()
    want = obs.loc[expected(obs), "soma_joinid"]
    assert len(want) > 0
    assert sorted(got["soma_joinid"].to_pylist()) == want.tolist()


def test_lognormal_sizes_exact_and_at_least_one():
    for n_cells, k in ((10, 10), (11, 10), (1000, 7), (10**7, 500)):
        sizes = census.lognormal_sizes(n_cells, k, np.random.default_rng(0))
        assert sizes.sum() == n_cells and sizes.min() >= 1 and len(sizes) == k
    a, b = (census.lognormal_sizes(10**6, 300, np.random.default_rng(s)) for s in (1, 1))
    assert (a == b).all()


def test_pieces_cover_a_chunk_in_order():
    plan = census.plan_datasets(100, ["a", "b", "c"], np.random.default_rng(0))
    got = [(ds.dataset_id, lo, hi) for ds, lo, hi in census.pieces(plan, 0, 100)]
    assert [g[0] for g in got] == ["a", "b", "c"] and sum(hi - lo for _, lo, hi in got) == 100
    mid = plan[1].start + 1
    assert [(ds.dataset_id, lo) for ds, lo, _ in census.pieces(plan, mid, mid + 1)] == [("b", 1)]


def test_bad_layout_is_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"layout='cencus'.*blocks, census"):
        syn.write_synthetic_atlas(str(tmp_path / "a"), n_cells=10, n_genes=5, n_datasets=1, layout="cencus")
    assert not (tmp_path / "a").exists()
    with pytest.raises(SystemExit):
        syn.main(["--atlas", str(tmp_path / "b"), "--cells", "10", "--genes", "5", "--layout", "cencus"])
    assert "invalid choice: 'cencus'" in capsys.readouterr().err


def test_cli_census(tmp_path, capsys):
    uri = str(tmp_path / "c")
    assert (
        syn.main(["--atlas", uri, "--cells", "200", "--genes", "8", "--datasets", "20", "--layout", "census"])
        == 0
    )
    assert "200 cells x 8 genes, 20 datasets (census layout)" in capsys.readouterr().out
