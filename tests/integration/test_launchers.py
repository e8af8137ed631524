"""The launchers end to end, as users start them: torchrun (single and multi-node), deepspeed and python.

One stage-1 job on two simulated nodes (torchrun --nnodes 2 --node_rank 0/1 on 127.0.0.1) logs to a real
`mlflow server` started and stopped here; its run is queried back, a mismatched atlas is refused by stage 2,
and a plain-python stage-2 job finds the autoencoder through the stage-1 run id alone. Last,
`deepspeed --num_gpus 2 launchers/train_vae.py` with no argument at all. (Resume of the MLflow run is in
tests/distributed/test_run_engines.py, in-process.)
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.integration._launch import (
    LDM,
    LDM_DEBUG,
    SMALL_DATA,
    TORCHRUN,
    VAE,
    VAE_DEBUG,
    MlflowServer,
    free_port,
    launch_env,
    run,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (SQLite store, proxied artifacts), stopped after the module."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stage1(demo_atlas, tmp_path_factory, mlflow_server):
    """One stage-1 job on two simulated nodes (torchrun --nnodes 2, one ZeRO-2 rank each, static rendezvous on
    127.0.0.1), logging to the real MLflow server."""
    root = tmp_path_factory.mktemp("stage1")
    args = [
        VAE,
        "--config",
        VAE_DEBUG,
        *SMALL_DATA,
        "engine.name=zero2",
        "train.max_steps=4",
        f"train.run_dir={root}/s1",
        f"tracking.uri={mlflow_server.uri}",
        "tracking.log_interval_steps=1",
        "tracking.system_metrics_interval_seconds=1",
        "checkpoint.interval_steps=2",
    ]
    env, port = launch_env(demo_atlas), free_port()
    mlflow_server.wait_ready()
    nodes = [
        subprocess.Popen(
            [
                *TORCHRUN,
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--node_rank",
                str(rank),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
                *args,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    for node, out in zip(nodes, outputs):
        assert node.returncode == 0, out[-4000:]
    return {"root": root, "uri": mlflow_server.uri, "run_dir": root / "s1"}


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _only_run(client, experiment: str = "scldm_scale"):
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def test_stage2_rejects_a_mismatched_vocabulary(stage1, synthetic_atlas, tmp_path, monkeypatch):
    import scldm_scale.utils.logging as package_logging
    from scldm_scale.config import LDMExperimentConfig, load_config
    from scldm_scale.train.run import run_ldm

    # In-process: keep this pytest process's logging and environment as the other tests expect them.
    monkeypatch.setattr(package_logging, "_CONFIGURED", True)
    monkeypatch.setenv("LOCAL_RANK", "0")
    cfg = load_config(
        LDMExperimentConfig,
        [LDM_DEBUG],
        [
            f"data.atlas_uri={synthetic_atlas}",
            "data.label_columns=[dataset_id]",
            f"stage1.checkpoint={stage1['run_dir']}",
            f"train.run_dir={tmp_path}/s2",
            "tracking.backend=none",
            "train.device=cpu",
        ],
    )
    with pytest.raises(ValueError, match="gene vocabulary mismatch") as info:
        run_ldm(cfg)
    assert "not in data.atlas_uri" in str(info.value) and str(stage1["run_dir"]) in str(info.value)


def test_one_mlflow_run_per_two_node_job_with_everything_logged(demo_atlas, stage1):
    client = _client(stage1["uri"])
    s1_run = _only_run(client)
    run_id = s1_run.info.run_id
    params = s1_run.data.params
    assert (
        params["engine.name"] == "zero2"
        and params["run.world_size"] == "2"
        and params["train.max_steps"] == "4"
    )
    assert params["data.atlas_uri"] == "demo" and params["run.atlas_uri"] == demo_atlas
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3, 4]
    for key in (
        "train/lr",
        "train/grad_norm",
        "train/nll",
        "sys/cells_per_second",
        "sys/cells_per_second_per_rank",
        "sys/data_wait_fraction_max",
        "sys/rss_gb_max",
    ):
        assert key in s1_run.data.metrics, key
    assert any(k.startswith("system/") for k in s1_run.data.metrics), "system metrics are on"
    (dataset,) = s1_run.inputs.dataset_inputs
    source = json.loads(dataset.dataset.source)
    assert source["uri"] == demo_atlas and "brain10k" in source["value_filter"]
    assert json.loads(dataset.dataset.profile)["num_cells"] == int(params["run.num_cells"]) > 0
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {
        a.path for a in client.list_artifacts(run_id, "plots")
    }
    assert {"config.yaml", "gene_vocab.json", "plots/loss_curves.png"} <= artifacts
    ckpt = stage1["run_dir"] / "checkpoints" / "step-00000004"
    assert s1_run.data.tags["scldm.checkpoint"] == str(ckpt)
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["manifest"]["mlflow_run_id"] == run_id
    lib = meta["manifest"]["library_size_stats"]
    assert (
        sorted(lib["label_columns"]) == sorted(meta["manifest"]["label_vocabs"]) and lib["overall"]["n"] > 0
    )
    assert all(g["n"] > 0 and g["std_log"] >= 0 for g in lib["groups"].values())


def test_stage2_from_the_stage1_run_id_under_plain_python(demo_atlas, stage1, tmp_path):
    cmd = [
        sys.executable,
        LDM,
        "--config",
        LDM_DEBUG,
        *SMALL_DATA,
        f"stage1.mlflow_run_id={_only_run(_client(stage1['uri'])).info.run_id}",
        f"tracking.uri={stage1['uri']}",
        f"train.run_dir={tmp_path}/s2",
        "train.max_steps=4",
        "tracking.log_interval_steps=1",
        "latent_cache.mode=always",
        "eval.num_cells=48",
        "flow.num_steps=2",
        "tracking.enable_system_metrics=false",
    ]
    run(cmd, launch_env(demo_atlas))
    client = _client(stage1["uri"])
    exp_id = client.get_experiment_by_name("scldm_scale").experiment_id
    s2_run = next(r for r in client.search_runs([exp_id]) if r.data.tags.get("scldm.stage") == "ldm")
    s1_id = next(
        r.info.run_id for r in client.search_runs([exp_id]) if r.data.tags.get("scldm.stage") == "vae"
    )
    assert s2_run.data.tags["scldm.stage1.run_id"] == s1_id
    assert s2_run.data.tags["scldm.stage1.checkpoint"].endswith("step-00000004")
    assert s2_run.data.params["run.latent_cache"] == "True" and s2_run.data.params["run.world_size"] == "1"
    assert len(client.get_metric_history(s2_run.info.run_id, "train/fm_mse")) == 4
    scored = {f"eval/{s}/{m}" for s in ("scldm", "real_floor") for m in ("w2", "mmd2_unbiased", "fd", "energy")}
    assert scored <= set(s2_run.data.metrics)
    assert {"plots/generated_vs_real_pca.png", "plots/per_condition_metrics.png"} <= {
        a.path for a in client.list_artifacts(s2_run.info.run_id, "plots")
    }


def test_deepspeed_launcher_with_no_argument_trains_the_demo(demo_atlas, tmp_path):
    """`deepspeed --num_gpus 2 launchers/train_vae.py`: the demo preset, two CPU ranks; stopped once training runs."""
    proc = subprocess.Popen(
        ["deepspeed", "--num_gpus", "2", VAE],
        cwd=tmp_path,
        env=launch_env(demo_atlas),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline, progressed = time.monotonic() + 240, False
    while time.monotonic() < deadline and proc.poll() is None and not progressed:
        time.sleep(1)
        progressed = any(
            re.search(r"\btrain:.*\b[1-9]\d*/\d+ \[", line) for line in list(lines)
        )  # tqdm: 1/250 [
    text = "".join(lines)  # what both ranks printed until training was seen running
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)
    assert progressed, "".join(lines)[-4000:]
    assert "world_size=2" in text and "Traceback" not in text
    assert (tmp_path / "runs" / "vae-demo" / "config.yaml").exists()
    assert (tmp_path / "mlruns.db").exists()
