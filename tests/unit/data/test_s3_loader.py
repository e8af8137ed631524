"""Object-store round trip: a local S3-compatible server (moto, 127.0.0.1), an atlas written there through the
ingestion path, streamed back through the loader; the server is stopped by its process id. Also: an ingest
killed (a real SIGKILL) or failing mid-write leaves the loader the committed cells only; the TLS flag."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scldm_scale.config.data import SomaDataConfig
from scldm_scale.data import build_loader

BUCKET = "scldm-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto in server mode on a free local port, with fake credentials in the environment."""
    boto3 = pytest.importorskip("boto3")
    port = _free_port()
    exe = shutil.which("moto_server")
    cmd = [exe] if exe else [sys.executable, "-m", "moto.server"]
    proc = subprocess.Popen(
        [*cmd, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    saved = {
        k: os.environ.get(k)
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_REGION")
    }
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_REGION="us-east-1",
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.1)
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _adata(n_cells: int, seed: int, n_genes: int = 20) -> anndata.AnnData:
    rng = np.random.default_rng(seed)
    X = sp.random(n_cells, n_genes, density=0.3, format="csr", random_state=seed, dtype=np.float32)
    X.data = np.ceil(X.data * 10).astype(np.float32)
    obs = pd.DataFrame(
        {
            "cell_type": rng.choice(["B", "T"], n_cells),
            "split": np.where(np.arange(n_cells) % 4 == 0, "val", "train"),
        },
        index=[f"s{seed}_c{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"ENSG{i:05d}" for i in range(n_genes)])
    return anndata.AnnData(X=X, obs=obs, var=var)


def test_s3_round_trip_through_ingestion(s3_endpoint):
    from data_pipelines.ingest import ingest_anndata

    uri = f"s3://{BUCKET}/atlas"
    adatas = [_adata(40, 0), _adata(24, 1)]
    ingest_anndata(
        uri,
        adatas,
        dataset_ids=["d0", "d1"],
        label_columns=["cell_type", "split"],
        s3_endpoint_url=s3_endpoint,
    )
    cfg = SomaDataConfig(
        atlas_uri=uri,
        s3_endpoint_url=s3_endpoint,
        micro_batch_size=8,
        seed=0,
        shuffle_chunk_cells=8,
        shuffle_buffer_cells=16,
        label_columns=["dataset_id", "cell_type"],
    )
    loader = build_loader(cfg, rank=0, world_size=1)
    batches = list(loader)
    joinids = [j for b in batches for j in b["soma_joinid"][~b["is_padding"]].tolist()]
    assert len(joinids) == len(set(joinids)) == 30 + 18  # the train cells of both datasets
    # counts survive the trip: library sizes equal the AnnData rows of the same cells
    expected = np.concatenate([np.asarray(a.X.sum(1)).ravel() for a in adatas])
    is_train = np.concatenate([a.obs["split"].to_numpy() == "train" for a in adatas])
    got = {
        j: float(s) for b in batches for j, s in zip(b["soma_joinid"].tolist(), b["library_size"].tolist())
    }
    train_ids = np.flatnonzero(is_train)
    np.testing.assert_allclose([got[j] for j in sorted(got)], expected[train_ids])
    assert {tuple(r) for b in batches for r in b["labels"][:, :1].tolist()} == {(1,), (2,)}


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _loader_view(uri: str, endpoint: str) -> dict:
    """What training would read: every cell (no filter) as joinid -> (gene ids, counts), and the genes."""
    cfg = SomaDataConfig(
        atlas_uri=uri,
        s3_endpoint_url=endpoint,
        micro_batch_size=8,
        shuffle=False,
        value_filter=None,
        val_value_filter=None,
        label_columns=["dataset_id"],
    )
    loader = build_loader(cfg, rank=0, world_size=1)
    cells = {}
    for b in loader:
        for i in np.flatnonzero(~b["is_padding"].numpy()):
            m = b["mask"][i].numpy()
            cells[int(b["soma_joinid"][i])] = (
                b["gene_ids"][i].numpy()[m].tolist(),
                b["counts"][i].numpy()[m].tolist(),
            )
    return {"cells": cells, "genes": list(loader.gene_vocab.feature_ids)}


def _latest_sizes(uri: str, endpoint: str) -> tuple[int, int]:
    """(obs rows, var rows) at the latest TileDB state, uncommitted writes included."""
    import tiledbsoma

    from scldm_scale.data.context import make_soma_context

    with tiledbsoma.Experiment.open(uri, context=make_soma_context(uri, endpoint)) as exp:
        return int(exp.obs.count), int(exp.ms["RNA"].var.count)


def test_s3_ingest_killed_mid_write_leaves_committed_cells(s3_endpoint, tmp_path):
    """A real SIGKILL after obs, X and the grown var of a second ingest were written: the loader reads the
    first ingest's cells only; the next ingest discards the leftovers."""
    from data_pipelines.ingest import ingest_anndata

    uri = f"s3://{BUCKET}/killed"
    ingest_anndata(uri, [_adata(40, 0)], dataset_ids=["d0"], s3_endpoint_url=s3_endpoint)
    before = _loader_view(uri, s3_endpoint)
    assert sorted(before["cells"]) == list(range(40)) and len(before["genes"]) == 20

    victim = str(tmp_path / "victim.h5ad")
    _adata(30, 7, n_genes=30).write_h5ad(victim)  # 10 new genes: var grows
    flag = tmp_path / "wrote_var"
    code = (
        "import sys, time, pathlib, data_pipelines.ingest, data_pipelines._append as w\n"
        "real = w.write_var\n"
        "def slow(*a, **k):\n"
        "    real(*a, **k); pathlib.Path(sys.argv[1]).touch(); time.sleep(120)\n"
        "w.write_var = slow\n"
        "data_pipelines.ingest.main(['--atlas', sys.argv[2], sys.argv[3], '--chunk-rows', '8',\n"
        "                            '--s3-endpoint-url', sys.argv[4]])\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(flag), uri, victim, s3_endpoint], cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            assert proc.poll() is None and time.monotonic() < deadline, (
                "the ingest did not reach its var write"
            )
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert _latest_sizes(uri, s3_endpoint) == (70, 30)  # the killed ingest's rows are stored, uncommitted

    assert _loader_view(uri, s3_endpoint) == before  # same cells, same X values, same genes

    ingest_anndata(uri, [_adata(8, 3)], dataset_ids=["d1"], s3_endpoint_url=s3_endpoint)
    after = _loader_view(uri, s3_endpoint)
    assert sorted(after["cells"]) == list(range(48)) and after["genes"] == before["genes"]
    assert {j: after["cells"][j] for j in range(40)} == before["cells"]
    assert _latest_sizes(uri, s3_endpoint) == (48, 20)  # leftovers deleted, not only hidden


def test_s3_failed_ingest_leaves_committed_cells(s3_endpoint, monkeypatch):
    """An exception in the middle of X (in-process): nothing of the failed ingest reaches the loader."""
    import data_pipelines._append as append_mod
    from data_pipelines.ingest import ingest_anndata

    uri = f"s3://{BUCKET}/failed"
    ingest_anndata(uri, [_adata(24, 0)], dataset_ids=["d0"], s3_endpoint_url=s3_endpoint)
    before = _loader_view(uri, s3_endpoint)
    calls = []
    real = append_mod.write_x

    def failing_write_x(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(append_mod, "write_x", failing_write_x)
    with pytest.raises(RuntimeError, match="simulated failure"):
        ingest_anndata(
            uri, [_adata(40, 5, n_genes=25)], dataset_ids=["d1"], chunk_rows=8, s3_endpoint_url=s3_endpoint
        )
    assert _latest_sizes(uri, s3_endpoint)[0] > 24
    assert _loader_view(uri, s3_endpoint) == before


def test_tls_verification_on_for_https_unless_turned_off():
    from data_pipelines._atlas import soma_context
    from data_pipelines.ingest import build_parser
    from scldm_scale.config import ConfigError, load_config
    from scldm_scale.config.experiment import VAEExperimentConfig
    from scldm_scale.data.context import make_soma_context

    uri, https = "s3://bucket/atlas", "https://s3.internal.example:9000"
    cfg = make_soma_context(uri, https).tiledb_config
    assert cfg["vfs.s3.verify_ssl"] == "true" and cfg["vfs.s3.scheme"] == "https"
    assert cfg["vfs.s3.endpoint_override"] == "s3.internal.example:9000"
    assert make_soma_context(uri, https, verify_tls=False).tiledb_config["vfs.s3.verify_ssl"] == "false"
    assert make_soma_context(uri).tiledb_config["vfs.s3.verify_ssl"] == "true"  # AWS itself
    assert make_soma_context(uri, "http://127.0.0.1:9000").tiledb_config["vfs.s3.scheme"] == "http"
    # ingestion threads the flag to the same context
    assert soma_context(uri, https).tiledb_config["vfs.s3.verify_ssl"] == "true"
    assert soma_context(uri, https, False).tiledb_config["vfs.s3.verify_ssl"] == "false"
    assert build_parser().parse_args(["--atlas", uri, "a.h5ad", "--s3-no-verify-tls"]).s3_verify_tls is False
    assert build_parser().parse_args(["--atlas", uri, "a.h5ad"]).s3_verify_tls is True
    # the config field: on by default, a bool, validated with its key
    assert SomaDataConfig().s3_verify_tls is True
    assert load_config(VAEExperimentConfig, [], ["data.s3_verify_tls=false"]).data.s3_verify_tls is False
    with pytest.raises(ConfigError, match="data.s3_verify_tls"):
        load_config(VAEExperimentConfig, [], ["data.s3_verify_tls=maybe"])
    with pytest.raises(ValueError, match="data.s3_verify_tls must be true or false"):
        SomaDataConfig(s3_verify_tls="no")
