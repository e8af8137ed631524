"""Config loading: every YAML under configs/ loads into its schema; bad input names the dotted key."""

from __future__ import annotations

from pathlib import Path

import pytest

from scldm_scale.config import (
    DEFAULT_LABEL_COLUMNS,
    ConfigError,
    LDMExperimentConfig,
    SomaDataConfig,
    VAEExperimentConfig,
    load_config,
    load_config_text,
    to_flat_dict,
    to_yaml,
)
from scldm_scale.config.experiment import check_guidance_weights

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
STAGE_FILES = sorted(CONFIGS.glob("vae/*.yaml")) + sorted(CONFIGS.glob("ldm/*.yaml"))
ENGINE_FILES = sorted(CONFIGS.glob("engine/*.yaml"))


def _root_for(path: Path):
    return VAEExperimentConfig if path.parent.name == "vae" else LDMExperimentConfig


def test_configs_folder_has_stage_files():
    names = {p.relative_to(CONFIGS).as_posix() for p in STAGE_FILES}
    assert {"vae/debug.yaml", "vae/demo.yaml", "ldm/debug.yaml", "ldm/demo.yaml"} <= names


@pytest.mark.parametrize("path", STAGE_FILES, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_every_stage_yaml_loads(path):
    cfg = load_config(_root_for(path), [path])
    assert isinstance(cfg, _root_for(path))


@pytest.mark.parametrize("engine", ENGINE_FILES, ids=lambda p: p.stem)
@pytest.mark.parametrize("stage", ["vae", "ldm"])
def test_every_engine_overlay_loads_on_both_stages(stage, engine):
    root = VAEExperimentConfig if stage == "vae" else LDMExperimentConfig
    cfg = load_config(root, [CONFIGS / stage / "debug.yaml", engine])
    assert cfg.engine.name in {"zero0", "zero1", "zero2", "zero3", "fsdp2"}


def test_overrides_apply_last():
    cfg = load_config(VAEExperimentConfig, [], ["train.max_steps=7", "engine.name=fsdp2", "data.seed=3"])
    assert (cfg.train.max_steps, cfg.engine.name, cfg.data.seed) == (7, "fsdp2", 3)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.bogus=1", "train.bogus"),
        ("engine.name=zero9", "engine.name"),
        ("train.max_steps=abc", "train.max_steps"),
        ("train.max_steps=0", "train.max_steps"),
        ("data.micro_batch_size=0", "data.micro_batch_size"),
        ("tracking.log_interval_steps=0", "tracking.log_interval_steps"),
        ("checkpoint.keep_latest_k=0", "checkpoint.keep_latest_k"),
        ("optim.lr=-1", "optim.lr"),
    ],
)
def test_bad_values_name_the_dotted_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
        load_config(VAEExperimentConfig, [], [override])
    assert "\n" not in str(info.value)


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  not_a_field: 3\n")
    with pytest.raises(ValueError, match=r"bad\.yaml.*model\.not_a_field"):
        load_config(VAEExperimentConfig, [bad])


def test_missing_file_and_malformed_override():
    with pytest.raises(ValueError, match="does not exist"):
        load_config(VAEExperimentConfig, ["/nonexistent/x.yaml"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(VAEExperimentConfig, [], ["train.max_steps"])


def test_flatten_and_yaml_round_trip(tmp_path):
    cfg = load_config(LDMExperimentConfig, [], ["train.max_steps=11"])
    flat = to_flat_dict(cfg)
    assert flat["train.max_steps"] == 11 and "optim.lr" in flat
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(LDMExperimentConfig, [path]) == cfg
    assert load_config_text(LDMExperimentConfig, to_yaml(cfg)) == cfg  # a manifest's config_yaml, no file


def test_yaml_text_names_its_source_and_key():
    with pytest.raises(ConfigError, match=r"meta\.json.*model\.not_a_field"):
        load_config_text(VAEExperimentConfig, "model:\n  not_a_field: 3\n", source="ckpt/meta.json")


def test_config_error_is_a_one_line_value_error():
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ConfigError) as info:  # several cross-field problems: still one line
        load_config(
            LDMExperimentConfig,
            overrides=[
                "stage1.checkpoint=a",
                "stage1.mlflow_run_id=b",
                "flow.guidance_weights=[1.0]",
                "data.label_columns=[dataset_id,cell_type]",
            ],
        )
    message = str(info.value)
    assert "\n" not in message and message.startswith("invalid config: stage1.checkpoint and")
    assert "; flow.guidance_weights needs one weight per data.label_columns entry (2" in message


def test_unknown_key_lists_the_valid_keys_of_its_section():
    with pytest.raises(ConfigError, match="valid keys here: .*max_steps") as info:
        load_config(VAEExperimentConfig, [], ["train.max_stepz=1"])
    assert "train.max_stepz" in str(info.value)


def test_label_columns_default_to_auto():
    cfg = load_config(VAEExperimentConfig)
    assert cfg.data.label_columns is None and DEFAULT_LABEL_COLUMNS == ("dataset_id", "cell_type")
    assert load_config(VAEExperimentConfig, [], ["data.label_columns=[]"]).data.label_columns == []
    assert "label_columns: null" in to_yaml(cfg)
    with pytest.raises(ValueError, match="data.label_columns has duplicates"):
        SomaDataConfig(label_columns=["a", "a"])


def test_guidance_weights_are_checked_at_load_only_for_explicit_label_columns():
    cfg = load_config(LDMExperimentConfig, [], ["flow.guidance_weights=[1.0]"])  # auto: unknown yet
    check_guidance_weights(cfg, ["dataset_id"])
    with pytest.raises(ConfigError, match=r"flow.guidance_weights .* \(2: dataset_id, cell_type\), got 1"):
        check_guidance_weights(cfg, ["dataset_id", "cell_type"])
    with pytest.raises(ConfigError, match="flow.guidance_weights"):
        load_config(LDMExperimentConfig, [], ["flow.guidance_weights=[1.0]", "data.label_columns=[a,b]"])
