"""Cross-field rules of the experiment roots (`scldm_scale/config/experiment.py`; config only, no torch)."""

from __future__ import annotations

import pytest

from scldm_scale.config import LDMExperimentConfig, VAEExperimentConfig, load_config


def test_stage1_sources_are_exclusive():
    with pytest.raises(ValueError, match="stage1.checkpoint and stage1.mlflow_run_id"):
        load_config(LDMExperimentConfig, overrides=["stage1.checkpoint=a", "stage1.mlflow_run_id=b"])

COLS = "data.label_columns=[dataset_id,cell_type]"


def test_guidance_weights_match_label_columns():
    with pytest.raises(ValueError, match="flow.guidance_weights"):
        load_config(LDMExperimentConfig, overrides=[COLS, "flow.guidance_weights=[1.0]"])
    load_config(LDMExperimentConfig, overrides=[COLS, "flow.guidance_weights=[1.0,2.0]"])
    # auto label columns (null): the number is known once the atlas is open; checked by the run then
    load_config(LDMExperimentConfig, overrides=["flow.guidance_weights=[1.0]"])


def test_stage2_run_dir_must_differ_from_stage1():
    with pytest.raises(ValueError, match="train.run_dir"):
        load_config(LDMExperimentConfig, overrides=["train.run_dir=./runs/vae-demo/"])
    with pytest.raises(ValueError, match="train.run_dir"):
        load_config(LDMExperimentConfig, overrides=["stage1.checkpoint=/x/s1", "train.run_dir=/x/s1"])


def test_several_problems_are_reported_together():
    with pytest.raises(ValueError, match="(?s)stage1.checkpoint and.*flow.guidance_weights"):
        load_config(
            LDMExperimentConfig,
            overrides=[COLS, "stage1.checkpoint=a", "stage1.mlflow_run_id=b", "flow.guidance_weights=[1.0]"],
        )


def test_latent_cache_budget_and_mode():
    with pytest.raises(ValueError, match="latent_cache.max_bytes"):
        load_config(LDMExperimentConfig, overrides=["latent_cache.max_bytes=-1"])
    with pytest.raises(ValueError, match="latent_cache.mode"):
        load_config(LDMExperimentConfig, overrides=["latent_cache.mode=maybe"])


def test_tracking_overrides_reach_both_roots():
    cfg = load_config(
        VAEExperimentConfig, overrides=["tracking.uri=http://127.0.0.1:5000", "tracking.log_interval_steps=2"]
    )
    assert cfg.tracking.uri == "http://127.0.0.1:5000" and cfg.tracking.log_interval_steps == 2
    with pytest.raises(ValueError, match="tracking.uri"):
        load_config(VAEExperimentConfig, overrides=["tracking.uri=mlruns"])
