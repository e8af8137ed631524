"""`run_generate(cfg)` and `run_evaluate(cfg)`: what `launchers/generate.py` and `launchers/evaluate.py` run.

Generation is distributed: the cells are cut into fixed batches of global indices, rank r computes batches
r, r + W, ..., and rank 0 gathers them into one dataset, identical for a seed at any world size. Evaluation
runs on rank 0 (the protocol is cheap next to training) and is an MLflow run of its own.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from scldm_scale.config import ConfigError
from scldm_scale.config.eval import EvaluateConfig, GenerateConfig, ModelSourceConfig
from scldm_scale.config.experiment import DEFAULT_STAGE2_RUN_DIR
from scldm_scale.config.tracking import TrackingConfig
from scldm_scale.data.obs import read_label_ids
from scldm_scale.distributed import (
    DistInfo,
    destroy_distributed,
    gather_object,
    init_distributed,
)
from scldm_scale.eval import plots
from scldm_scale.eval.evaluate import ExternalSource, evaluate
from scldm_scale.eval.generation import (
    Condition,
    check_partial_rows,
    decode_labels,
    expand_conditions,
    generate_cells,
    parse_conditions_all,
)
from scldm_scale.eval.loading import Stage2Model, checkpoint_of_run, load_stage2
from scldm_scale.eval.report import flat_metrics
from scldm_scale.tracking import build_logger, default_run_name
from scldm_scale.utils import setup_logging

logger = logging.getLogger(__name__)

EVALUATED_RUN_TAG = "scldm.evaluated_run"
"""Evaluation-run tag: the stage-2 MLflow run evaluated."""
EVALUATED_CHECKPOINT_TAG = "scldm.evaluated_checkpoint"
"""Evaluation-run tag: the stage-2 checkpoint evaluated."""


def resolve_model(source: ModelSourceConfig, tracking: TrackingConfig, dist: DistInfo) -> str:
    """The stage-2 run_dir / checkpoint to load: `model.checkpoint`, the MLflow run's checkpoint tag, or the
    demo's run_dir."""
    if source.mlflow_run_id is None:
        return source.checkpoint or DEFAULT_STAGE2_RUN_DIR
    return checkpoint_of_run(tracking, source.mlflow_run_id, dist, "model.mlflow_run_id")


def _load(source: ModelSourceConfig, tracking: TrackingConfig, dist: DistInfo, weights: str | None = None,
          stage1_ok: bool = False):
    location = resolve_model(source, tracking, dist)
    key = "model.mlflow_run_id" if source.mlflow_run_id else "model.checkpoint"
    try:
        return load_stage2(location, device=dist.device, weights=weights or source.weights, stage1_ok=stage1_ok)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None


# ---------------------------------------------------------------------------------------------- generate
def plan_labels(cfg: GenerateConfig, model: Stage2Model) -> tuple[np.ndarray, str]:
    """(N, K) label rows of every cell to generate, and how they were chosen."""
    K = len(model.label_columns)
    if cfg.conditions or cfg.conditions_csv:
        conds = parse_conditions_all(cfg.conditions, cfg.conditions_csv, model.label_vocabs)
        return expand_conditions(conds, K).numpy(), "conditions"
    if cfg.like_split is not None:
        rows = read_label_ids(model.cfg.data, model.label_vocabs, atlas_uri=model.atlas_uri,
                              value_filter=f"split == '{cfg.like_split}'")
        known = (rows > 0).all(1)
        if not known.all():
            logger.warning("like_split=%s: %d of %d cells have label values the model was not trained on; the "
                           "mix is taken from the other %d", cfg.like_split, (~known).sum(), len(rows), known.sum())
        rows = rows[known]
        if len(rows) == 0:
            raise ValueError(f"like_split={cfg.like_split!r}: no atlas cells of split {cfg.like_split!r} have "
                             "label values the model was trained on")
        return expand_conditions(label_mix(rows, cfg.num_cells), K).numpy(), f"like split {cfg.like_split}"
    return np.zeros((cfg.num_cells, K), dtype=np.int64), "unconditional"


def label_mix(rows: np.ndarray, n: int) -> list[Condition]:
    """`n` cells in the proportions of the label rows (largest-remainder rounding, deterministic)."""
    uniq, counts = np.unique(rows, axis=0, return_counts=True)
    exact = counts / counts.sum() * n
    alloc = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - alloc), kind="stable")[: n - alloc.sum()]:
        alloc[i] += 1
    return [Condition(tuple(int(v) for v in row), int(c)) for row, c in zip(uniq, alloc) if c > 0]


