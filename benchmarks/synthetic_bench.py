"""Wall time and peak RSS of data_pipelines writers, each measured in a child process sampled by psutil.

    python benchmarks/synthetic_bench.py synthetic --atlas /tmp/syn --cells 1000000 --genes 2000 --datasets 8
    python benchmarks/synthetic_bench.py ingest --atlas /tmp/ing --cells 200000 --genes 2000 --chunk-rows 10000

`synthetic` runs `python -m data_pipelines.synthetic_atlas`; `ingest` first writes an .h5ad with that many
synthetic cells (in another process, not measured), then runs `python -m data_pipelines.ingest` on it and
compares its peak RSS with the size of X in memory. The output atlas (and .h5ad) are deleted unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import psutil


def measure(cmd: list[str], interval_seconds: float = 0.2) -> dict:
    """Run `cmd`, sampling the RSS of it and its children; return wall seconds, peak RSS and the exit code."""
    t0 = time.perf_counter()
    proc = psutil.Popen(cmd)
    peak = 0
    while proc.poll() is None:
        try:
            rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(interval_seconds)
    return {
        "cmd": " ".join(cmd),
        "rc": proc.returncode,
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "peak_rss_gib": round(peak / 2**30, 3),
    }


def _write_h5ad(path: str, cells: int, genes: int) -> int:
    code = (
        "import sys, anndata, pandas as pd, scipy.sparse as sp, tiledbsoma\n"
        "from data_pipelines.synthetic_atlas import write_synthetic_atlas\n"
        "n, g, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]\n"
        "write_synthetic_atlas(out + '.soma', n_cells=n, n_genes=g, n_datasets=1)\n"
        "with tiledbsoma.Experiment.open(out + '.soma') as e:\n"
        "    t = e.ms['RNA'].X['raw'].read().tables().concat()\n"
        "x = sp.csr_matrix((t['soma_data'].to_numpy(), (t['soma_dim_0'].to_numpy(), t['soma_dim_1'].to_numpy())), shape=(n, g))\n"
        "obs = pd.DataFrame({'cell_type': pd.Categorical(['c'] * n)}, index=[f'cell{i}' for i in range(n)])\n"
        "anndata.AnnData(x, obs=obs, var=pd.DataFrame(index=[f'g{j}' for j in range(g)])).write_h5ad(out)\n"
        "print(x.data.nbytes + x.indices.nbytes + x.indptr.nbytes)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(cells), str(genes), path], check=True, capture_output=True, text=True
    )
    shutil.rmtree(path + ".soma", ignore_errors=True)
    return int(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["synthetic", "ingest"])
    p.add_argument("--atlas", required=True)
    p.add_argument("--cells", type=int, default=1_000_000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--datasets", type=int, default=8)
    p.add_argument("--chunk-rows", type=int, default=10_000)
    p.add_argument("--keep", action="store_true")
    args = p.parse_args(argv)
    result: dict = {"mode": args.mode, "cells": args.cells, "genes": args.genes, "cpu_count": os.cpu_count()}
    if args.mode == "synthetic":
        cmd = [
            sys.executable,
            "-m",
            "data_pipelines.synthetic_atlas",
            "--atlas",
            args.atlas,
            "--cells",
            str(args.cells),
            "--genes",
            str(args.genes),
            "--datasets",
            str(args.datasets),
        ]
        result.update(measure(cmd))
    else:
        h5ad = args.atlas + ".input.h5ad"
        result["x_in_memory_gib"] = round(_write_h5ad(h5ad, args.cells, args.genes) / 2**30, 3)
        result["h5ad_file_gib"] = round(os.path.getsize(h5ad) / 2**30, 3)
        cmd = [
            sys.executable,
            "-m",
            "data_pipelines.ingest",
            "--atlas",
            args.atlas,
            h5ad,
            "--chunk-rows",
            str(args.chunk_rows),
        ]
        result.update(measure(cmd))
        if not args.keep:
            os.remove(h5ad)
    if not args.keep:
        shutil.rmtree(args.atlas, ignore_errors=True)
    print(json.dumps(result))
    return 0 if result["rc"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
