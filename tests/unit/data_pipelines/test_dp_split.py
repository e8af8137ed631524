"""The `split` obs column ingestion writes: fractions, seed, stratification, kept input values, bad values,
appends, and an atlas written before splits existed."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
import tiledbsoma

from data_pipelines import _atlas, demo
from data_pipelines._source import MIN_STRATUM_CELLS, IngestError, stratified_split
from data_pipelines.ingest import ingest_anndata, main


def _obs(uri: str) -> pd.DataFrame:
    with tiledbsoma.Experiment.open(uri) as exp:
        return exp.obs.read().concat().to_pandas().sort_values("soma_joinid").reset_index(drop=True)


def _labelled(make_adata, n_cells: int, seed: int, types=("T", "B", "NK"), prefix: str = "c"):
    a = make_adata(n_cells=n_cells, n_genes=6, seed=seed, cell_prefix=prefix)
    a.obs["cell_type"] = pd.Categorical(np.random.default_rng(seed).choice(types, size=n_cells))
    return a


def test_default_fractions_and_stratification(tmp_path, make_adata):
    a, b = _labelled(make_adata, 1000, 1), _labelled(make_adata, 600, 2)
    summary = ingest_anndata(str(tmp_path / "x"), [a, b], dataset_ids=["a", "b"])
    obs = _obs(str(tmp_path / "x"))
    assert list(obs.columns)[-2:] == ["split", "nnz"] and set(obs["split"]) == {"train", "val", "test"}
    for _, group in obs.groupby(["dataset_id", "cell_type"]):  # every stratum ~80 / 10 / 10
        frac = group["split"].value_counts(normalize=True)
        assert abs(frac["train"] - 0.8) < 0.02 and abs(frac["val"] - 0.1) < 0.02, frac
    d = summary["datasets"][0]
    assert d["split"] == obs[obs["dataset_id"] == "a"]["split"].value_counts().to_dict()
    assert d["split_seed"] == 0 and d["split_fractions"] == [0.8, 0.1, 0.1] and d["split_kept"] == 0
    assert d["split_stratified_by"] == ["dataset_id", "cell_type"]


def test_fractions_option(tmp_path, make_adata):
    a = _labelled(make_adata, 1000, 1)
    ingest_anndata(str(tmp_path / "x"), [a], split_fractions=(0.5, 0.2, 0.3))
    counts = _obs(str(tmp_path / "x"))["split"].value_counts()
    assert abs(counts["train"] - 500) <= 3 and abs(counts["val"] - 200) <= 3 and abs(counts["test"] - 300) <= 3
    ingest_anndata(str(tmp_path / "y"), [a], split_fractions=(1.0, 0.0, 0.0))
    assert set(_obs(str(tmp_path / "y"))["split"]) == {"train"}
    for bad in [(0.8, 0.1), (0.8, 0.3, 0.1), (1.2, -0.1, -0.1)]:
        with pytest.raises(IngestError, match="split fractions"):
            ingest_anndata(str(tmp_path / "z"), [a], split_fractions=bad)


def test_seed_determinism(tmp_path, make_adata):
    a = _labelled(make_adata, 300, 1)
    for name, seed in (("s0", 0), ("s0_again", 0), ("s1", 1)):
        ingest_anndata(str(tmp_path / name), [a], split_seed=seed)
    s0, again, s1 = (_obs(str(tmp_path / n))["split"].to_numpy() for n in ("s0", "s0_again", "s1"))
    np.testing.assert_array_equal(s0, again)
    assert (s0 != s1).any()


def test_a_dataset_split_does_not_depend_on_its_companions(tmp_path, make_adata):
    a, b = _labelled(make_adata, 200, 1), _labelled(make_adata, 150, 2)
    ingest_anndata(str(tmp_path / "both"), [a, b], dataset_ids=["a", "b"])
    ingest_anndata(str(tmp_path / "alone"), [b], dataset_ids=["b"])
    both, alone = _obs(str(tmp_path / "both")), _obs(str(tmp_path / "alone"))
    np.testing.assert_array_equal(both[both["dataset_id"] == "b"]["split"].to_numpy(), alone["split"].to_numpy())


def test_input_split_values_are_kept_and_missing_ones_assigned(tmp_path, make_adata):
    a = _labelled(make_adata, 200, 1)
    given = np.array(["test"] * 50 + [None] * 150, dtype=object)
    a.obs["split"] = pd.Categorical(given, categories=["train", "val", "test"])
    summary = ingest_anndata(str(tmp_path / "x"), [a], label_columns=["cell_type", "split"])
    obs = _obs(str(tmp_path / "x"))
    assert (obs["split"][:50] == "test").all()
    rest = obs["split"][50:].value_counts()
    assert abs(rest["train"] - 120) <= 3 and abs(rest["val"] - 15) <= 3 and abs(rest["test"] - 15) <= 3
    assert summary["label_columns"] == ["cell_type"] and summary["datasets"][0]["split_kept"] == 50


def test_bad_split_value_names_file_column_and_value(tmp_path, make_adata, write_h5ad, capsys):
    a = make_adata()
    a.obs["split"] = ["train"] * 10 + ["validation"] + ["val"] * 19
    path = write_h5ad(a, "mine")
    assert main(["--atlas", str(tmp_path / "atlas"), path]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {path}: obs['split']") and "'validation'" in err and "'cell10'" in err, err
    assert not (tmp_path / "atlas").exists()


def test_append_gives_new_cells_a_split(base_atlas, make_adata):
    before = _obs(base_atlas)
    ingest_anndata(base_atlas, [_labelled(make_adata, 100, 5)], dataset_ids=["more"])
    after = _obs(base_atlas)
    pd.testing.assert_frame_equal(after[: len(before)], before)
    assert set(after["split"][len(before) :]) == {"train", "val", "test"}


def test_rare_label_values_share_a_stratum(tmp_path, make_adata):
    """A first label column unique per cell (barcodes, say) would leave every cell in train; pooled, it does not."""
    a = make_adata(n_cells=200, n_genes=6, labels=False)
    a.obs["barcode"] = pd.Categorical([f"bc{i}" for i in range(200)])
    ingest_anndata(str(tmp_path / "x"), [a])
    counts = _obs(str(tmp_path / "x"))["split"].value_counts()
    assert counts["val"] == counts["test"] == 20 and MIN_STRATUM_CELLS > 1


def test_default_label_columns_are_those_every_input_has(tmp_path, make_adata, caplog):
    a, b = make_adata(seed=1), make_adata(seed=2, labels=False)
    b.obs["batch"] = "b9"
    with caplog.at_level(logging.INFO, logger="data_pipelines"):
        summary = ingest_anndata(str(tmp_path / "x"), [a, b])
    assert summary["label_columns"] == ["batch"] and "cell_type" in caplog.text
    assert summary["datasets"][1]["split_stratified_by"] == ["dataset_id", "batch"]


def _old_atlas(uri: str, make_adata) -> None:
    """An atlas as an older data_pipelines.ingest wrote it: no `split` obs column."""
    a = make_adata(n_cells=20, n_genes=5, seed=4)
    ctx = tiledbsoma.SOMATileDBContext()
    _atlas.create_atlas(uri, ctx, obs_columns=["obs_id", "dataset_id", "cell_type"], n_obs=20, n_vars=5)
    with tiledbsoma.Experiment.open(uri, "w", context=ctx) as exp:
        cols = {"obs_id": np.asarray(a.obs_names), "dataset_id": np.full(20, "old", object)}
        _atlas.write_obs(exp, 0, {**cols, "cell_type": a.obs["cell_type"].astype(str).to_numpy()})
        coo = a.X.tocoo()
        _atlas.write_x(exp, coo.row, coo.col, coo.data)
        var = pd.DataFrame({"feature_id": a.var["feature_id"], "feature_name": a.var_names, "n_cells": 1})
        _atlas.write_var(exp, var)
        exp.metadata[_atlas.META_DATASETS] = json.dumps([{"dataset_id": "old", "n_cells": 20}])


def test_append_to_an_atlas_without_split_warns_and_writes_none(tmp_path, make_adata, caplog):
    uri = str(tmp_path / "old")
    _old_atlas(uri, make_adata)
    new = make_adata(n_cells=10, n_genes=5, seed=5, cell_prefix="n")
    new.obs["split"] = "val"
    with caplog.at_level(logging.WARNING, logger="data_pipelines"):
        summary = ingest_anndata(uri, [new], dataset_ids=["new"])
    assert "has no 'split' obs column" in caplog.text and "data.value_filter=null" in caplog.text
    obs = _obs(uri)
    assert "split" not in obs.columns and len(obs) == 30 and "split" not in summary["datasets"][0]


def test_cli_split_options(tmp_path, make_adata, write_h5ad, capsys):
    path = write_h5ad(_labelled(make_adata, 100, 1), "cli")
    atlas = str(tmp_path / "atlas")
    assert main(["--atlas", atlas, path, "--split-fractions", "0.6,0.2,0.2", "--split-seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "cli: 100 cells, 6 genes, split train " in out, out
    assert _obs(atlas)["split"].value_counts().to_dict() == {"train": 60, "val": 20, "test": 20}
    assert main(["--atlas", atlas + "2", path, "--split-fractions", "0.8,0.1"]) == 2
    assert "split fractions must be three numbers" in capsys.readouterr().err
    assert main(["--atlas", atlas + "3", path, "--split-fractions", "a,b,c"]) == 2
    assert "--split-fractions expects TRAIN,VAL,TEST" in capsys.readouterr().err


def test_stratified_split_is_shared_with_the_demo():
    assert demo.stratified_split is stratified_split
    strata = pd.DataFrame({"d": ["x"] * 40 + ["y"] * 5})
    split = stratified_split(strata, seed=0)
    assert (split[40:] == "train").all()  # a stratum of <= 5 cells stays in train (demo behaviour)
    assert list(pd.Series(split[:40]).value_counts().sort_index()) == [4, 32, 4]  # test, train, val
