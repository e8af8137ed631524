"""The launchers end to end, as users start them: torchrun (single and multi-node), deepspeed and python.

Cheapest first: a plain-python stage-2 launch that must fail on a mismatched gene vocabulary; then one
2-rank torchrun stage-1 job whose MLflow run (SQLite store) is queried back, resumed, and handed to a
2-rank stage-2 job by its run id; then a 2-node torchrun job logging to a real `mlflow server`; last,
`deepspeed --num_gpus 2 launchers/train_vae.py` with no argument at all.
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
    """A real `mlflow server` on 127.0.0.1, booting in the background while the first tests run."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stage1(demo_atlas, tmp_path_factory, mlflow_server):
    """One 2-rank ZeRO-2 stage-1 job on the debug preset, tracked in a SQLite MLflow store."""
    root = tmp_path_factory.mktemp("stage1")
    uri = f"sqlite:///{root}/mlflow.db"
    args = [
        *SMALL_DATA,
        "engine.name=zero2",
        f"train.run_dir={root}/s1",
        f"tracking.uri={uri}",
        "tracking.log_interval_steps=1",
        "tracking.system_metrics_interval_seconds=1",
        "checkpoint.interval_steps=2",
    ]
    cmd = [*TORCHRUN, "--standalone", "--nproc_per_node", "2", VAE, "--config", VAE_DEBUG, *args]
    run([*cmd, "train.max_steps=4"], launch_env(demo_atlas))
    return {"root": root, "uri": uri, "cmd": cmd}


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _only_run(client, experiment: str = "scldm_scale"):
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def test_stage2_rejects_a_mismatched_vocabulary(demo_atlas, stage1, synthetic_atlas, tmp_path):
    cmd = [
        sys.executable,
        LDM,
        "--config",
        LDM_DEBUG,
        f"data.atlas_uri={synthetic_atlas}",
        "data.label_columns=[dataset_id]",
        f"stage1.checkpoint={stage1['root']}/s1",
        f"train.run_dir={tmp_path}/s2",
        "tracking.backend=none",
    ]
    proc = run(cmd, launch_env(demo_atlas), check=False)
    assert proc.returncode != 0
    message = re.search(r"ValueError: (gene vocabulary mismatch.*)", proc.stderr)
    assert message, proc.stderr[-3000:]
    assert "not in data.atlas_uri" in message.group(1) and "stage-1 autoencoder" in message.group(1)


def test_one_mlflow_run_per_job_resumed_and_handed_to_stage2(demo_atlas, stage1, tmp_path):
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
    losses = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in losses] == [1, 2, 3, 4]
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
    assert s1_run.data.tags["scldm.checkpoint"].endswith("step-00000004")

    # A resumed job (same run_dir, more steps) continues the same run.
    run([*stage1["cmd"], "train.max_steps=6"], launch_env(demo_atlas))
    resumed = _only_run(client)
    assert resumed.info.run_id == run_id and resumed.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3, 4, 5, 6]

    # Stage 2 found through the stage-1 run id alone; FSDP2, latent cache, generation scores at the end.
    cmd = [
        *TORCHRUN,
        "--standalone",
        "--nproc_per_node",
        "2",
        LDM,
        "--config",
        LDM_DEBUG,
        *SMALL_DATA,
        f"stage1.mlflow_run_id={run_id}",
        f"tracking.uri={stage1['uri']}",
        "engine.name=fsdp2",
        f"train.run_dir={tmp_path}/s2",
        "train.max_steps=4",
        "tracking.log_interval_steps=1",
        "latent_cache.mode=always",
        "eval.num_cells=48",
        "flow.num_steps=2",
    ]
    run(cmd, launch_env(demo_atlas))
    exp_id = client.get_experiment_by_name("scldm_scale").experiment_id
    (s2_run,) = [r for r in client.search_runs([exp_id]) if r.info.run_id != run_id]
    assert s2_run.data.tags["scldm.stage1.run_id"] == run_id
    assert s2_run.data.tags["scldm.stage1.checkpoint"].endswith("step-00000006")
    assert s2_run.data.params["run.latent_cache"] == "True"
    assert len(client.get_metric_history(s2_run.info.run_id, "train/fm_mse")) == 4
    assert {"eval/w2", "eval/mmd2_rbf", "eval/fd"} <= set(s2_run.data.metrics)
    assert "plots/generated_vs_real_pca.png" in {
        a.path for a in client.list_artifacts(s2_run.info.run_id, "plots")
    }


def test_two_nodes_train_and_checkpoint_into_a_real_mlflow_server(demo_atlas, mlflow_server, tmp_path):
    mlflow_server.wait_ready()
    port = free_port()
    args = [
        VAE,
        "--config",
        VAE_DEBUG,
        *SMALL_DATA,
        "engine.name=zero1",
        "train.max_steps=3",
        f"train.run_dir={tmp_path}/run",
        f"tracking.uri={mlflow_server.uri}",
        "tracking.log_interval_steps=1",
        "tracking.experiment_name=multinode",
        "tracking.enable_plots=false",
    ]
    env = launch_env(demo_atlas)
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
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    for node, out in zip(nodes, outputs):
        assert node.returncode == 0, out[-4000:]
    assert (tmp_path / "run" / "checkpoints" / "step-00000003" / "meta.json").exists()
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step-00000003" / "meta.json").read_text())
    assert meta["world_size"] == 2
    client = _client(mlflow_server.uri)
    only = _only_run(client, "multinode")
    assert only.data.params["run.world_size"] == "2" and meta["manifest"]["mlflow_run_id"] == only.info.run_id
    assert [m.step for m in client.get_metric_history(only.info.run_id, "train/loss")] == [1, 2, 3]


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
        progressed = any(re.search(r"\b[1-9]\d*/300\b", line) for line in list(lines))
    text = "".join(lines)  # what both ranks printed until training was seen running
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)
    assert progressed, "".join(lines)[-4000:]
    assert "world_size=2" in text and "Traceback" not in text
    assert (tmp_path / "runs" / "vae-demo" / "config.yaml").exists()
    assert (tmp_path / "mlruns.db").exists()
