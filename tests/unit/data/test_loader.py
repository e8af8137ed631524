"""SomaLoader on a real (tiny) SOMA experiment: order, batches, labels, vocabulary remapping, errors."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import tiledbsoma
import torch
from soma_test_atlas import loader_config

from scldm_scale.config.data import SomaDataConfig
from scldm_scale.data import GeneVocab, LabelVocab, build_gene_vocab, build_label_vocabs, build_loader


def _cfg(uri: str, **kw) -> SomaDataConfig:
    return loader_config(uri, **kw)


def _joinids(loader) -> list[int]:
    return [j for b in loader for j in b["soma_joinid"][~b["is_padding"]].tolist()]


def _train_joinids(uri: str) -> np.ndarray:
    with tiledbsoma.Experiment.open(uri) as exp:
        obs = exp.obs.read(value_filter="split == 'train'", column_names=["soma_joinid"]).concat()
    return np.sort(obs.column("soma_joinid").to_numpy())


def _dense(uri: str, joinids: np.ndarray) -> tuple[np.ndarray, list[str]]:
    with tiledbsoma.Experiment.open(uri) as exp:
        var = exp.ms["RNA"].var.read(column_names=["feature_id"]).concat().column("feature_id").to_pylist()
        t = exp.ms["RNA"].X["raw"].read(coords=(joinids,)).tables().concat()
    out = np.zeros((len(joinids), len(var)), np.float32)
    rows = np.searchsorted(joinids, t.column("soma_dim_0").to_numpy())
    out[rows, t.column("soma_dim_1").to_numpy()] = t.column("soma_data").to_numpy()
    return out, var


def test_same_seed_and_epoch_same_order_new_epoch_new_order(small_atlas):
    a = _joinids(build_loader(_cfg(small_atlas), rank=0, world_size=1))
    b = _joinids(build_loader(_cfg(small_atlas), rank=0, world_size=1))
    c = _joinids(build_loader(_cfg(small_atlas), rank=0, world_size=1, epoch=1))
    assert a == b
    assert a != c and sorted(a) == sorted(c) == _train_joinids(small_atlas).tolist()
    # consecutive passes move on to the next epoch
    loader = build_loader(_cfg(small_atlas), rank=0, world_size=1)
    assert _joinids(loader) == a and _joinids(loader) == c and loader.epoch == 1


def test_unshuffled_reads_sequentially(small_atlas):
    loader = build_loader(_cfg(small_atlas, shuffle=False), rank=0, world_size=1)
    assert _joinids(loader) == _train_joinids(small_atlas).tolist()


def test_batch_contract_padding_mask_and_values(small_atlas):
    loader = build_loader(
        _cfg(small_atlas, shuffle=False, remainder="pad", micro_batch_size=50), rank=0, world_size=1
    )
    batch = next(iter(loader))
    assert batch["gene_ids"].dtype.is_floating_point is False and batch["counts"].dtype.is_floating_point
    assert batch["labels"].shape == (50, 2) and batch["labels"].min() >= 1
    mask, ids, counts = batch["mask"], batch["gene_ids"], batch["counts"]
    assert ids.shape[1] == int(mask.sum(1).max())  # padded to the longest cell of the batch
    assert (ids[~mask] == 0).all() and (counts[~mask] == 0).all() and (ids[mask] > 0).all()
    dense, _ = _dense(small_atlas, batch["soma_joinid"].numpy())
    for i in range(50):
        row = np.zeros(dense.shape[1], np.float32)
        row[ids[i][mask[i]].numpy() - 1] = counts[i][mask[i]].numpy()  # token = 1 + var index here
        np.testing.assert_array_equal(row, dense[i])
        assert int(mask[i].sum()) == int((dense[i] > 0).sum())
    np.testing.assert_allclose(batch["library_size"].numpy(), dense.sum(1))
    assert not batch["truncated"].any()


def test_token_cap_samples_genes_and_flags(small_atlas):
    full = next(iter(build_loader(_cfg(small_atlas, shuffle=False), rank=0, world_size=1)))
    cap = next(
        iter(build_loader(_cfg(small_atlas, shuffle=False, max_tokens_per_cell=6), rank=0, world_size=1))
    )
    lengths = full["mask"].sum(1)
    assert (cap["truncated"] == (lengths > 6)).all() and cap["truncated"].any()
    assert cap["mask"].sum(1).max() == 6 and (cap["mask"].sum(1) == lengths.clamp(max=6)).all()
    assert (cap["library_size"] == full["library_size"]).all()  # library size is before the cap
    # the whole cells come along as the decoder's target
    assert torch.equal(cap["target_gene_ids"], full["gene_ids"]) and torch.equal(cap["target_mask"], full["mask"])
    assert torch.equal(cap["target_counts"], full["counts"]) and "target_gene_ids" not in full
    for i in range(len(lengths)):  # kept genes are a subset of the cell's genes with their counts
        f = dict(zip(full["gene_ids"][i].tolist(), full["counts"][i].tolist()))
        for g, c in zip(
            cap["gene_ids"][i][cap["mask"][i]].tolist(), cap["counts"][i][cap["mask"][i]].tolist()
        ):
            assert f[g] == c


def test_vocabulary_remapping_by_feature_id(small_atlas, remapped_atlas, caplog):
    vocab = build_gene_vocab(_cfg(small_atlas))
    with caplog.at_level(logging.INFO, logger="scldm_scale.data"):
        loader = build_loader(
            _cfg(remapped_atlas, shuffle=False, micro_batch_size=40), rank=0, world_size=1, gene_vocab=vocab
        )
    assert "5 of 50 atlas genes are not in the gene vocabulary" in caplog.text
    batch = next(iter(loader))
    dense, var_ids = _dense(remapped_atlas, batch["soma_joinid"].numpy())
    in_vocab = np.array([vocab.token_id(f) > 0 for f in var_ids])
    for i in range(40):
        expect = {vocab.token_id(f): c for f, c in zip(var_ids, dense[i]) if c > 0 and vocab.token_id(f) > 0}
        m = batch["mask"][i]
        got = dict(zip(batch["gene_ids"][i][m].tolist(), batch["counts"][i][m].tolist()))
        assert got == expect
    np.testing.assert_allclose(batch["library_size"].numpy(), dense[:, in_vocab].sum(1))


def test_vocab_json_round_trip_and_min_gene_cells(small_atlas):
    vocab = build_gene_vocab(_cfg(small_atlas))
    assert GeneVocab.from_json(vocab.to_json()) == vocab and vocab.num_tokens == 51
    assert vocab.token_id(vocab.feature_ids[0]) == 1 and vocab.token_id("nope") == 0
    with tiledbsoma.Experiment.open(small_atlas) as exp:
        n_cells = exp.ms["RNA"].var.read(column_names=["n_cells"]).concat().column("n_cells").to_numpy()
    threshold = int(np.median(n_cells)) + 1
    kept = build_gene_vocab(_cfg(small_atlas, min_gene_cells=threshold))
    assert kept.num_genes == int((n_cells >= threshold).sum()) < 50
    labels = build_label_vocabs(_cfg(small_atlas))
    assert labels["dataset_id"].categories == ["ds0", "ds1", "ds2"]
    assert LabelVocab.from_json(labels["cell_type"].to_json()) == labels["cell_type"]


def test_min_gene_cells_counted_over_the_training_cells(small_atlas):
    """scope=train counts each gene's cells within data.value_filter (hand count from X), not var n_cells."""
    vf = "dataset_id == 'ds1'"
    with tiledbsoma.Experiment.open(small_atlas) as exp:
        ids = exp.obs.read(value_filter=vf, column_names=["soma_joinid"]).concat().column(0).to_numpy()
        x = exp.ms["RNA"].X["raw"].read((np.sort(ids),)).tables().concat()
        var = exp.ms["RNA"].var.read(column_names=["feature_id", "n_cells"]).concat().to_pandas()
    per_gene = np.bincount(x["soma_dim_1"].to_numpy(), minlength=len(var))
    threshold = max(2, int(np.median(per_gene[per_gene > 0])))
    kept = build_gene_vocab(_cfg(small_atlas, value_filter=vf, min_gene_cells=threshold,
                                 min_gene_cells_scope="train"))
    assert kept.feature_ids == [f for f, n in zip(var["feature_id"], per_gene) if n >= threshold]
    atlas_scope = build_gene_vocab(_cfg(small_atlas, value_filter=vf, min_gene_cells=threshold))
    assert atlas_scope.feature_ids != kept.feature_ids
    with pytest.raises(ValueError, match="no cell matches"):
        build_gene_vocab(_cfg(small_atlas, value_filter="dataset_id == 'nope'", min_gene_cells=1,
                              min_gene_cells_scope="train"))


