"""Every engine trains stage 1 and then stage 2 (from the stage-1 checkpoint) on the demo atlas, 2 gloo ranks.

One spawn runs all five engines in turn (imports and the process group are paid once). Stage 2 alternates
between the latent cache and on-the-fly encoding; ZeRO-0 logs to an MLflow server that is down, and must
finish anyway with its records kept in the run_dir; ZeRO-2 tracks to SQLite and is resumed in place, which
must continue the same MLflow run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tests.distributed._helpers import free_port, run_on_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ENGINES = ("zero0", "zero1", "zero2", "zero3", "fsdp2")
STEPS = 6
# A small slice of the demo atlas (the two small datasets) and a tiny model keep 10 jobs near a minute.
DATA = [
    "data.value_filter=split == 'train' and dataset_id != 'brain10k'",
    "data.micro_batch_size=32",
    "data.min_gene_cells=300",
    "data.seed=0",
]
COMMON = [
    *DATA,
    f"train.max_steps={STEPS}",
    "train.enable_progress_bar=false",
    "checkpoint.interval_steps=100",
    "tracking.backend=none",
    "tracking.enable_stdout=false",
    "tracking.log_interval_steps=1",
    "tracking.enable_plots=false",
]
VAE = ["model.dim=32", "model.num_layers=1", "optim.lr=3e-3", "optim.warmup_fraction=0.0"]
LDM = [
    "model.dim=32",
    "model.num_layers=1",
    "optim.lr=2e-3",
    "optim.warmup_fraction=0.0",
    "eval.enable_at_end=false",
]


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _all_engines(rank: int, world_size: int, tmp_path: Path, tracking: dict[str, list[str]]) -> dict:
    from scldm_scale.config import LDMExperimentConfig, VAEExperimentConfig, load_config
    from scldm_scale.train.run import run_ldm, run_vae

    warnings = _Warnings()
    # run_* (re)configures the package logger; a handler on the child logger survives that.
    logging.getLogger("scldm_scale.tracking.mlflow").addHandler(warnings)
    out: dict = {}
    for i, engine in enumerate(ENGINES):
        s1, s2 = tmp_path / engine / "s1", tmp_path / engine / "s2"
        vae_args = [*COMMON, *VAE, *tracking.get(engine, []), f"engine.name={engine}", f"train.run_dir={s1}"]
        vae = run_vae(load_config(VAEExperimentConfig, overrides=vae_args))
        cache = "always" if i % 2 else "never"
        ldm = run_ldm(
            load_config(
                LDMExperimentConfig,
                overrides=[
                    *COMMON,
                    *LDM,
                    f"engine.name={engine}",
                    f"train.run_dir={s2}",
                    f"stage1.checkpoint={s1}",
                    f"latent_cache.mode={cache}",
                ],
            )
        )
        out[engine] = {
            "vae": vae.train.losses,
            "ldm": ldm.train.losses,
            "cache": cache,
            "run_id": vae.run_id,
            "vae_ckpt": str(vae.train.last_checkpoint),
            "ldm_step": ldm.train.final_step,
        }
        if engine == "zero2":  # the same job resumed from its checkpoint, two steps further
            resumed = run_vae(
                load_config(VAEExperimentConfig, overrides=[*vae_args, f"train.max_steps={STEPS + 2}"])
            )
            out["resumed"] = {
                "run_id": resumed.run_id,
                "start": resumed.train.start_step,
                "end": resumed.train.final_step,
            }
    out["warnings"] = warnings.messages
    return out


def _decreased(losses: list[float]) -> bool:
    """Noisy per-batch losses: the mean of the last two steps is below the first step's."""
    return sum(losses[-2:]) / 2 < losses[0]


def test_every_engine_trains_both_stages(demo_atlas, tmp_path):
    mlflow = ["tracking.backend=mlflow", "tracking.enable_system_metrics=false"]
    tracking = {
        # ZeRO-0 logs to a server that is down; ZeRO-2 to a SQLite store, then resumes.
        "zero0": [
            *mlflow,
            f"tracking.uri=http://127.0.0.1:{free_port()}",
            "tracking.request_timeout_seconds=1",
            "tracking.request_max_retries=0",
        ],
        "zero2": [*mlflow, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"],
    }
    results = run_on_ranks(_all_engines, 2, tmp_path, timeout=600, tracking=tracking)
    r0, r1 = results
    for engine in ENGINES:
        res = r0[engine]
        assert len(res["vae"]) == STEPS and len(res["ldm"]) == STEPS and res["ldm_step"] == STEPS
        assert _decreased(res["vae"]), (engine, "stage 1", res["vae"])
        assert _decreased(res["ldm"]), (engine, "stage 2", res["ldm"])
        assert res["vae"] == r1[engine]["vae"], "ranks must agree on the global loss"
        assert Path(res["vae_ckpt"]).name == f"step-{STEPS:08d}"
        cache_index = tmp_path / engine / "s2" / "latent_cache" / "index.json"
        assert cache_index.exists() == (res["cache"] == "always")
        if cache_index.exists():
            assert json.loads(cache_index.read_text())["num_cells"] > 0
    # One MLflow run per 2-rank job, known to both ranks; the resumed job continued it.
    from mlflow.tracking import MlflowClient

    run_id = r0["zero2"]["run_id"]
    assert run_id and r1["zero2"]["run_id"] == run_id
    assert r0["resumed"] == {"run_id": run_id, "start": STEPS, "end": STEPS + 2}
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (only,) = client.search_runs([client.get_experiment_by_name("scldm_scale").experiment_id])
    assert only.info.run_id == run_id and only.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == list(range(1, STEPS + 3))
    assert only.data.params["train.max_steps"] == str(STEPS)  # first value kept; the change is warned about
    # The tracking server was down for ZeRO-0's stage 1: it warned, trained, and kept every record.
    assert any("unreachable" in m for m in r0["warnings"])
    pending = (tmp_path / "zero0" / "s1" / "mlflow_pending.jsonl").read_text().splitlines()
    logged_steps = [json.loads(line)["step"] for line in pending if json.loads(line)["op"] == "metrics"]
    assert logged_steps == list(range(1, STEPS + 1))