@contextmanager
def _model_job(source: ModelSourceConfig, tracking: TrackingConfig, stage1_ok: bool = False
               ) -> Iterator[tuple[DistInfo, Stage2Model]]:
    """Logging, the process group and the model on every rank; the group is torn down at the end."""
    setup_logging()
    os.environ.setdefault("LOCAL_RANK", "0")
    dist = init_distributed(source.device)
    try:
        yield dist, _load(source, tracking, dist, stage1_ok=stage1_ok)
    finally:
        destroy_distributed()


def _batches(n: int, size: int) -> list[range]:
    return [range(s, min(s + size, n)) for s in range(0, n, size)]


def run_generate(cfg: GenerateConfig) -> Path | None:
    """Generate cells and write one .h5ad (and optionally append them to a SOMA atlas); returns the path on
    rank 0."""
    with _model_job(cfg.model, cfg.tracking) as (dist, model):
        try:
            labels, how = plan_labels(cfg, model)
            kwargs = model.sampling_kwargs(cfg.sampling)
            check_partial_rows(labels, model.label_columns, set(model.library_size_stats.groups),
                               model.cfg.model.guidance == "joint", kwargs["strategy"])
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        mine = _batches(len(labels), cfg.model.batch_size)[dist.rank :: dist.world_size]
        parts = []
        for idx in tqdm(mine, desc=f"generating {len(labels)} cells", disable=dist.rank != 0):
            rows = torch.as_tensor(labels[idx.start : idx.stop]) if labels.shape[1] else None
            out = generate_cells(model.dit, model.vae, model.library_size_stats, rows, idx, seed=cfg.seed, **kwargs)
            parts.append((idx.start, _sparse(out["counts"]), out["z"].flatten(1).numpy(), out["library_size"].numpy()))
        gathered = gather_object(parts)
        if dist.rank != 0:
            return None
        settings = {"seed": cfg.seed, "labels": how, "world_size": dist.world_size,
                    **{k: v for k, v in kwargs.items() if k != "latent_stats"}}
        path = write_h5ad(cfg.out, model, labels, [p for ps in gathered for p in ps], settings)
        logger.info("wrote %d generated cells to %s", len(labels), path)
        if cfg.soma_uri:
            append_to_atlas(cfg, model, path)
        return path


def _sparse(counts: torch.Tensor):
    import scipy.sparse as sp

    return sp.csr_matrix(counts.numpy().astype(np.int32))


def write_h5ad(out: str, model: Stage2Model, labels: np.ndarray, parts: list, settings: dict[str, Any]) -> Path:
    """Assemble the parts in index order: raw integer counts in X, labels in obs, latents in obsm['X_latent'],
    gene ids in var, checkpoint and settings in uns['scldm']. Written to a temporary file, then renamed."""
    import anndata
    import pandas as pd
    import scipy.sparse as sp

    parts = sorted(parts, key=lambda p: p[0])
    X = sp.vstack([p[1] for p in parts]).tocsr()
    obs = pd.DataFrame({col: pd.Categorical(vals) for col, vals in decode_labels(labels, model.label_vocabs).items()})
    obs["library_size"] = np.concatenate([p[3] for p in parts]).astype(np.float32)
    obs.index = [f"generated-{i}" for i in range(len(obs))]
    var = pd.DataFrame({"feature_name": model.gene_vocab.feature_names or model.gene_vocab.feature_ids},
                       index=pd.Index(model.gene_vocab.feature_ids, name="feature_id"))
    adata = anndata.AnnData(X=X, obs=obs, var=var)
    adata.obsm["X_latent"] = np.concatenate([p[2] for p in parts]).astype(np.float32)
    adata.uns["scldm"] = {"model": json.dumps(model.describe()), "settings": json.dumps(settings, default=str),
                          "created": datetime.now().isoformat(timespec="seconds")}
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    adata.write_h5ad(tmp)
    tmp.replace(path)
    return path


def append_to_atlas(cfg: GenerateConfig, model: Stage2Model, path: Path) -> None:
    """Append the generated cells to `cfg.soma_uri` through the ingestion path, their dataset_id marking them
    as generated (the label column dataset_id, if any, is kept as `source_dataset_id`)."""
    import anndata

    from data_pipelines._atlas import GENERATED_SPLIT
    from data_pipelines.ingest import ingest_anndata  # lazy: ingestion is only needed here

    name = cfg.dataset_id or f"generated-{Path(str(model.checkpoint)).parent.parent.name}"
    adata = anndata.read_h5ad(path)
    if "dataset_id" in adata.obs:
        adata.obs["source_dataset_id"] = adata.obs.pop("dataset_id").astype(str)
    adata.obs["dataset_id"] = name
    adata.obs["split"] = GENERATED_SPLIT
    fill = {col: "unknown" for col in model.label_columns if col != "dataset_id"}
    summary = ingest_anndata(cfg.soma_uri, [adata], dataset_ids=[name], fill_values=fill)
    logger.info("appended %d generated cells to %s as dataset_id=%s", summary["n_obs"], cfg.soma_uri, name)


