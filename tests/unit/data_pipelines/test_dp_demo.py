"""The embedded demo atlas: contents, stratified split with a recorded seed, idempotent and concurrency-safe."""

from __future__ import annotations

import os
import subprocess
import sys

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp
import tiledbsoma

from data_pipelines import demo

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
DEMO_DATA = os.path.join(REPO, "data_pipelines", "demo_data")


def _obs(uri: str) -> pd.DataFrame:
    with tiledbsoma.Experiment.open(uri) as exp:
        return exp.obs.read().concat().to_pandas().sort_values("soma_joinid").reset_index(drop=True)


def test_default_location_is_the_session_env(demo_atlas):
    assert demo.default_demo_atlas_uri() == demo_atlas
    assert demo.ensure_demo_atlas() == demo_atlas
    assert demo.resolve_atlas_uri("demo") == demo_atlas and demo.resolve_atlas_uri("s3://b/a") == "s3://b/a"


def test_summary_and_split(demo_atlas):
    s = demo.atlas_summary(demo_atlas)
    assert s["datasets"] == {"brain10k": 10_000, "pbmc700": 700, "wu2020": 200}
    assert s["n_obs"] == 10_900 and s["n_vars"] == 1000 + 765 + 30_727
    assert sum(s["splits"].values()) == 10_900 and set(s["splits"]) == {"train", "val", "test"}
    assert s["split_seed"] == demo.SPLIT_SEED
    obs = _obs(demo_atlas)
    assert {"obs_id", "dataset_id", "cell_type", "cluster", "split"} <= set(obs.columns)
    assert (obs.loc[obs["dataset_id"] == "brain10k", "cell_type"] == "unknown").all()
    # Stratified by (dataset_id, cell_type): every stratum of >= 20 cells is ~80 / 10 / 10.
    for _, group in obs.groupby(["dataset_id", "cell_type"]):
        if len(group) >= 20:
            frac = group["split"].value_counts(normalize=True)
            assert abs(frac["train"] - 0.8) < 0.05 and abs(frac["val"] - 0.1) < 0.05, frac
    # The split is a pure function of the seed.
    strata = obs[["dataset_id", "cell_type"]]
    np.testing.assert_array_equal(demo.stratified_split(strata, seed=0), obs["split"].to_numpy())
    assert (demo.stratified_split(strata, seed=1) != obs["split"].to_numpy()).any()


def test_counts_match_the_embedded_files(demo_atlas):
    ref = anndata.read_h5ad(os.path.join(DEMO_DATA, "pbmc700.h5ad"))
    with tiledbsoma.Experiment.open(demo_atlas) as exp:
        var = exp.ms["RNA"].var.read().concat().to_pandas().set_index("feature_id")
        t = exp.ms["RNA"].X["raw"].read(coords=(slice(10_000, 10_699),)).tables().concat()
    cols = var.loc[list(ref.var_names), "soma_joinid"].to_numpy()
    x = sp.csr_matrix(
        (t["soma_data"].to_numpy(), (t["soma_dim_0"].to_numpy() - 10_000, t["soma_dim_1"].to_numpy())),
        shape=(700, len(var)),
    )
    np.testing.assert_array_equal(x[:, cols].toarray(), ref.X.toarray())
    assert var.loc["ENSMUSG00000051951", "feature_name"] == "Xkr4"


def test_second_call_does_nothing(demo_atlas, tree_hash):
    before = tree_hash(demo_atlas)
    assert demo.ensure_demo_atlas(demo_atlas) == demo_atlas
    assert tree_hash(demo_atlas) == before


def test_concurrent_first_use_builds_once(tmp_path):
    """Two processes (e.g. two training ranks) racing to build it: one builds, the other waits and reuses."""
    path = str(tmp_path / "demo")
    code = (
        "import logging, sys; logging.basicConfig(level=logging.INFO); "
        "from data_pipelines.demo import ensure_demo_atlas; print(ensure_demo_atlas(sys.argv[1]))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, path],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [o[0].strip() for o in outs] == [path, path]
    assert sum("building the demo atlas" in o[1] for o in outs) == 1
    assert demo.atlas_summary(path)["n_obs"] == 10_900


def test_cli_prints_summary(demo_atlas, capsys):
    assert demo.main(["--atlas", demo_atlas]) == 0
    out = capsys.readouterr().out
    assert "brain10k" in out and "10,900" in out and "split seed: 0" in out
