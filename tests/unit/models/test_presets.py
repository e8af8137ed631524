"""Size presets: the named presets exist, parameter counts match the paper / reference within 10%, and the
model / flow config checks name their dotted keys (that every YAML loads: tests/unit/config/test_config.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from scldm_scale.config import (
    DiTConfig,
    FlowConfig,
    LDMExperimentConfig,
    VAEConfig,
    VAEExperimentConfig,
    load_config,
)
from scldm_scale.models import count_dit_parameters, count_vae_parameters

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
CENSUS_GENES = 36_130


def test_all_presets_present():
    names = {p.stem for p in (CONFIGS / "vae").glob("*.yaml")}
    assert {"debug", "demo", "base", "census_20m", "census_70m", "census_270m"} <= names
    assert {"debug", "demo", "base"} <= {p.stem for p in (CONFIGS / "ldm").glob("*.yaml")}


@pytest.mark.parametrize(
    "name,num_genes,target",
    [
        ("census_20m", CENSUS_GENES, 20e6),
        ("census_70m", CENSUS_GENES, 70e6),
        ("census_270m", CENSUS_GENES, 270e6),
        ("base", 2_000, 0.30e6),  # the authors' vae_base on Parse / Replogle (2,000 HVGs): ~0.30M
        ("base", 17_002, 0.79e6),  # the authors' vae_base on dentate gyrus: ~0.79M
    ],
)
def test_vae_parameter_counts(name, num_genes, target):
    cfg = load_config(VAEExperimentConfig, [CONFIGS / "vae" / f"{name}.yaml"]).model
    count = count_vae_parameters(cfg, num_genes)
    assert abs(count - target) / target < 0.10, (name, count)


def test_dit_base_parameter_count():
    cfg = load_config(LDMExperimentConfig, [CONFIGS / "ldm" / "base.yaml"]).model
    count = count_dit_parameters(cfg, (16, 16), [14])
    assert abs(count - 9.7e6) / 9.7e6 < 0.10, count  # the authors' DiT preset: ~9.7M


@pytest.mark.parametrize(
    "make,key",
    [
        (lambda: VAEConfig(dim=0), "model.dim"),
        (lambda: VAEConfig(dim=30, num_heads=4), "model.num_heads"),
        (lambda: VAEConfig(dropout=1.5), "model.dropout"),
        (lambda: VAEConfig(kl_weight=-1.0), "model.kl_weight"),
        (lambda: VAEConfig(gene_chunk_size=0), "model.gene_chunk_size"),
        (lambda: VAEConfig(num_genes=0), "model.num_genes"),
        (lambda: VAEConfig(norm_eps=0.0), "model.norm_eps"),
        (lambda: VAEConfig(gaussian_target_sum=0.0), "model.gaussian_target_sum"),
        (lambda: VAEConfig(likelihood="gaussian", dispersion="cell_gene"), "model.dispersion"),
        (lambda: DiTConfig(num_heads=3), "model.num_heads"),
        (lambda: DiTConfig(time_embed_dim=255), "model.time_embed_dim"),
        (lambda: DiTConfig(cfg_dropout_prob=1.5), "model.cfg_dropout_prob"),
        (lambda: DiTConfig(label_embedding="combination"), "model.label_embedding"),
        (lambda: DiTConfig(time_scale=0.0), "model.time_scale"),
        (lambda: FlowConfig(num_steps=0), "flow.num_steps"),
        (lambda: FlowConfig(atol=0.0), "flow.atol"),
        (lambda: FlowConfig(ema_decay=1.0), "flow.ema_decay"),
        (lambda: FlowConfig(ema_update_every=0), "flow.ema_update_every"),
        (lambda: FlowConfig(ema_update_after_step=-1), "flow.ema_update_after_step"),
        (lambda: FlowConfig(guidance_weights=[-1.0]), "flow.guidance_weights"),
    ],
)
def test_config_checks_name_the_key(make, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        make()
