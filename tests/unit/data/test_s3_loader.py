"""Object-store round trip: a local S3-compatible server (moto, 127.0.0.1), an atlas written there through the
ingestion path, streamed back through the loader; the server is stopped by its process id."""

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


def _adata(n_cells: int, seed: int) -> anndata.AnnData:
    rng = np.random.default_rng(seed)
    X = sp.random(n_cells, 20, density=0.3, format="csr", random_state=seed, dtype=np.float32)
    X.data = np.ceil(X.data * 10).astype(np.float32)
    obs = pd.DataFrame(
        {
            "cell_type": rng.choice(["B", "T"], n_cells),
            "split": np.where(np.arange(n_cells) % 4 == 0, "val", "train"),
        },
        index=[f"s{seed}_c{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"ENSG{i:05d}" for i in range(20)])
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