def test_unknown_labels_map_to_zero(small_atlas, caplog):
    vocabs = {
        "dataset_id": LabelVocab("dataset_id", ["ds1"]),
        "cell_type": LabelVocab("cell_type", ["B", "NK", "T"]),
    }
    with caplog.at_level(logging.INFO, logger="scldm_scale.data"):
        loader = build_loader(_cfg(small_atlas, shuffle=False), rank=0, world_size=1, label_vocabs=vocabs)
    assert "unknown / null category" in caplog.text
    labels = np.concatenate([b["labels"][:, 0].numpy() for b in loader])
    assert set(labels.tolist()) == {0, 1} and (labels == 1).sum() == 160  # ds1 train cells


def test_drop_and_pad_give_equal_batches_per_rank(small_atlas):
    for remainder in ("pad", "drop"):
        loaders = [
            build_loader(_cfg(small_atlas, remainder=remainder, micro_batch_size=50), rank=r, world_size=3)
            for r in range(3)
        ]
        counts = [len(list(ld)) for ld in loaders]
        assert len(set(counts)) == 1 and counts[0] == len(loaders[0])
    assert counts[0] == 480 // 150  # drop: 3 full rounds of 3 x 50


def test_config_and_atlas_errors_name_the_key(small_atlas):
    with pytest.raises(ValueError, match="data.seed"):
        build_loader(_cfg(small_atlas, seed=None), rank=0, world_size=2)
    with pytest.raises(ValueError, match="data.layer_name"):
        build_loader(_cfg(small_atlas, layer_name="normalized"), rank=0, world_size=1)
    with pytest.raises(ValueError, match="data.measurement_name"):
        build_loader(_cfg(small_atlas, measurement_name="ATAC"), rank=0, world_size=1)
    with pytest.raises(ValueError, match="data.label_columns"):
        build_loader(_cfg(small_atlas, label_columns=["tissue"]), rank=0, world_size=1)
    with pytest.raises(ValueError, match="data.atlas_uri"):
        build_loader(_cfg(small_atlas + "_missing"), rank=0, world_size=1)
    with pytest.raises(ValueError, match="no gene of the atlas var"):
        build_loader(_cfg(small_atlas), rank=0, world_size=1, gene_vocab=GeneVocab(["other"]))


