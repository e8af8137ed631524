"""The commit protocol on local atlases (readers see the last commit; leftovers are discarded) and the durable
publish of a staged atlas (every new file and directory fsynced before the rename, the parent after)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tiledbsoma

from data_pipelines import _atlas, _commit, _staging
from data_pipelines.ingest import ingest_anndata


def test_staged_tree_is_fsynced_before_the_swap_and_the_parent_after(base_atlas, make_adata, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_publish = os.fsync, _staging._publish

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def publish(staging: str, path: str) -> None:
        events.append(("publish", staging))
        real_publish(staging, path)

    before = {os.path.relpath(os.path.join(d, f), base_atlas) for d, _, fs in os.walk(base_atlas) for f in fs}
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(_staging, "_publish", publish)
    ingest_anndata(base_atlas, [make_adata(n_cells=12, seed=3)], dataset_ids=["new"])

    at = next(i for i, e in enumerate(events) if e[0] == "publish")
    staging = events[at][1]
    synced = {os.path.relpath(p, staging) for kind, p in events[:at] if kind == "fsync"}
    files, dirs = set(), {"."}
    for d, subdirs, fs in os.walk(base_atlas):
        dirs.update(os.path.relpath(os.path.join(d, s), base_atlas) for s in subdirs)
        files.update(os.path.relpath(os.path.join(d, f), base_atlas) for f in fs)
    assert files - before, "the ingest added no file"
    assert (files - before) <= synced  # every new file, before the swap
    assert dirs <= synced  # every directory of the staged tree (new: the copy made them)
    assert not (before & synced)  # hard links to published files are already durable
    assert ("fsync", os.path.dirname(base_atlas)) in events[at + 1 :]  # the renamed entry, after the swap


def test_commit_keys_are_the_loaders():
    from scldm_scale.data import context

    assert _commit.META_COMMITTED == context.COMMITTED_TIMESTAMP_KEY
    assert _commit.META_WRITE == context.WRITE_TIMESTAMP_KEY


def _committed(uri: str) -> tuple[int, int, int]:
    """(obs rows, X entries, var rows) as readers see the atlas."""
    with _commit.open_committed(uri, tiledbsoma.SOMATileDBContext()) as exp:
        nnz = len(exp.ms["RNA"].X["raw"].read().tables().concat())
        return int(exp.obs.count), nnz, int(exp.ms["RNA"].var.count)


def test_uncommitted_write_is_invisible_then_discarded(base_atlas, make_adata):
    """A write that never committed (as a killed ingest leaves on S3, or on a copied atlas): readers and the
    next ingest see the committed state; the next ingest deletes the leftovers before its own commit."""
    ctx = tiledbsoma.SOMATileDBContext()
    committed = _committed(base_atlas)
    state = _atlas.read_state(base_atlas, ctx)
    ts = _commit.next_timestamp(state.commit)
    _commit.begin_write(base_atlas, ctx, ts)
    _atlas.resize_atlas(base_atlas, ctx, n_obs=40, n_vars=15, timestamp=ts)
    with tiledbsoma.Experiment.open(base_atlas, "w", context=ctx, tiledb_timestamp=ts) as exp:
        junk = {c: np.full(10, "junk", object) for c in state.obs_columns[1:]}
        _atlas.write_obs(exp, 30, {**junk, "nnz": np.full(10, 1)})
        _atlas.write_x(exp, np.arange(30, 40), np.full(10, 14), np.ones(10))
        var = state.var.copy()
        var.loc[len(var)] = ["ID_junk", "junk", 10]
        _atlas.write_var(exp, var)

    assert _committed(base_atlas) == committed
    assert _atlas.read_state(base_atlas, ctx).n_obs == 30
    summary = ingest_anndata(base_atlas, [make_adata(n_cells=5, seed=8)], dataset_ids=["next"])
    assert summary["n_obs"] == 35 and summary["n_vars"] == 12
    obs_rows, _, var_rows = _committed(base_atlas)
    assert (obs_rows, var_rows) == (35, 12)
    with _commit.open_committed(base_atlas, ctx) as exp:
        obs = exp.obs.read().concat().to_pandas()
        x = exp.ms["RNA"].X["raw"].read().tables().concat().to_pandas()
    assert "junk" not in set(obs["dataset_id"]) and x["soma_dim_0"].max() < 35 and x["soma_dim_1"].max() < 12


def test_interrupted_creation_is_never_read(tmp_path):
    """Created (write started) but never committed: reading it fails with a message naming the atlas."""
    from scldm_scale.config import ConfigError
    from scldm_scale.config.data import SomaDataConfig
    from scldm_scale.data import open_experiment

    uri = str(tmp_path / "half")
    ctx = tiledbsoma.SOMATileDBContext()
    started = _commit.next_timestamp(_commit.CommitInfo())
    _atlas.create_atlas(uri, ctx, obs_columns=["obs_id"], n_obs=5, n_vars=3, timestamp=started)
    with pytest.raises(ValueError, match=r"half: no write to this atlas was ever committed"):
        _atlas.read_state(uri, ctx)
    with pytest.raises(ConfigError, match=r"data.atlas_uri=.*half.*was ever committed"):
        open_experiment(SomaDataConfig(atlas_uri=uri, value_filter=None, val_value_filter=None))


def test_new_atlas_is_committed(tmp_path, make_adata):
    uri = str(tmp_path / "atlas")
    ingest_anndata(uri, [make_adata(seed=1)], dataset_ids=["a"])
    info = _commit.read_commit(uri, tiledbsoma.SOMATileDBContext())
    assert info.committed is not None and info.committed == info.last_write and not info.has_leftovers


def test_failed_first_write_to_a_pre_protocol_atlas_keeps_it_readable(tmp_path, make_adata, monkeypatch):
    """An atlas written without commit keys is adopted as committed before the first write: a failure of that
    write (here in place, without the local staging copy, as on S3) leaves its cells readable."""
    import contextlib

    import data_pipelines._append as append_mod
    import data_pipelines.ingest as ingest_mod

    uri, ctx = str(tmp_path / "old"), tiledbsoma.SOMATileDBContext()
    a = make_adata(n_cells=20, n_genes=5, seed=4)
    _atlas.create_atlas(
        uri, ctx, obs_columns=["obs_id", "dataset_id", "cell_type", "split"], n_obs=20, n_vars=5
    )
    with tiledbsoma.Experiment.open(uri, "w", context=ctx) as exp:
        cols = {"obs_id": np.asarray(a.obs_names), "dataset_id": np.full(20, "old", object)}
        _atlas.write_obs(
            exp, 0, {**cols, "cell_type": np.full(20, "T", object), "split": np.full(20, "train", object)}
        )
        coo = a.X.tocoo()
        _atlas.write_x(exp, coo.row, coo.col, coo.data)
        var = a.var.assign(feature_name=a.var_names, n_cells=1)[["feature_id", "feature_name", "n_cells"]]
        _atlas.write_var(exp, var)
    assert _commit.read_commit(uri, ctx) == _commit.CommitInfo()
    committed = _committed(uri)

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(ingest_mod, "staged_atlas", contextlib.nullcontext)
    monkeypatch.setattr(append_mod, "write_var", broken)
    with pytest.raises(RuntimeError, match="simulated failure"):
        ingest_anndata(uri, [make_adata(n_cells=7, n_genes=8, seed=5)], dataset_ids=["new"])
    info = _commit.read_commit(uri, ctx)
    assert info.committed is not None and info.has_leftovers
    assert _committed(uri) == committed and _atlas.read_state(uri, ctx).n_obs == 20
