"""Stage-1 -> stage-2 hand-off: find the stage-1 checkpoint, load and freeze its autoencoder, check its gene
vocabulary against the atlas, and build the latent cache (or decide to encode on the fly).

No manual conversion: `checkpoint.load_model_weights` reads any engine's sharded checkpoint on one process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scldm_scale.checkpoint import (
    manifest_digest,
    read_meta,
    resolve_checkpoint,
    resume_candidate,
    verify_checkpoint,
)
from scldm_scale.config import (
    ConfigError,
    LDMExperimentConfig,
)
from scldm_scale.config.experiment import DEFAULT_STAGE1_RUN_DIR
from scldm_scale.data import latent_cache
from scldm_scale.data.loader import SomaLoader
from scldm_scale.data.training_data import TrainingData
from scldm_scale.distributed import DistInfo, barrier, broadcast_object
from scldm_scale.eval.loading import Stage1, checkpoint_of_run, load_autoencoder, verified
from scldm_scale.models import LatentStats
from scldm_scale.train.ldm_step import encode_latents

logger = logging.getLogger(__name__)

LATENT_STATS_CELLS = 100_000
"""Cached latents (the first cells in `soma_joinid` order) that `flow.latent_normalization=standardize` fits its
scalar shift and scale on."""
ENCODE_BATCH_SIZE = 256
"""Cells per encoding batch when the cache is built (no gradients, so larger than a training micro-batch)."""
STAGE1_RUN_ID_TAG = "scldm.stage1.run_id"
"""Stage-2 run tag: the stage-1 MLflow run."""
STAGE1_CHECKPOINT_TAG = "scldm.stage1.checkpoint"
"""Stage-2 run tag: the stage-1 checkpoint directory loaded."""
LATENT_STATS_TAG = "scldm.latent_stats"
"""Stage-2 run tag: the fitted latent normalisation (JSON), when `flow.latent_normalization=standardize`."""


def _stage1_location(cfg: LDMExperimentConfig, dist: DistInfo) -> tuple[str, str | None, bool]:
    """(run_dir or checkpoint path, stage-1 run id, already verified): the stage-1 checkpoint a resumed stage 2
    was trained on (pinned in its manifest), else `stage1.mlflow_run_id` (looked up on rank 0) or
    `stage1.checkpoint`. Pinned digests and run-id lookups verify the checkpoint on rank 0 already."""
    pinned = pinned_stage1(cfg, dist)
    if pinned is not None:
        return pinned
    run_id = cfg.stage1.mlflow_run_id
    if run_id is None:
        return cfg.stage1.checkpoint or DEFAULT_STAGE1_RUN_DIR, None, False
    return checkpoint_of_run(cfg.tracking, run_id, dist, "stage1.mlflow_run_id"), run_id, True


def _verify_once(location: str, key: str, dist: DistInfo) -> None:
    """Checksum the stage-1 checkpoint on rank 0 only (every rank then loads it unchecked); a ConfigError on all."""
    error = ""
    if dist.rank == 0:
        try:
            verified(resolve_checkpoint(location))
        except (FileNotFoundError, ValueError) as exc:
            error = f"{key}: no stage-1 checkpoint at {location!r} ({exc})"
    error = broadcast_object(error)
    if error:
        raise ConfigError(error)


def pinned_stage1(cfg: LDMExperimentConfig, dist: DistInfo) -> tuple[str, str | None, bool] | None:
    """The stage-1 checkpoint (path, run id, verified) pinned by the stage-2 checkpoint this job will resume, or
    None. `verified` is False only for an older stage 2 that pinned no digest.

    Checked on rank 0 against the digest pinned with it; every rank gets the answer or the same ConfigError.
    A stage-2 run resumed on another autoencoder would decode its latents wrongly, so a changed or missing
    stage-1 checkpoint stops the job instead of being re-resolved to whatever is newest.
    """
    found: tuple[tuple[str, str | None, bool] | None, str] = (None, "")
    if dist.rank == 0:
        try:
            found = (_pinned_on_rank0(cfg), "")
        except ValueError as exc:
            found = (None, str(exc))
    pinned, error = broadcast_object(found)
    if error:
        raise ConfigError(error)
    return pinned


def _pinned_on_rank0(cfg: LDMExperimentConfig) -> tuple[str, str | None, bool] | None:
    stage2 = resume_candidate(cfg.checkpoint.resume, cfg.train.run_dir)
    if stage2 is None:
        return None
    manifest = read_meta(stage2).get("manifest", {})
    path, digest = manifest.get("stage1_checkpoint"), manifest.get("stage1_digest")
    if not path:
        return None
    if not digest:
        logger.warning("%s pins stage-1 checkpoint %s without a digest (older run): not verified", stage2, path)
        return path, manifest.get("stage1_run_id"), False
    result = verify_checkpoint(path, expected_digest=digest)
    if not result.ok:
        raise ValueError(
            f"stage 2 resumes from {stage2}, which was trained on the stage-1 checkpoint {path} (meta.json sha256 "
            f"{digest[:12]}...); that checkpoint changed or is gone: {'; '.join(result.problems)}. Restore it, or "
            "start stage 2 anew in another train.run_dir (or checkpoint.resume=never with train.overwrite=true)"
        )
    configured = cfg.stage1.checkpoint
    if configured and Path(configured).exists() and resolve_checkpoint(configured).resolve() != Path(path).resolve():
        logger.warning("stage1.checkpoint=%s ignored: the resumed stage 2 is pinned to %s", configured, path)
    return path, manifest.get("stage1_run_id"), True


def load_stage1(cfg: LDMExperimentConfig, dist: DistInfo) -> Stage1:
    """Load the stage-1 autoencoder (any engine, any world size), freeze it, move it to this rank's device.

    Raises:
        ConfigError: naming `stage1.checkpoint` / `stage1.mlflow_run_id` when nothing loadable is found, or
            when the stage-1 checkpoint pinned by a resumed stage 2 changed.
    """
    location, run_id, checked = _stage1_location(cfg, dist)
    key = "stage1.mlflow_run_id" if cfg.stage1.mlflow_run_id else "stage1.checkpoint"
    if not checked:
        _verify_once(location, key, dist)
    try:
        vae, gene_vocab, ckpt, meta = load_autoencoder(location, dist.device, verify=False)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"{key}: no stage-1 checkpoint at {location!r} ({exc})") from exc
    manifest = meta["manifest"]
    run_id = run_id or manifest.get("mlflow_run_id")
    logger.info(
        "stage 1: %s (step %s, %d genes, run %s), frozen",
        ckpt,
        meta.get("step"),
        gene_vocab.num_genes,
        run_id,
    )
    tags = {"scldm.stage": "ldm", STAGE1_CHECKPOINT_TAG: str(ckpt.resolve()), STAGE1_RUN_ID_TAG: str(run_id)}
    return Stage1(ckpt, vae, gene_vocab, manifest["config_yaml"], run_id, digest=manifest_digest(ckpt), tags=tags)


def check_vocabulary(loader: SomaLoader | None, atlas_uri: str, stage1: Stage1) -> None:
    """Every gene of the stage-1 vocabulary must be in the atlas var (token ids keep their meaning), read from
    the training loader's var -> token map (no second open). `loader=None`: no gene is shared at all.

    Raises:
        ValueError: listing how many and which genes are missing.
    """
    vocab = stage1.gene_vocab
    var_to_token = loader.dataset.spec.var_to_token if loader is not None else np.zeros(0, np.int64)
    present = np.zeros(vocab.num_genes + 1, bool)
    present[var_to_token[var_to_token > 0]] = True
    missing = [g for t, g in enumerate(vocab.feature_ids, start=1) if not present[t]]
    if missing:
        raise ValueError(
            f"gene vocabulary mismatch: the stage-1 autoencoder ({stage1.checkpoint}) was trained on "
            f"{vocab.num_genes} genes, {len(missing)} of them are not in data.atlas_uri={atlas_uri!r}, "
            f"e.g. {missing[:5]}; train stage 2 on the stage-1 atlas or retrain stage 1"
        )
    extra = int((var_to_token == 0).sum())
    if extra > 0:
        logger.warning("the atlas has %d genes the stage-1 vocabulary lacks; they are ignored", extra)


def cache_key(cfg: LDMExperimentConfig, atlas_uri: str, stage1: Stage1, label_columns: list[str]) -> dict[str, Any]:
    """What the cached latents depend on: the stage-1 weights, atlas, filter, labels and vocabulary."""
    vocab_sha = hashlib.sha1(stage1.gene_vocab.to_json().encode()).hexdigest()[:16]
    return {
        "stage1_checkpoint": str(stage1.checkpoint.resolve()),
        "atlas_uri": atlas_uri,
        "value_filter": cfg.data.value_filter,
        "label_columns": list(label_columns),
        "max_tokens_per_cell": cfg.data.max_tokens_per_cell,
        "gene_vocab_sha1": vocab_sha,
    }


def latent_loader(
    cfg: LDMExperimentConfig, dist: DistInfo, data: TrainingData, stage1: Stage1
) -> tuple[latent_cache.LatentCacheLoader | None, LatentStats | None]:
    """The cached-latent loader, building the cache first if needed (None = encode on the fly), and the latent
    normalisation fitted on the cached latents (None with `flow.latent_normalization=none`; give it to the
    run with `with_latent_stats`).

    With `latent_cache.mode=auto` the cache is used when `estimate_bytes` fits `latent_cache.max_bytes`.
    Every rank encodes its own partition of one unshuffled pass; rank 0 writes the index after a barrier.
    """
    need = latent_cache.estimate_bytes(
        data.loader.num_cells, stage1.vae.latent_shape, len(data.loader.label_vocabs)
    )
    mode = cfg.latent_cache.mode
    if mode == "never" or (mode == "auto" and need > cfg.latent_cache.max_bytes):
        logger.info(
            "latent cache off (mode=%s, needs %.1f MiB, budget %.1f MiB): encoding on the fly",
            mode,
            need / 2**20,
            cfg.latent_cache.max_bytes / 2**20,
        )
        return None, _fit_latent_stats(cfg, None)
    cache_dir = Path(cfg.latent_cache.dir or Path(cfg.train.run_dir) / "latent_cache")
    key = cache_key(cfg, data.atlas_uri, stage1, list(data.loader.label_vocabs))
    if not broadcast_object(latent_cache.cache_is_valid(cache_dir, key) if dist.rank == 0 else None):
        _build_cache(cfg, dist, data, stage1, cache_dir, key)
    loader = latent_cache.LatentCacheLoader(
        cache_dir,
        rank=dist.rank,
        world_size=dist.world_size,
        micro_batch_size=cfg.data.micro_batch_size,
        seed=cfg.data.seed if cfg.data.seed is not None else cfg.train.seed,
        shuffle=cfg.data.shuffle,
    )
    logger.info("latent cache: %s (%d cells, %.1f MiB)", cache_dir, loader.num_cells, need / 2**20)
    return loader, _fit_latent_stats(cfg, loader.latent_sample(LATENT_STATS_CELLS))


def _build_cache(
    cfg: LDMExperimentConfig,
    dist: DistInfo,
    data: TrainingData,
    stage1: Stage1,
    cache_dir: Path,
    key: dict[str, Any],
) -> None:
    """Encode one unshuffled pass of this rank's cells and write the shard; rank 0 indexes the shards."""
    logger.info("latent cache: encoding %d training cells into %s", data.loader.num_cells, cache_dir)
    # The training loader's cells, snapshot and vocabularies (stage 1's genes), unshuffled: no second open.
    loader = data.loader.derive(shuffle=False, seed=0, batch_size=max(cfg.data.micro_batch_size, ENCODE_BATCH_SIZE))
    total = len(loader)

    def batches():
        for i, batch in enumerate(loader):
            if dist.rank == 0 and (i + 1) % max(1, total // 10) == 0:
                logger.info("latent cache: %d / %d batches encoded", i + 1, total)
            keep = ~batch["is_padding"] if "is_padding" in batch else None
            batch = {k: (v[keep] if keep is not None else v).to(dist.device) for k, v in batch.items()}
            yield batch

    latent_cache.write_shard(
        cache_dir,
        batches(),
        lambda b: encode_latents(stage1.vae, b),
        rank=dist.rank,
        world_size=dist.world_size,
    )
    barrier()
    if dist.rank == 0:
        latent_cache.write_index(cache_dir, world_size=dist.world_size, key=key)
    barrier()


def _fit_latent_stats(cfg: LDMExperimentConfig, latents: torch.Tensor | None) -> LatentStats | None:
    """`flow.latent_normalization=standardize` needs a scalar shift/scale; fit it on cached latents."""
    if cfg.flow.latent_normalization == "none":
        return None
    if latents is None:
        raise NotImplementedError(
            "flow.latent_normalization=standardize needs the latent cache (latent_cache.mode)"
        )
    return LatentStats.fit(latents[:LATENT_STATS_CELLS])


def with_latent_stats(stage1: Stage1, latent_stats: LatentStats | None) -> Stage1:
    """`stage1` with the latent normalisation `latent_loader` fitted (step function, manifest, report) and its
    run tag; unchanged for None."""
    if latent_stats is None:
        return stage1
    tags = {**stage1.tags, LATENT_STATS_TAG: json.dumps(latent_stats.to_dict())}
    return dataclasses.replace(stage1, latent_stats=latent_stats, tags=tags)
