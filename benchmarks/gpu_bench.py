"""GPU readiness benchmark: training and sampling throughput, FLOP/s, MFU, memory, and a 2-rank resume check.

    python benchmarks/gpu_bench.py --json benchmarks/out/gpu_bench.json              # base + census_70m, bf16
    python benchmarks/gpu_bench.py --json OUT --device cpu --presets debug --steps 2   # CPU smoke run (tests)

Per preset (configs/vae/<preset>.yaml with configs/ldm/base.yaml; debug uses configs/ldm/debug.yaml), one
process, one-rank process group (`init_distributed`), the configured engine (`build_engine`), and the training
loop's own step (`Trainer.train_step`: H2D copy, forward, backward, clip, finite check, optimizer step, EMA):
  stage1 / stage2   cells/s over --steps timed steps after --warmup steps (torch.cuda.synchronize around them);
                    TFLOP/s = FLOPs of one step (torch.utils.flop_counter.FlopCounterMode) / mean step time;
                    MFU = TFLOP/s / the GPU's dense bf16 peak (table below, or --peak-tflops; null if unknown);
                    peak memory = torch.cuda.max_memory_allocated during the stage.
  sampling          cells/s of `eval.generate` (the preset's ODE sampler and steps, CFG on every label column,
                    decoding all genes, NB count draws), fp32 weights as generate.py loads them.
Data are synthetic in-memory batches of the loader's contract (DEVELOPERS.md), built on the CPU as the loader
delivers them: stage 1 token batches (B cells, longest cell T expressed genes, lengths uniform in [T/4, T],
counts 1 + Poisson(1.5), 2 label columns), stage 2 latent-cache batches (latents N(0, 1)). Models are freshly
initialised: throughput does not depend on the weights.
dist_resume: with >= 2 GPUs, `torchrun --standalone --nproc_per_node 2 launchers/train_vae.py` (debug preset,
NCCL, bf16) for 4 steps checkpointing every 2, then resumed to 8: both exit 0 and the second starts at step 4.
Without CUDA the benchmark prints {"skipped": true, ...} and exits 0 unless --device cpu is given.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRESETS = {  # name: (stage-1 yaml, stage-2 yaml, genes G, longest cell T in tokens)
    "debug": ("configs/vae/debug.yaml", "configs/ldm/debug.yaml", 550, 64),
    "base": ("configs/vae/base.yaml", "configs/ldm/base.yaml", 2_000, 1_024),
    "census_70m": ("configs/vae/census_70m.yaml", "configs/ldm/base.yaml", 36_130, 4_096),
}
LABEL_CARDINALITIES = [8, 32]  # synthetic label columns (as dataset_id, cell_type)
PEAK_BF16_TFLOPS = [  # dense bf16 tensor-core peak from the datasheets; first substring of the name that matches
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.0), ("H200", 989.0), ("H100", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10", 125.0),
]
DIST_DATA = [  # the demo atlas's two small datasets: a few seconds per launcher run
    "data.value_filter=split == 'train' and dataset_id != 'brain10k'",
    "data.min_gene_cells=300",
    "data.seed=0",
]


def peak_tflops(name: str) -> float | None:
    return next((tf for key, tf in PEAK_BF16_TFLOPS if key in name), None)


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def _labels(n: int, gen):
    import torch

    return torch.stack([torch.randint(1, k + 1, (n,), generator=gen) for k in LABEL_CARDINALITIES], dim=1)


def token_batch(B: int, G: int, T: int, gen) -> dict:
    """A stage-1 batch as the loader yields it (CPU tensors; no token cap, so no target_* keys)."""
    import torch

    lengths = torch.randint(max(1, T // 4), T + 1, (B,), generator=gen)
    lengths[0] = T
    gene_ids, counts = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T)
    for i, n in enumerate(lengths.tolist()):
        gene_ids[i, :n] = torch.randperm(G, generator=gen)[:n].sort().values + 1
        counts[i, :n] = 1 + torch.poisson(torch.full((n,), 1.5), generator=gen)
    return {"gene_ids": gene_ids, "counts": counts, "mask": gene_ids > 0, "library_size": counts.sum(1),
            "labels": _labels(B, gen), "soma_joinid": torch.arange(B), "truncated": torch.zeros(B, dtype=torch.bool),
            "is_padding": torch.zeros(B, dtype=torch.bool)}


def latent_batch(B: int, latent_shape, gen) -> dict:
    """A stage-2 batch as the latent cache yields it."""
    import torch

    return {"latents": torch.randn(B, *latent_shape, generator=gen), "labels": _labels(B, gen),
            "soma_joinid": torch.arange(B), "library_size": torch.full((B,), 2000.0)}


def _cpu_sdpa_flops() -> dict:
    """FlopCounterMode has no formula for the CPU flash-attention kernels: count them as on CUDA."""
    import torch
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    if not hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        return {}
    return {
        aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, **kw: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda g, q, k, v, *a, **kw: sdpa_backward_flop_count(g, q, k, v),
    }


def measure_training(trainer, batches: list, args, device, peak: float | None) -> dict:
    """Warm-up, timed steps and one FLOP-counted step of `trainer.train_step` (one micro-batch per step)."""
    from torch.utils.flop_counter import FlopCounterMode

    for i in range(args.warmup):
        trainer.train_step([batches[i % len(batches)]])
    _sync(device)
    start = time.perf_counter()
    for i in range(args.steps):
        trainer.train_step([batches[i % len(batches)]])
    _sync(device)
    step_s = (time.perf_counter() - start) / args.steps
    peak_gb = _peak_gb(device)
    with FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_flops()) as counter:
        trainer.train_step([batches[0]])
    flops, cells = counter.get_total_flops(), int(batches[0]["labels"].shape[0])
    tflops = flops / step_s / 1e12
    return {"cells_per_s": _sig(cells / step_s), "step_ms": _sig(1e3 * step_s), "batch": cells,
            "gflop_per_step": _sig(flops / 1e9), "tflops": _sig(tflops),
            "mfu": _sig(tflops / peak) if peak else None, "peak_mem_gb": peak_gb}


def _trainer(cfg, model, step_fn, device, run_dir: str, ema: bool = False):
    from scldm_scale.models import num_parameters
    from scldm_scale.tracking import NullLogger
    from scldm_scale.train.ema import EMA
    from scldm_scale.train.loop import Trainer
    from scldm_scale.train.optim import build_engine

    n_params = num_parameters(model)
    engine = build_engine(cfg.engine, model, optim_cfg=cfg.optim, max_steps=10**6, precision=cfg.train.precision,
                          device=device, grad_accum_steps=1)
    flow = getattr(cfg, "flow", None)
    shadow = EMA(engine, decay=flow.ema_decay, warmup_steps=flow.ema_update_after_step,
                 update_every=flow.ema_update_every, ramp=flow.ema_decay_ramp) if ema else None
    trainer = Trainer(engine=engine, step_fn=step_fn, loader=None, logger=NullLogger(), cfg_train=cfg.train,
                      cfg_ckpt=cfg.checkpoint, run_dir=run_dir, manifest={}, ema=shadow)
    return trainer, n_params


def _stage1(cfg, G: int, T: int, args, device, peak, gen, run_dir: str) -> dict:
    from scldm_scale.models import build_vae
    from scldm_scale.train.vae_step import vae_step

    batches = [token_batch(cfg.data.micro_batch_size, G, T, gen) for _ in range(2)]
    trainer, n = _trainer(cfg, build_vae(cfg.model, G), vae_step, device, run_dir)
    mean_tokens = round(float(batches[0]["mask"].sum(1).float().mean()), 1)
    return {"params": n, "mean_tokens": mean_tokens, **measure_training(trainer, batches, args, device, peak)}


def _stage2(cfg, latent_shape, args, device, peak, gen, run_dir: str) -> dict:
    """From cached latents, with the EMA, as run_ldm trains."""
    from scldm_scale.models import build_dit
    from scldm_scale.train.ldm_step import ldm_step

    batches = [latent_batch(cfg.data.micro_batch_size, latent_shape, gen) for _ in range(2)]
    dit = build_dit(cfg.model, latent_shape, LABEL_CARDINALITIES)
    step_fn = functools.partial(ldm_step, vae=None, latent_stats=None)
    trainer, n = _trainer(cfg, dit, step_fn, device, run_dir, ema=True)
    return {"params": n, **measure_training(trainer, batches, args, device, peak)}


def _sampling(vae_cfg, ldm_cfg, G: int, latent_shape, args, device, gen) -> dict:
    """ODE through the DiT, decoding every gene, NB draws (fp32, as generate.py)."""
    import torch

    from scldm_scale.data import LibrarySizeStats
    from scldm_scale.eval import generate
    from scldm_scale.models import build_dit, build_vae

    vae = build_vae(vae_cfg.model, G).to(device).eval()
    dit = build_dit(ldm_cfg.model, latent_shape, LABEL_CARDINALITIES).to(device).eval()
    labels = _labels(args.sample_cells, gen)
    stats = LibrarySizeStats.fit(1000 + 4000 * torch.rand(4096, generator=gen), _labels(4096, gen))
    flow = ldm_cfg.flow
    kw = dict(library_size_stats=stats, sampler=flow.sampler, num_steps=flow.num_steps, atol=flow.atol,
              rtol=flow.rtol, guidance_weights=flow.guidance_weights or None, strategy=ldm_cfg.model.guidance)
    generate(dit, vae, labels[:2], seed=1, **kw)  # warm-up
    _sync(device)
    start = time.perf_counter()
    counts = generate(dit, vae, labels, seed=0, **kw)["counts"]
    _sync(device)
    seconds = time.perf_counter() - start
    assert counts.shape == (args.sample_cells, G), counts.shape
    return {"cells_per_s": _sig(args.sample_cells / seconds), "cells": args.sample_cells,
            "seconds": _sig(seconds), "sampler": flow.sampler, "num_steps": flow.num_steps,
            "guidance": ldm_cfg.model.guidance, "precision": "fp32", "peak_mem_gb": _peak_gb(device)}


def _guarded(fn, device, *args) -> dict:
    """Run one stage from a clean memory state; an error (an OOM) is recorded, the other stages still run."""
    _free(device)
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001
        return {"error": f"{type(exc).__name__}: {exc}"}


def bench_preset(name: str, args, device, peak: float | None) -> dict:
    import torch

    from scldm_scale.config import LDMExperimentConfig, VAEExperimentConfig, load_config

    vae_yaml, ldm_yaml, G, T = PRESETS[name]
    G = args.genes or G
    T = min(args.tokens or T, G)
    over = [f"train.precision={args.precision}", *([f"data.micro_batch_size={args.batch_size}"] * bool(args.batch_size))]
    vae_cfg = load_config(VAEExperimentConfig, [REPO / vae_yaml], over)
    ldm_cfg = load_config(LDMExperimentConfig, [REPO / ldm_yaml], over)
    latent_shape = (vae_cfg.model.num_latent_tokens, vae_cfg.model.latent_dim)
    gen = torch.Generator().manual_seed(0)
    out: dict = {"configs": [vae_yaml, ldm_yaml], "num_genes": G, "longest_cell_tokens": T,
                 "latent_shape": list(latent_shape)}
    with tempfile.TemporaryDirectory() as tmp:
        out["stage1"] = _guarded(_stage1, device, vae_cfg, G, T, args, device, peak, gen, tmp)
        out["stage2"] = _guarded(_stage2, device, ldm_cfg, latent_shape, args, device, peak, gen, tmp)
    out["sampling"] = _guarded(_sampling, device, vae_cfg, ldm_cfg, G, latent_shape, args, device, gen)
    return out


def _launch(overrides: list[str], env: dict, nproc: int) -> tuple[int, float, str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(REPO / "launchers" / "train_vae.py"), "--config", str(REPO / "configs/vae/debug.yaml"), *overrides]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as exc:
        return 124, time.perf_counter() - start, str(exc.stderr or "")[-4000:]
    return proc.returncode, time.perf_counter() - start, proc.stdout + proc.stderr


def dist_resume_check(args, device) -> dict:
    """2 ranks (NCCL on 2 GPUs; gloo with --dist run on CPU): train, checkpoint, resume, check the step."""
    import torch

    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if args.dist == "skip" or (args.dist == "auto" and gpus < 2):
        why = f"needs 2 GPUs, found {gpus}" if args.dist == "auto" else "--dist skip"
        return {"status": "skipped", "reason": why}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    if device.type != "cuda":
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as run_dir:
        common = [*DIST_DATA, f"train.run_dir={run_dir}", "checkpoint.interval_steps=2", "tracking.backend=none",
                  f"train.device={device.type}", f"train.precision={args.precision}", "train.enable_progress_bar=false"]
        rc1, s1, log1 = _launch([*common, "train.max_steps=4"], env, 2)
        first = sorted(p.name for p in (Path(run_dir) / "checkpoints").glob("step-*"))
        rc2, s2, log2 = _launch([*common, "train.max_steps=8", "checkpoint.resume=auto"], env, 2)
        found = re.findall(r"resumed from \S+ \(step (\d+)\)", log2)
        last = sorted(p.name for p in (Path(run_dir) / "checkpoints").glob("step-*"))
    resumed = int(found[-1]) if found else None
    ok = rc1 == 0 and rc2 == 0 and resumed == 4 and "step-00000008" in last
    result = {"status": "pass" if ok else "fail", "backend": "nccl" if device.type == "cuda" else "gloo",
              "nproc": 2, "first": {"exit_code": rc1, "seconds": round(s1, 1), "checkpoints": first},
              "resume": {"exit_code": rc2, "seconds": round(s2, 1), "resumed_from_step": resumed,
                         "checkpoints": last}}
    if not ok:
        result["log_tail"] = (log1 if rc1 else log2)[-3000:]
    return result


def run(args) -> dict:
    import torch

    from scldm_scale.distributed import destroy_distributed, init_distributed
    from scldm_scale.utils import seed_everything

    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed wants it even for one process (as run.py sets it)
    info = init_distributed(args.device)
    device = info.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or (peak_tflops(name) if device.type == "cuda" else None)
    seed_everything(0)
    result: dict = {
        "benchmark": "gpu_bench",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": {"name": name, "count": torch.cuda.device_count() if device.type == "cuda" else 0,
                   "peak_bf16_tflops": peak, "torch": torch.__version__, "cuda": torch.version.cuda},
        "settings": {"presets": args.presets, "steps": args.steps, "warmup": args.warmup, "precision": args.precision,
                     "batch_size": args.batch_size, "sample_cells": args.sample_cells,
                     "data": "synthetic in-memory batches (loader contract; see the docstring)"},
        "presets": {},
    }
    try:
        for preset in args.presets:
            print(f"gpu_bench: {preset} ...", file=sys.stderr, flush=True)
            result["presets"][preset] = res = bench_preset(preset, args, device, peak)
            print(f"gpu_bench: {preset}: " + ", ".join(f"{k} {v.get('cells_per_s', v.get('error'))}" for k, v in
                  res.items() if isinstance(v, dict)), file=sys.stderr, flush=True)
    finally:
        destroy_distributed()
    _free(device)
    result["dist_resume"] = dist_resume_check(args, device)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the JSON here")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: smoke run of the code")
    parser.add_argument("--presets", nargs="+", choices=sorted(PRESETS), default=["base", "census_70m"])
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per stage")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--batch-size", type=int, default=None, help="cells per step (default: the preset's)")
    parser.add_argument("--genes", type=int, default=None, help="gene vocabulary G (default: per preset)")
    parser.add_argument("--tokens", type=int, default=None, help="longest cell in a batch, in expressed genes")
    parser.add_argument("--sample-cells", type=int, default=256, help="cells generated in the sampling run")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak, overrides the table")
    parser.add_argument("--dist", choices=["auto", "run", "skip"], default="auto",
                        help="2-rank resume check: auto = with >= 2 GPUs; run = also over gloo on CPU")
    args = parser.parse_args(argv)
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        result: dict = {"skipped": True, "reason": "CUDA is not available"}
    else:
        result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    failed = [f"{p}.{s}" for p, r in result.get("presets", {}).items() for s, v in r.items()
              if isinstance(v, dict) and "error" in v]
    return 1 if failed or result.get("dist_resume", {}).get("status") == "fail" else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
