"""benchmarks/gpu_bench.py: the skip without CUDA, and every measuring path on CPU (debug preset, 2 steps, the
2-rank checkpoint / resume check over gloo), so the GPU benchmark does not rot between GPU runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
BENCH = str(REPO / "benchmarks" / "gpu_bench.py")


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, BENCH, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the skip path is for machines without CUDA")
def test_skips_without_cuda(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    proc = _run(["--json", str(out)], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = {"skipped": True, "reason": "CUDA is not available"}
    assert json.loads(proc.stdout) == expected
    assert json.loads(out.read_text()) == expected


@pytest.mark.slow
@pytest.mark.distributed
def test_measures_on_cpu(tmp_path: Path, demo_atlas: str) -> None:
    out = tmp_path / "gpu.json"
    args = ["--json", str(out), "--device", "cpu", "--presets", "debug", "--steps", "2", "--warmup", "1",
            "--sample-cells", "4", "--dist", "skip"]
    proc = _run(args, timeout=300)  # the child launches inherit the session's demo atlas (conftest)
    assert proc.returncode == 0, (out.read_text() if out.exists() else proc.stdout[-3000:]) + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"]["name"] == "cpu" and result["device"]["peak_bf16_tflops"] is None
    debug = result["presets"]["debug"]
    for stage in ("stage1", "stage2"):
        res = debug[stage]
        assert "error" not in res, res
        assert res["cells_per_s"] > 0 and res["gflop_per_step"] > 0 and res["tflops"] > 0
        assert res["mfu"] is None and res["peak_mem_gb"] is None  # no peak and no CUDA memory on CPU
        assert res["params"] > 0
    assert debug["stage1"]["batch"] == 16 and debug["stage2"]["batch"] == 32  # the debug presets' micro-batches
    sampling = debug["sampling"]
    assert "error" not in sampling, sampling
    assert sampling["cells"] == 4 and sampling["cells_per_s"] > 0 and sampling["num_steps"] == 10
    # The 2-rank launch-checkpoint-resume drill is skipped here: on CPU it repeats what
    # tests/integration/test_faults.py does to the same launcher (and costs ~30 s).
    assert result["dist_resume"]["status"] == "skipped"


def _bench_module():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu_bench
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return gpu_bench


def test_presets_load_and_batches_follow_the_contract() -> None:
    """Every preset's YAML files load (the GPU run must not die on a renamed config), and the synthetic
    batches have the loader's keys, dtypes and shapes."""
    from scldm_scale.config import LDMExperimentConfig, VAEExperimentConfig, load_config

    bench = _bench_module()
    gen = torch.Generator().manual_seed(0)
    for vae_yaml, ldm_yaml, genes, tokens in bench.PRESETS.values():
        vae = load_config(VAEExperimentConfig, [REPO / vae_yaml], ["train.precision=bf16"])
        load_config(LDMExperimentConfig, [REPO / ldm_yaml], ["train.precision=bf16"])
        batch = bench.token_batch(3, genes, tokens, gen)
        assert batch["gene_ids"].shape == (3, tokens) and batch["gene_ids"].dtype == torch.long
        assert batch["mask"].dtype == torch.bool and bool((batch["gene_ids"] > 0).eq(batch["mask"]).all())
        assert int(batch["gene_ids"].max()) <= genes and batch["mask"][0].all()  # cell 0 is the longest
        assert torch.allclose(batch["library_size"], batch["counts"].sum(1))
        assert batch["labels"].shape == (3, len(bench.LABEL_CARDINALITIES)) and int(batch["labels"].min()) >= 1
        shape = (vae.model.num_latent_tokens, vae.model.latent_dim)
        assert bench.latent_batch(3, shape, gen)["latents"].shape == (3, *shape)


def test_peak_table() -> None:
    peak_tflops = _bench_module().peak_tflops
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("NVIDIA L40S") == 362.0
    assert peak_tflops("NVIDIA L4") == 121.0
    assert peak_tflops("Tesla V100-SXM2-16GB") is None
