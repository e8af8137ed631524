"""Ingestion writes the documented layout, appends with a union vocabulary and publishes atomically."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import tiledbsoma

from data_pipelines import _atlas, _staging
from data_pipelines.ingest import ingest_anndata, ingest_h5ads

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _read(uri: str) -> tuple[pd.DataFrame, pd.DataFrame, sp.csr_matrix, dict]:
    with tiledbsoma.Experiment.open(uri) as exp:
        obs = exp.obs.read().concat().to_pandas().sort_values("soma_joinid").reset_index(drop=True)
        var = exp.ms["RNA"].var.read().concat().to_pandas().sort_values("soma_joinid").reset_index(drop=True)
        x = exp.ms["RNA"].X["raw"]
        t = x.read().tables().concat()
        shape = x.shape
        meta = dict(exp.metadata)
    coo = sp.coo_matrix(
        (t["soma_data"].to_numpy(), (t["soma_dim_0"].to_numpy(), t["soma_dim_1"].to_numpy())), shape=shape
    )
    return obs, var, coo.tocsr(), meta


def _dense(adata) -> np.ndarray:
    return adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)


def test_roundtrip_layout(tmp_path, make_adata, write_h5ad):
    a = make_adata(n_cells=25, n_genes=9, seed=2)
    path = write_h5ad(a, "pbmc")
    summary = ingest_h5ads(str(tmp_path / "atlas"), [path], chunk_rows=7)
    obs, var, x, meta = _read(str(tmp_path / "atlas"))
    assert (
        summary["n_obs"] == 25 and summary["n_vars"] == 9 and summary["datasets"][0]["dataset_id"] == "pbmc"
    )
    assert list(obs.columns) == ["soma_joinid", "obs_id", "dataset_id", "cell_type", "batch", "split", "nnz"]
    assert set(obs["split"]) <= {"train", "val", "test"} and (obs["split"] == "train").sum() >= 15
    assert obs["obs_id"].tolist() == list(a.obs_names) and set(obs["dataset_id"]) == {"pbmc"}
    assert obs["cell_type"].tolist() == a.obs["cell_type"].astype(str).tolist()
    assert var["feature_id"].tolist() == a.var["feature_id"].tolist()
    assert var["feature_name"].tolist() == list(a.var_names)
    np.testing.assert_array_equal(x.toarray(), _dense(a))
    assert var["n_cells"].tolist() == (_dense(a) > 0).sum(0).tolist()
    assert obs["nnz"].tolist() == (_dense(a) > 0).sum(1).tolist()  # the loader sizes its reads by it
    with tiledbsoma.Experiment.open(str(tmp_path / "atlas")) as exp:
        assert exp.ms["RNA"].X["raw"].schema.field("soma_data").type == "float"
    assert json.loads(meta[_atlas.META_DATASETS])[0]["obs_joinid_stop"] == 25


@pytest.mark.parametrize(
    "dense,dtype", [(True, np.float32), (False, np.int32), (True, np.int64), (False, np.float64)]
)
def test_dense_and_integer_dtypes_accepted(tmp_path, make_adata, write_h5ad, dense, dtype):
    a = make_adata(n_cells=11, n_genes=5, dense=dense, dtype=dtype)
    ingest_h5ads(str(tmp_path / "atlas"), [write_h5ad(a)], chunk_rows=4)
    np.testing.assert_array_equal(_read(str(tmp_path / "atlas"))[2].toarray(), _dense(a))


def test_append_union_vocabulary_keeps_stored_cells(base_atlas, make_adata, write_h5ad, tree_hash):
    stored_obs, stored_var, stored_x, _ = _read(base_atlas)
    before = tree_hash(base_atlas)
    # Overlapping genes G6..G11 plus 4 new ones, in a different order.
    new = make_adata(n_cells=17, n_genes=16, seed=9, gene_prefix="G")[:, list(range(15, 5, -1))].copy()
    new.obs["dataset_id"] = "second"
    summary = ingest_h5ads(base_atlas, [write_h5ad(new, "second")], chunk_rows=5)
    obs, var, x, meta = _read(base_atlas)

    # Files of the stored atlas are untouched (appends only add files), stored rows read back identically.
    after = tree_hash(base_atlas)
    assert all(after.get(k) == v for k, v in before.items())
    pd.testing.assert_frame_equal(obs.iloc[:30].reset_index(drop=True), stored_obs)
    assert (x[:30, : stored_x.shape[1]] != stored_x).nnz == 0 and x[:30, stored_x.shape[1] :].nnz == 0

    # Union vocabulary: stored genes keep their joinid, new ones are appended in first-seen order.
    assert summary["n_new_genes"] == 4 and len(var) == 16
    assert var["feature_id"].tolist()[:12] == stored_var["feature_id"].tolist()
    assert var["feature_id"].tolist()[12:] == ["ID_G15", "ID_G14", "ID_G13", "ID_G12"]
    gene_col = {fid: j for j, fid in enumerate(var["feature_id"])}
    cols = [gene_col[f] for f in new.var["feature_id"]]
    np.testing.assert_array_equal(x[30:][:, cols].toarray(), _dense(new))
    assert x[30:].sum() == _dense(new).sum()

    # n_cells is updated for shared genes; obs is contiguous per dataset.
    assert var["n_cells"].tolist() == np.asarray((x > 0).sum(0)).ravel().tolist()
    assert obs["dataset_id"].tolist() == ["base"] * 30 + ["second"] * 17
    ranges = [(d["obs_joinid_start"], d["obs_joinid_stop"]) for d in json.loads(meta[_atlas.META_DATASETS])]
    assert ranges == [(0, 30), (30, 47)]


def test_dataset_id_precedence(tmp_path, make_adata):
    a, b, c = make_adata(seed=1), make_adata(seed=2), make_adata(seed=3)
    a.obs["dataset_id"] = "from_obs"
    s = ingest_anndata(str(tmp_path / "x"), [a, b, c], dataset_ids=["given_a", "given_b", "given_c"])
    assert [d["dataset_id"] for d in s["datasets"]] == ["from_obs", "given_b", "given_c"]
    s = ingest_anndata(str(tmp_path / "y"), [b])
    assert s["datasets"][0]["dataset_id"] == "adata0"


def test_default_label_columns_are_text_columns(tmp_path, make_adata):
    a = make_adata()
    a.obs["n_genes"] = 5
    a.obs["donor"] = ["d1"] * a.n_obs
    s = ingest_anndata(str(tmp_path / "x"), [a])
    assert s["label_columns"] == ["cell_type", "batch", "donor"]


def test_failure_mid_write_leaves_atlas_byte_identical(base_atlas, make_adata, tree_hash, monkeypatch):
    """A crash after some chunks were written (staging copy half full) publishes nothing."""
    import data_pipelines._append as append_mod

    calls = []
    real_write_x = append_mod.write_x

    def failing_write_x(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real_write_x(*args, **kwargs)

    monkeypatch.setattr(append_mod, "write_x", failing_write_x)
    before = tree_hash(base_atlas)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ingest_anndata(base_atlas, [make_adata(n_cells=40, seed=5)], dataset_ids=["x"], chunk_rows=10)
    assert len(calls) == 3
    assert tree_hash(base_atlas) == before
    assert not [e for e in os.listdir(os.path.dirname(base_atlas)) if ".staging-" in e]


def test_fallback_swap_and_crash_recovery(base_atlas, make_adata, tree_hash, monkeypatch):
    """Without renameat2 the swap is two renames; a crash between them is undone by the next writer."""
    monkeypatch.setattr(_staging, "_exchange", lambda a, b: False)
    ingest_anndata(base_atlas, [make_adata(seed=5)], dataset_ids=["two"])
    assert _read(base_atlas)[0]["dataset_id"].nunique() == 2
    published = tree_hash(base_atlas)
    parent = os.path.dirname(base_atlas)
    # Simulate a crash right after the first rename of the fallback swap, plus a stale staging dir.
    os.rename(base_atlas, os.path.join(parent, ".atlas.old-deadbeef"))
    os.makedirs(os.path.join(parent, ".atlas.staging-cafe"))
    ingest_anndata(base_atlas, [make_adata(seed=6)], dataset_ids=["three"])
    obs = _read(base_atlas)[0]
    assert obs["dataset_id"].unique().tolist() == ["base", "two", "three"]
    assert all(tree_hash(base_atlas).get(k) == v for k, v in published.items())
    assert sorted(e for e in os.listdir(parent) if e.startswith(".atlas")) == [".atlas.lock"]


def test_concurrent_ingests_are_serialized(tmp_path, make_adata, write_h5ad):
    """Two processes appending to one atlas at once: the lock serializes them, no dataset is lost."""
    atlas = str(tmp_path / "atlas")
    files = [write_h5ad(make_adata(n_cells=20, seed=s), f"d{s}") for s in (1, 2)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "data_pipelines.ingest", "--atlas", atlas, f],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for f in files
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    obs = _read(atlas)[0]
    assert sorted(obs["dataset_id"].unique()) == ["d1", "d2"] and len(obs) == 40
    assert obs.groupby("dataset_id")["soma_joinid"].agg(lambda j: j.max() - j.min() + 1).tolist() == [20, 20]


def test_backed_chunks_bound_memory(tmp_path, make_adata, write_h5ad, monkeypatch):
    """X is read in chunks of chunk_rows cells from a backed file, never as a whole."""
    from data_pipelines import _source

    a = make_adata(n_cells=50, n_genes=6)
    sizes = []
    real = _source.Source.iter_chunks

    def spy(self, chunk_rows):
        assert self.adata.isbacked
        for start, chunk in real(self, chunk_rows):
            sizes.append(chunk.shape[0])
            yield start, chunk

    monkeypatch.setattr(_source.Source, "iter_chunks", spy)
    ingest_h5ads(str(tmp_path / "atlas"), [write_h5ad(a)], chunk_rows=16)
    assert sizes == [16, 16, 16, 2] * 2  # validation pass + write pass


def test_cli_success_with_options(tmp_path, make_adata, write_h5ad, capsys):
    """In-process `main`; test_concurrent_ingests_are_serialized runs the CLI as real processes."""
    from data_pipelines.ingest import main

    a = make_adata(labels=False)
    a.obs["tissue"] = pd.Categorical(["lung"] * 15 + [np.nan] * 15, categories=["lung"])
    path = write_h5ad(a, "lung")
    atlas = str(tmp_path / "atlas")
    argv = [
        "--atlas",
        atlas,
        path,
        "--dataset-id",
        "L1",
        "--label-column",
        "tissue",
        "--fill",
        "tissue=unknown",
    ]
    assert main([*argv, "--chunk-rows", "8"]) == 0
    assert "L1: 30 cells, 12 genes" in capsys.readouterr().out
    obs = _read(atlas)[0]
    assert obs["tissue"].value_counts().to_dict() == {"lung": 15, "unknown": 15}
    assert main(["--atlas", atlas, path, "--fill", "tissue"]) == 2
    assert "--fill expects COLUMN=VALUE" in capsys.readouterr().err


def test_genes_across_several_tiles_roundtrip(tmp_path, make_adata):
    """> 2048 genes (two column tiles) and an append that permutes them: entries are put in global order."""
    a = make_adata(n_cells=40, n_genes=4500, seed=11)
    b = a[:, ::-1].copy()  # same genes, reversed: its columns map to decreasing atlas joinids
    b.obs_names = [f"b{i}" for i in range(b.n_obs)]
    ingest_anndata(str(tmp_path / "atlas"), [a, b], dataset_ids=["a", "b"], chunk_rows=15)
    x = _read(str(tmp_path / "atlas"))[2]
    np.testing.assert_array_equal(x[:40].toarray(), _dense(a))
    np.testing.assert_array_equal(x[40:].toarray(), _dense(a))


def test_sigkill_mid_write_leaves_old_atlas(base_atlas, make_adata, write_h5ad, tree_hash, tmp_path):
    """A real crash: the writer is SIGKILLed after its first X chunk reached the staging copy."""
    import signal
    import time

    path = write_h5ad(make_adata(n_cells=40, seed=12), "victim")
    flag = tmp_path / "wrote_one_chunk"
    code = (
        "import sys, time, pathlib, data_pipelines.ingest, data_pipelines._append as w\n"
        "real = w.write_x\n"
        "def slow(*a, **k):\n"
        "    real(*a, **k); pathlib.Path(sys.argv[1]).touch(); time.sleep(60)\n"
        "w.write_x = slow\n"
        "data_pipelines.ingest.main(['--atlas', sys.argv[2], sys.argv[3], '--chunk-rows', '10'])\n"
    )
    before = tree_hash(base_atlas)
    proc = subprocess.Popen([sys.executable, "-c", code, str(flag), base_atlas, path], cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "writer did not reach its first chunk"
            time.sleep(0.05)
        parent = os.path.dirname(base_atlas)
        assert [e for e in os.listdir(parent) if ".staging-" in e], "expected a half-written staging copy"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert tree_hash(base_atlas) == before
    # The next writer removes the dead staging copy and appends normally.
    ingest_h5ads(base_atlas, [path])
    assert not [e for e in os.listdir(parent) if ".staging-" in e]
    assert _read(base_atlas)[0]["dataset_id"].tolist()[-40:] == ["victim"] * 40
