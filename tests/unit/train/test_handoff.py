"""The stage-1 -> stage-2 hand-off: `latent_loader` returns the fitted latent statistics and leaves `Stage1` alone."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from scldm_scale.config import LDMExperimentConfig, load_config
from scldm_scale.data.latent_cache import write_index, write_shard
from scldm_scale.data.vocab import GeneVocab
from scldm_scale.distributed import DistInfo
from scldm_scale.eval.loading import Stage1
from scldm_scale.train import handoff

M, L = 2, 3


def _stage1(tmp_path: Path) -> Stage1:
    vae = SimpleNamespace(latent_shape=(M, L))  # latent_loader reads only the latent shape when the cache exists
    return Stage1(tmp_path / "ckpt", vae, GeneVocab.from_var(["g1", "g2"]), "", "run1", tags={"scldm.stage": "ldm"})


def _setup(tmp_path: Path, normalization: str):
    cfg = load_config(
        LDMExperimentConfig,
        overrides=[
            f"train.run_dir={tmp_path / 'run'}",
            "latent_cache.mode=always",
            f"flow.latent_normalization={normalization}",
            "data.micro_batch_size=4",
        ],
    )
    stage1 = _stage1(tmp_path)
    loader = SimpleNamespace(num_cells=10, label_vocabs={})
    data = SimpleNamespace(atlas_uri=str(tmp_path / "atlas"), loader=loader)
    cache_dir = tmp_path / "run" / "latent_cache"  # written up front: latent_loader finds it valid, builds nothing
    j = torch.arange(10)
    batch = {"soma_joinid": j, "labels": torch.zeros(10, 0, dtype=torch.long), "library_size": j.float()}
    write_shard(cache_dir, [batch], lambda b: b["soma_joinid"].float()[:, None, None].expand(-1, M, L), rank=0,
                world_size=1)
    write_index(cache_dir, world_size=1, key=handoff.cache_key(cfg, data.atlas_uri, stage1, []))
    return cfg, DistInfo(0, 1, 0, torch.device("cpu")), data, stage1


def test_latent_loader_returns_the_stats_and_leaves_stage1_alone(tmp_path):
    cfg, dist, data, stage1 = _setup(tmp_path, "standardize")
    loader, stats = handoff.latent_loader(cfg, dist, data, stage1)
    assert loader is not None and loader.num_cells == 10
    assert stats is not None and stats.shift == pytest.approx(4.5)
    assert stage1.latent_stats is None and handoff.LATENT_STATS_TAG not in stage1.tags
    given = handoff.with_latent_stats(stage1, stats)
    assert given.latent_stats is stats and given.vae is stage1.vae
    assert json.loads(given.tags[handoff.LATENT_STATS_TAG]) == stats.to_dict()
    assert given.tags["scldm.stage"] == "ldm" and stage1.tags == {"scldm.stage": "ldm"}


def test_no_normalisation_means_no_stats(tmp_path):
    cfg, dist, data, stage1 = _setup(tmp_path, "none")
    loader, stats = handoff.latent_loader(cfg, dist, data, stage1)
    assert loader is not None and stats is None
    assert handoff.with_latent_stats(stage1, None) is stage1


def test_vocabulary_check_reads_the_training_loader(tmp_path):
    """Stage 2 checks the stage-1 genes against the training loader's var map: no second atlas open."""
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "data"))
    from soma_test_atlas import gene_ids, write_test_atlas

    from scldm_scale.config.data import SomaDataConfig
    from scldm_scale.data import build_loader

    uri = write_test_atlas(str(tmp_path / "a"), n_cells=60, n_genes=12)
    cfg = SomaDataConfig(atlas_uri=uri, seed=0, micro_batch_size=8)
    shared = GeneVocab.from_var(gene_ids(12)[:10])  # the atlas has 2 more genes: a warning, not an error
    handoff.check_vocabulary(build_loader(cfg, gene_vocab=shared), uri, Stage1(tmp_path, None, shared, "", "r"))
    vocab = GeneVocab.from_var([*gene_ids(12)[:10], "NOT_IN_ATLAS"])
    loader = build_loader(cfg, gene_vocab=vocab)
    with pytest.raises(ValueError, match=r"gene vocabulary mismatch.*1 of them are not in .*NOT_IN_ATLAS"):
        handoff.check_vocabulary(loader, uri, Stage1(tmp_path, None, vocab, "", "r"))
    with pytest.raises(ValueError, match="11 of them are not in"):  # nothing shared: the loader could not open
        handoff.check_vocabulary(None, uri, Stage1(tmp_path, None, vocab, "", "r"))
