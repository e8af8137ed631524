"""Model throughput on CPU at the `base` shapes (configs/vae/base.yaml, configs/ldm/base.yaml).

Measures, with 2 intra-op threads:
  stage1_train_cells_per_s  VAE training step (AdamW), 2,000 genes, batch 128, encoder input = expressed genes
                            of real cells (wu2020_tcells restricted to its 2,000 most often detected genes)
  stage2_train_cells_per_s  DiT flow-matching step on 16 x 16 latents, batch 128, one label column
  sample_cells_per_s        Heun, 50 steps (100 DiT evaluations, CFG weight 2 on one label column, so 2 rows
                            per cell per evaluation), then decoding all 2,000 genes and NB count draws;
                            batch --sample-cells (default 32: the cost per cell is flat in the batch size
                            and 128 cells take many minutes on a shared 2-core machine)
  peak_rss_mb               peak resident memory of this process
  decode_peak_mb_per_cell_60k_*   peak RSS growth per cell while decoding all 60,000 genes of a base-width
                            model without grad, chunked (4,096 genes) and unchunked, each in a fresh process

Usage: python benchmarks/model_bench.py --json OUT [--steps N] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from scldm_scale.config import LDMExperimentConfig, VAEExperimentConfig, load_config
from scldm_scale.data import LibrarySizeStats
from scldm_scale.eval import generate
from scldm_scale.flow import flow_matching_loss
from scldm_scale.models import build_dit, build_vae, num_parameters

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data_pipelines" / "demo_data" / "wu2020_tcells.h5ad"
NUM_GENES, BATCH = 2000, 128


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def real_batch() -> dict[str, torch.Tensor]:
    """128 real T cells over their 2,000 most often detected genes, tokenised per the batch contract."""
    import anndata

    X = anndata.read_h5ad(DATA).X.tocsc()
    top = np.sort(np.argsort(-np.diff(X.indptr), kind="stable")[:NUM_GENES])
    X = X[:, top].tocsr()
    rows = [X[i % X.shape[0]] for i in range(BATCH)]
    T = max(r.nnz for r in rows)
    gene_ids, counts = torch.zeros(BATCH, T, dtype=torch.long), torch.zeros(BATCH, T)
    for i, r in enumerate(rows):
        gene_ids[i, : r.nnz] = torch.from_numpy(r.indices + 1)
        counts[i, : r.nnz] = torch.from_numpy(r.data.astype(np.float32))
    labels = torch.randint(1, 5, (BATCH, 1), generator=torch.Generator().manual_seed(0))
    return {"gene_ids": gene_ids, "counts": counts, "mask": gene_ids > 0, "library_size": counts.sum(1),
            "labels": labels}


def _time_steps(step, steps: int) -> float:
    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def bench_stage1(batch, steps: int) -> tuple[float, object]:
    cfg = load_config(VAEExperimentConfig, [ROOT / "configs" / "vae" / "base.yaml"]).model
    vae = build_vae(cfg, NUM_GENES)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, betas=(0.9, 0.95))

    def step():
        out = vae.loss(batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    return BATCH / _time_steps(step, steps), vae


def bench_stage2(vae, batch, steps: int) -> tuple[float, object]:
    cfg = load_config(LDMExperimentConfig, [ROOT / "configs" / "ldm" / "base.yaml"]).model
    dit = build_dit(cfg, vae.latent_shape, [4])
    with torch.no_grad():
        x1 = vae.encode(batch["gene_ids"], batch["counts"], batch["mask"]).mean
    opt = torch.optim.AdamW(dit.parameters(), lr=5e-4)

    def step():
        out = flow_matching_loss(dit, x1, labels=batch["labels"])
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()

    return BATCH / _time_steps(step, steps), dit


def bench_sampling(dit, vae, batch, cells: int) -> float:
    stats = LibrarySizeStats.fit(batch["library_size"], batch["labels"])
    labels = batch["labels"][:cells]
    start = time.perf_counter()
    out = generate(dit, vae, labels, library_size_stats=stats, sampler="heun", num_steps=50,
                   guidance_weights=[2.0], seed=0)
    assert out["counts"].shape == (cells, NUM_GENES)
    return cells / (time.perf_counter() - start)


def decode_child(chunk: int, cells: int) -> None:
    """Run in a fresh process: peak RSS growth per cell of decoding 60,000 genes (RSS polled every 1 ms)."""
    import threading

    import psutil

    cfg = load_config(VAEExperimentConfig, [ROOT / "configs" / "vae" / "base.yaml"]).model
    vae = build_vae(cfg, 60_000).eval()
    z = torch.randn(cells, *vae.latent_shape)
    lib = torch.full((cells,), 5000.0)
    proc, peak, done = psutil.Process(), [0], threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)

    before = proc.memory_info().rss
    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    with torch.no_grad():
        out = vae.decode(z, lib, gene_chunk_size=chunk or None)
    done.set()
    thread.join()
    assert out["mu"].shape == (cells, 60_000)
    print(json.dumps({"mb_per_cell": (max(peak[0], proc.memory_info().rss) - before) / 2**20 / cells}))


def bench_decode(chunk: int, cells: int = 8) -> float:
    cmd = [sys.executable, __file__, "--decode-child", str(chunk), "--cells", str(cells)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return round(json.loads(out)["mb_per_cell"], 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write results here")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per stage")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sample-cells", type=int, default=32, help="cells generated in the sampling run")
    parser.add_argument("--decode-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cells", type=int, default=32, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.decode_child is not None:
        decode_child(args.decode_child, args.cells)
        return
    batch = real_batch()
    stage1, vae = bench_stage1(batch, args.steps)
    print(f"stage 1: {stage1:.2f} cells/s", file=sys.stderr, flush=True)
    stage2, dit = bench_stage2(vae, batch, args.steps)
    print(f"stage 2: {stage2:.2f} cells/s", file=sys.stderr, flush=True)
    sample = bench_sampling(dit, vae, batch, args.sample_cells)
    print(f"sampling: {sample:.3f} cells/s", file=sys.stderr, flush=True)
    results = {
        "stage1_train_cells_per_s": round(stage1, 2),
        "stage2_train_cells_per_s": round(stage2, 2),
        "sample_cells_per_s": round(sample, 2),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "decode_peak_mb_per_cell_60k_chunked": bench_decode(4096),
        "decode_peak_mb_per_cell_60k_unchunked": bench_decode(0),
        "setup": {"device": "cpu", "threads": args.threads, "batch": BATCH, "num_genes": NUM_GENES,
                  "mean_expressed_genes": round(float(batch["mask"].sum(1).float().mean()), 1),
                  "vae_params": num_parameters(vae), "dit_params": num_parameters(dit),
                  "torch": torch.__version__, "timed_steps": args.steps,
                  "sample_cells": args.sample_cells, "load_average_1min": round(os.getloadavg()[0], 2),
                  "decode_cells": 8, "decode_chunk_genes": 4096},
    }
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