@pytest.mark.parametrize(
    "kw,key",
    [
        ({"shuffle_chunk_cells": 0}, "data.shuffle_chunk_cells"),
        ({"shuffle_buffer_cells": 4}, "data.shuffle_buffer_cells"),
        ({"remainder": "keep"}, "data.remainder"),
        ({"memory_budget_mb": 0}, "data.memory_budget_mb"),
        ({"min_gene_cells": -1}, "data.min_gene_cells"),
        ({"label_columns": ["a", "a"]}, "data.label_columns"),
    ],
)
def test_config_validation(kw, key):
    with pytest.raises(ValueError, match=key):
        SomaDataConfig(**{"shuffle_chunk_cells": 16, **kw})


def test_state_is_json(small_atlas):
    loader = build_loader(_cfg(small_atlas), rank=0, world_size=1)
    it = iter(loader)
    next(it)
    state = json.loads(json.dumps(loader.state_dict()))
    assert state["cells_consumed_in_epoch"] == 16 and state["epoch"] == 0 and not state["complete"]


def test_library_size_stats_per_label_combination(small_atlas):
    from scldm_scale.data import library_size_stats

    stats = json.loads(json.dumps(library_size_stats(_cfg(small_atlas), batch_size=100)))
    joinids = _train_joinids(small_atlas)
    dense, _ = _dense(small_atlas, joinids)
    with tiledbsoma.Experiment.open(small_atlas) as exp:
        obs = exp.obs.read(
            value_filter="split == 'train'", column_names=["soma_joinid", "dataset_id", "cell_type"]
        )
        obs = obs.concat().to_pandas().sort_values("soma_joinid")
    logs = np.log(dense.sum(1))
    sel = (obs["dataset_id"] == "ds1").to_numpy() & (obs["cell_type"] == "NK").to_numpy()
    group = stats["groups"]["2,2"]  # ds1 -> 2; categories B, NK, T -> NK = 2
    assert group["n"] == int(sel.sum())
    np.testing.assert_allclose(
        [group["mean_log"], group["std_log"]], [logs[sel].mean(), logs[sel].std()], rtol=1e-6
    )
    assert stats["overall"]["n"] == len(joinids) and stats["label_columns"] == ["dataset_id", "cell_type"]


