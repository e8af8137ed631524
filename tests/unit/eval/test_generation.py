"""Generation: library-size statistics from manifests, conditions, per-cell seeds, counts, latent statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from scldm_scale.config.model import DiTConfig, VAEConfig
from scldm_scale.data import LibrarySizeStats, LogNormalFit
from scldm_scale.data.vocab import LabelVocab
from scldm_scale.eval import generate, sample_latents
from scldm_scale.eval.generation import (
    Condition,
    expand_conditions,
    generate_cells,
    parse_condition,
    read_conditions_csv,
)
from scldm_scale.eval.run import label_mix
from scldm_scale.models import LatentStats, build_dit, build_vae

VOCABS = {"dataset_id": LabelVocab("dataset_id", ["a", "b"]), "cell_type": LabelVocab("cell_type", ["B", "NK", "T"])}


def test_library_size_stats_fit_pool_fallback_and_manifest_round_trip():
    rng = np.random.default_rng(0)
    labels = np.array([[1, 1]] * 500 + [[2, 1]] * 500 + [[2, 2]] * 500 + [[3, 2]])  # (3, 2): one cell
    log_l = np.concatenate([rng.normal(6.0, 0.2, 500), rng.normal(9.0, 0.5, 500), rng.normal(8.0, 0.1, 500), [7.0]])
    stats = LibrarySizeStats.fit(np.exp(log_l), labels, ["dataset_id", "cell_type"])
    assert abs(stats.groups[(2, 1)].mean_log - 9.0) < 0.1 and abs(stats.groups[(2, 1)].std_log - 0.5) < 0.1
    again = LibrarySizeStats.from_manifest(json.loads(stats.to_json()))
    assert again.to_dict() == stats.to_dict()
    assert again.fit_for((1, 1)) == stats.groups[(1, 1)]
    pooled = again.fit_for((2, 0))  # dataset 2, any cell type: the union of (2,1) and (2,2)
    assert pooled.n == 1000 and abs(pooled.mean_log - 8.5) < 0.05
    assert again.fit_for((3, 2)).mean_log == pytest.approx(7.0)  # one cell: pooled over (3, *), itself
    assert again.fit_for((0, 0)) == again.overall and again.fit_for((9, 9)) == again.overall
    eps = np.random.default_rng(1).standard_normal(3000)
    drawn = again.sample(np.array([[1, 1]] * 3000), eps).log().double()
    assert abs(drawn.mean() - 6.0) < 0.02 and abs(drawn.std() - 0.2) < 0.02
    assert again.sample(None, eps[:3]).shape == (3,)


def test_library_size_stats_from_a_bad_manifest_names_the_key():
    good = LibrarySizeStats(["c"], LogNormalFit(3, 1.0, 0.1), {(1,): LogNormalFit(3, 1.0, 0.1)}).to_dict()
    del good["overall"]
    with pytest.raises(ValueError, match="ckpt/meta.json.*overall"):
        LibrarySizeStats.from_manifest(good, source="ckpt/meta.json")


def test_conditions_from_strings_and_csv(tmp_path):
    cond = parse_condition("dataset_id=b,cell_type=NK:7", VOCABS)
    assert cond == Condition((2, 2), 7)
    assert parse_condition("cell_type=T", VOCABS) == Condition((0, 3), 1)
    with pytest.raises(ValueError, match="cell_type='X' was not seen"):
        parse_condition("cell_type=X:3", VOCABS)
    with pytest.raises(ValueError, match="tissue"):
        parse_condition("tissue=lung:3", VOCABS)
    with pytest.raises(ValueError, match="integer"):
        parse_condition("cell_type=T:many", VOCABS)
    path = tmp_path / "mix.csv"
    path.write_text("cell_type,n\nB,2\nT,3\n")
    conds = read_conditions_csv(path, VOCABS)
    assert conds == [Condition((0, 1), 2), Condition((0, 3), 3)]
    assert expand_conditions(conds, 2).tolist() == [[0, 1]] * 2 + [[0, 3]] * 3
    (tmp_path / "bad.csv").write_text("cell_type,n\nB,two\n")
    with pytest.raises(ValueError, match="bad.csv line 2"):
        read_conditions_csv(tmp_path / "bad.csv", VOCABS)


def test_label_mix_keeps_proportions_and_total():
    rows = np.array([[1, 1]] * 50 + [[2, 3]] * 30 + [[1, 2]] * 20)
    mix = label_mix(rows, 7)
    assert sum(c.count for c in mix) == 7
    assert {c.labels: c.count for c in mix} == {(1, 1): 4, (2, 3): 2, (1, 2): 1}


def _models(likelihood: str = "nb"):
    torch.manual_seed(0)
    vae = build_vae(VAEConfig(dim=16, latent_dim=4, num_latent_tokens=3, num_layers=1, num_heads=2,
                              num_cross_heads=2, likelihood=likelihood), 30)
    dit = build_dit(DiTConfig(dim=16, num_layers=1, num_heads=2), vae.latent_shape, [2, 3])
    return vae, dit


def _stats():
    return LibrarySizeStats(["dataset_id", "cell_type"], LogNormalFit(100, np.log(500.0), 0.01),
                            {(1, 0): LogNormalFit(100, np.log(50.0), 0.01)})


@pytest.mark.parametrize("likelihood", ["nb", "gaussian"])
def test_generate_counts_with_library_sizes_from_the_statistics(likelihood):
    vae, dit = _models(likelihood)
    labels = torch.tensor([[1, 0], [2, 3], [0, 0], [1, 2]])
    out = generate(dit, vae, labels, library_size_stats=_stats(), sampler="euler", num_steps=4,
                   guidance_weights=[2.0, 1.0], gene_chunk_size=7, seed=0)
    counts = out["counts"]
    assert counts.shape == (4, 30) and torch.equal(counts, counts.round()) and (counts >= 0).all()
    assert out["z"].shape == (4, 3, 4)
    assert abs(out["library_size"][0].item() - 50.0) < 2.0  # condition (1, 0) has its own fit
    assert abs(out["library_size"][1].item() - 500.0) < 20.0  # (2, 3) unseen: the overall fit
    if likelihood == "nb":
        torch.testing.assert_close(out["mu"].sum(1), out["library_size"], rtol=1e-4, atol=1e-2)
    unc = generate(dit, vae, None, num_cells=2, library_size=torch.tensor([10.0, 20.0]), num_steps=2)
    assert unc["counts"].shape == (2, 30) and unc["library_size"].tolist() == [10.0, 20.0]


def test_a_cell_depends_only_on_seed_and_index_not_on_its_batch():
    vae, dit = _models()
    labels = torch.tensor([[1, 1], [2, 3], [0, 0], [1, 2], [2, 1]])
    kw = dict(sampler="heun", num_steps=3, seed=11)
    whole = generate_cells(dit, vae, _stats(), labels, range(5), **kw)
    parts = [generate_cells(dit, vae, _stats(), labels[s], idx, **kw) for s, idx in
             ((slice(0, 2), range(0, 2)), (slice(2, 5), range(2, 5)))]
    for key in ("z", "library_size", "counts"):
        torch.testing.assert_close(torch.cat([p[key] for p in parts]), whole[key], rtol=1e-5, atol=1e-5)
    other = generate_cells(dit, vae, _stats(), labels, range(5), sampler="heun", num_steps=3, seed=12)
    assert not torch.equal(other["counts"], whole["counts"])


def test_sampling_applies_latent_stats():
    _, dit = _models()
    kw = dict(sampler="heun", num_steps=3)
    a = sample_latents(dit, None, 2, generator=torch.Generator().manual_seed(0), **kw)
    stats = LatentStats(shift=1.0, scale=2.0)
    c = sample_latents(dit, None, 2, generator=torch.Generator().manual_seed(0), latent_stats=stats, **kw)
    torch.testing.assert_close(c, a * 2.0 + 1.0)
    assert LatentStats.from_dict(LatentStats.fit(torch.randn(100, 3, 4) * 3 + 1).to_dict()).scale > 2.5


def test_joint_guidance_refuses_partly_free_rows_a_joint_model_never_saw():
    from scldm_scale.eval.generation import check_partial_rows

    cols = ["dataset_id", "cell_type"]
    rows = np.array([[1, 2], [0, 0], [1, 0]])
    with pytest.raises(ValueError, match=r"leaves \['cell_type'\] free.*sampling.guidance=additive"):
        check_partial_rows(rows, cols, {(1, 2)}, trained_joint=True, strategy="joint")
    check_partial_rows(rows, cols, {(1, 2), (1, 0)}, trained_joint=True, strategy="joint")  # seen in training
    check_partial_rows(rows, cols, set(), trained_joint=False, strategy="joint")  # per-column dropout saw them
    check_partial_rows(rows, cols, set(), trained_joint=True, strategy="additive")
    check_partial_rows(rows[:2], cols, set(), trained_joint=True, strategy="joint")  # whole and all-null rows