# ---------------------------------------------------------------------------------------------- evaluate
def report_dir(cfg: EvaluateConfig, model: Stage2Model) -> Path:
    if cfg.out_dir:
        return Path(cfg.out_dir)
    run_dir = model.checkpoint.parent.parent if model.checkpoint else Path("runs")
    return run_dir / f"eval-{cfg.protocol.split}"


def write_report(result: dict[str, Any], plot_data: dict[str, Any], out_dir: Path, *, umap: bool) -> list[Path]:
    """evaluation.json and the PNGs (per-condition bars; UMAP of real against generated cells)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / "evaluation.json"]
    files[0].write_text(json.dumps(result, indent=1, default=float))
    per_condition = {s: {c: {m: v[m] for m in ("w2", "mmd2_unbiased", "fd", "energy") if m in v}
                         for c, v in r["per_condition"].items() if "w2" in v}
                     for s, r in result["generation"].items() if "per_condition" in r and s != "scldm_shuffled_labels"}
    title = f"per condition, mean +- std over seeds {result['protocol']['seeds']}"
    files.append(plots.plot_condition_bars(per_condition, out_dir / "per_condition_metrics.png", title=title))
    if umap:
        names = list(plot_data)
        pcs = np.concatenate([plot_data[n][0] for n in names])
        source = np.concatenate([[n] * len(plot_data[n][0]) for n in names])
        cond = np.concatenate([plot_data[n][1] for n in names]).astype(str)
        xy = plots.umap_embedding(pcs, seed=int(result["protocol"]["seeds"][0]))
        n_pcs = result["protocol"]["pca"]["n_components"]
        files.append(plots.plot_umap(xy, source, cond, out_dir / "umap_real_vs_generated.png",
                                     title=f"UMAP of {n_pcs} PCs (fitted on real evaluation cells)"))
    return files


def run_evaluate(cfg: EvaluateConfig, external: dict[str, ExternalSource] | None = None) -> dict[str, Any] | None:
    """Score a trained scLDM (docs/evaluation.md), and any `external` models beside it; the result JSON on rank 0.
    A stage-1 checkpoint is scored without generation: its ceiling, reconstruction, baselines and floor."""
    with _model_job(cfg.model, cfg.tracking, stage1_ok=True) as (dist, model):
        if cfg.compare_weights and model.dit is None:
            raise ConfigError(f"compare_weights=true needs a stage-2 model; {model.checkpoint} is a stage-1 checkpoint")
        try:
            model.sampling_kwargs(cfg.sampling)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if dist.rank != 0:
            return None
        other = None
        if cfg.compare_weights:
            other = _load(cfg.model, cfg.tracking, dist, weights="raw" if model.weights == "ema" else "ema")
        result, plot_data = evaluate(model, cfg.protocol, cfg.sampling, atlas_uri=cfg.atlas_uri,
                                     batch_size=cfg.model.batch_size, device=dist.device, extra_weights=other,
                                     external=external)
        out_dir = report_dir(cfg, model)
        files = write_report(result, plot_data, out_dir, umap=cfg.umap)
        if cfg.json and Path(cfg.json).resolve() != files[0].resolve():
            Path(cfg.json).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(files[0], cfg.json)  # the report's evaluation.json
        result["report_dir"] = str(out_dir)
        result["mlflow_run_id"] = _track(cfg, model, result, files)
        logger.info("evaluation written to %s (%.0f s)", out_dir, result["seconds"])
        return result


def _track(cfg: EvaluateConfig, model: Stage2Model, result: dict[str, Any], files: list[Path]) -> str | None:
    """The evaluation as an MLflow run of its own, tagged with the evaluated stage-2 run and checkpoint."""
    if cfg.tracking.backend == "none":
        return None
    tracking = cfg.tracking
    if tracking.run_name is None:
        from dataclasses import replace

        run_dir = model.checkpoint.parent.parent if model.checkpoint else Path("eval")
        tracking = replace(tracking, run_name=default_run_name("eval", str(run_dir)))
    tags = {"scldm.stage": "eval", EVALUATED_RUN_TAG: str(model.manifest.get("mlflow_run_id")),
            EVALUATED_CHECKPOINT_TAG: str(model.checkpoint)}
    tracker = build_logger(tracking, tags=tags)
    status = "FAILED"
    try:
        tracker.log_params({f"protocol.{k}": json.dumps(v, default=str) if isinstance(v, (dict, list)) else v
                            for k, v in result["protocol"].items()})
        tracker.log_metrics(flat_metrics(result), step=0)
        for f in files:
            tracker.log_artifact(str(f), "evaluation")
        status = "FINISHED"
        return tracker.run_id
    finally:
        tracker.close(status)