def test_library_size_stats_from_a_shuffled_sample(small_atlas):
    from scldm_scale.data import library_size_stats

    full = library_size_stats(_cfg(small_atlas), batch_size=100)
    sample = library_size_stats(_cfg(small_atlas), batch_size=100, max_cells=300, seed=1)
    assert sample == library_size_stats(_cfg(small_atlas), batch_size=100, max_cells=300, seed=1)
    assert 300 <= sample["overall"]["n"] < full["overall"]["n"]
    # a shuffled sample spans the datasets stored one after another, not just the first one
    datasets = {key.split(",")[0] for key in sample["groups"]}
    assert datasets == {key.split(",")[0] for key in full["groups"]}
    assert abs(sample["overall"]["mean_log"] - full["overall"]["mean_log"]) < 0.2


@pytest.fixture(scope="module")
def no_cell_type_atlas(tmp_path_factory) -> str:
    """An ingested atlas whose obs has dataset_id, batch and split, but no cell_type."""
    import anndata
    import pandas as pd
    import scipy.sparse as sp

    from data_pipelines.ingest import ingest_anndata

    rng = np.random.default_rng(0)
    adatas = []
    for _ in range(2):
        x = sp.csr_matrix(rng.poisson(1.0, size=(60, 8)).astype(np.float32))
        batch = pd.Categorical(rng.choice(["b1", "b2"], 60))
        obs = pd.DataFrame({"batch": batch}, index=[f"c{i}" for i in range(60)])
        var = pd.DataFrame(index=[f"G{j}" for j in range(8)])
        adatas.append(anndata.AnnData(X=x, obs=obs, var=var))
    uri = str(tmp_path_factory.mktemp("own") / "atlas")
    ingest_anndata(uri, adatas, dataset_ids=["d0", "d1"])
    return uri


def test_auto_label_columns_are_the_defaults_the_atlas_has(small_atlas, no_cell_type_atlas):
    loader = build_loader(_cfg(small_atlas, label_columns=None), rank=0, world_size=1)
    assert loader.label_columns == ["dataset_id", "cell_type"] == list(loader.label_vocabs)
    loader = build_loader(_cfg(no_cell_type_atlas, label_columns=None), rank=0, world_size=1)
    assert loader.label_columns == ["dataset_id"]
    batch = next(iter(loader))
    assert batch["labels"].shape[1] == 1 and set(batch["labels"][:, 0].tolist()) <= {1, 2}
    assert list(build_label_vocabs(_cfg(no_cell_type_atlas, label_columns=None))) == ["dataset_id"]
    # Given training vocabularies (validation, latent cache, statistics): their columns, in their order.
    vocabs = {"batch": LabelVocab.from_values("batch", ["b1", "b2"])}
    cfg = _cfg(no_cell_type_atlas, label_columns=None)
    other = build_loader(cfg, rank=0, world_size=1, label_vocabs=vocabs)
    assert other.label_columns == ["batch"]


def test_missing_columns_are_one_line_config_errors(no_cell_type_atlas):
    from scldm_scale.config import ConfigError

    with pytest.raises(ConfigError) as info:
        build_loader(_cfg(no_cell_type_atlas, label_columns=["dataset_id", "cell_type"]), rank=0, world_size=1)
    message = str(info.value)
    assert "data.label_columns names 'cell_type'" in message and "\n" not in message
    assert "(obs columns: soma_joinid, obs_id, dataset_id, batch, split, nnz)" in message
    match = r"data.value_filter=\"tissue == 'x'\": the atlas at .* no obs column 'tissue'"
    with pytest.raises(ConfigError, match=match):
        build_loader(_cfg(no_cell_type_atlas, value_filter="tissue == 'x'"), rank=0, world_size=1)
    with pytest.raises(ConfigError, match="set data.val_value_filter=null"):
        build_label_vocabs(_cfg(no_cell_type_atlas, label_columns=None, val_value_filter="donor == 'a'"))


def test_value_filter_columns_and_the_split_hint():
    from scldm_scale.data.loader import check_value_filter, filter_columns

    assert filter_columns("split == 'train' and dataset_id != 'a and b'") == ["split", "dataset_id"]
    assert filter_columns("n_genes > 1e3 or not (x in ['y', \"z\"]) or w is null") == ["n_genes", "x", "w"]
    (problem,) = check_value_filter("data.value_filter", "split == 'train'", ["soma_joinid", "dataset_id"], "/a")
    assert problem == (
        "data.value_filter=\"split == 'train'\": the atlas at /a has no obs column 'split'; re-ingest with a "
        "current data_pipelines.ingest (it adds split) or set data.value_filter=null"
    )
    assert check_value_filter("data.value_filter", None, [], "/a") == []


def test_dataset_alone_reads_the_whole_first_epoch(small_atlas):
    from scldm_scale.data import SomaCellDataset
    from scldm_scale.data.collate import unpack_batch

    loader = build_loader(_cfg(small_atlas), rank=0, world_size=1)
    ds = SomaCellDataset(loader.dataset.spec)
    assert ds.pieces is None  # the epoch order is computed once, when iteration starts (or by set_work)
    assert [j for p in ds for j in unpack_batch(p)["soma_joinid"].tolist()] == _joinids(loader)


def test_derived_loaders_match_fresh_ones_without_opening_the_atlas(small_atlas, monkeypatch):
    """`SomaLoader.derive` (library-size sample, latent-cache pass) yields what `build_loader` would, reusing the
    training loader's selection: the atlas is not opened again."""
    from scldm_scale.data.stats import library_size_stats

    cfg = SomaDataConfig(
        atlas_uri=small_atlas, micro_batch_size=8, seed=3, shuffle_chunk_cells=32, shuffle_buffer_cells=128
    )
    train = build_loader(cfg, rank=0, world_size=2)
    fresh_cache = build_loader(cfg, rank=1, world_size=2, shuffle=False, batch_size=16)
    fresh_stats = library_size_stats(cfg, max_cells=200, seed=5, batch_size=16)
    fresh_all = library_size_stats(cfg, batch_size=16)

    def no_open(*args, **kwargs):
        raise AssertionError("derive opened the atlas")

    monkeypatch.setattr("scldm_scale.data.loader.open_experiment", no_open)
    cache = train.derive(shuffle=False, seed=0, rank=1, batch_size=16)
    assert [b["soma_joinid"].tolist() for b in cache] == [b["soma_joinid"].tolist() for b in fresh_cache]
    assert library_size_stats(cfg, max_cells=200, seed=5, batch_size=16, from_loader=train) == fresh_stats
    assert library_size_stats(cfg, batch_size=16, from_loader=train) == fresh_all
    assert train.derive().state_dict()["fingerprint"] == train.state_dict()["fingerprint"]
