"""`run_vae(cfg)` and `run_ldm(cfg)`: one training job from set-up to teardown, as torchtitan's train.py.

Logging, process group, demo-atlas resolution, vocabularies, loader, model, engine, tracker, `Trainer`,
end-of-run plots, and teardown in `finally` (the tracker is closed FAILED on error, the process group
destroyed). The stage-1 -> stage-2 hand-off (frozen autoencoder, vocabulary check, latent cache) is in
`train/handoff.py`; the end-of-run plots and generation scores in `eval/report.py`.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scldm_scale.checkpoint import read_meta, resume_candidate
from scldm_scale.config import (
    ConfigError,
    LDMExperimentConfig,
    SomaDataConfig,
    VAEExperimentConfig,
    to_flat_dict,
    to_yaml,
)
from scldm_scale.config.data import DEMO_ATLAS
from scldm_scale.config.experiment import check_guidance_weights
from scldm_scale.data.loader import NoSharedGenesError, build_loader
from scldm_scale.data.stats import library_size_stats
from scldm_scale.data.training_data import TrainingData
from scldm_scale.distributed import (
    DistInfo,
    broadcast_object,
    destroy_distributed,
    init_distributed,
)
from scldm_scale.distributed.faults import fail_together
from scldm_scale.eval import report
from scldm_scale.models import build_dit, build_vae, num_parameters
from scldm_scale.tracking import (
    RUN_DIR_TAG,
    DatasetInfo,
    FanoutLogger,
    MemoryLogger,
    MetricLogger,
    NullLogger,
    build_logger,
)
from scldm_scale.train import handoff
from scldm_scale.train import run_dir as run_dirs
from scldm_scale.train.ema import EMA
from scldm_scale.train.ldm_step import ldm_step
from scldm_scale.train.loop import Trainer, TrainResult
from scldm_scale.train.optim import build_engine, peak_lr
from scldm_scale.train.preemption import EXIT_PREEMPTED, StopSignals, parse_signals
from scldm_scale.train.vae_step import vae_step
from scldm_scale.utils import seed_everything, setup_logging

logger = logging.getLogger(__name__)

ExperimentConfig = VAEExperimentConfig | LDMExperimentConfig


@dataclass
class RunResult:
    """What a finished job returns (every rank; `history` is filled on rank 0 only)."""

    run_dir: Path
    """The job's run_dir."""
    run_id: str | None
    """MLflow run id (None without MLflow or when the server was never reached)."""
    train: TrainResult
    """Steps, losses, last checkpoint."""
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """Logged metrics by name: [(step, value), ...] (rank 0)."""

    @property
    def exit_code(self) -> int:
        """0 when training reached train.max_steps; `EXIT_PREEMPTED` (75) when a signal stopped it after a checkpoint."""
        return EXIT_PREEMPTED if self.train.stopped_by else 0


def _init(cfg: ExperimentConfig) -> DistInfo:
    """Logging and the process group; a plain `python` launch becomes a one-process job."""
    # DeepSpeed insists on LOCAL_RANK even for one process; torchrun / deepspeed set it, plain python does not.
    os.environ.setdefault("LOCAL_RANK", "0")
    setup_logging()
    return init_distributed(cfg.train.device, timeout_seconds=cfg.engine.collective_timeout_s)


@dataclass
class _Job:
    """What teardown needs from a job body: the tracker to close and where training had got to."""

    dist: DistInfo
    stops: StopSignals
    tracker: MetricLogger = field(default_factory=NullLogger)
    trainer: Trainer | None = None

    def where(self) -> str:
        return f"at step {self.trainer.step + 1}" if self.trainer is not None else "before training"


def _run_job(cfg: ExperimentConfig, body: Callable[[ExperimentConfig, _Job], RunResult]) -> RunResult:
    """Set up, run `body`, tear down: the shared frame of `run_vae` and `run_ldm`.

    A failure on any rank ends every rank (`fail_together`: the message names the rank and step); a stop
    signal ends the job after a checkpoint (`RunResult.exit_code` = `EXIT_PREEMPTED`); the MLflow run is
    closed FINISHED, KILLED or FAILED, and the process group destroyed, in every case.
    """
    dist = _init(cfg)
    job = _Job(dist=dist, stops=StopSignals(parse_signals(cfg.train.stop_signals)).install())
    status = "FAILED"
    try:
        with fail_together(job.where, grace_s=min(30.0, cfg.engine.collective_timeout_s), agreed=(ConfigError,)):
            seed_everything(cfg.train.seed)
            run_dirs.check_shared(cfg.train.run_dir, dist.rank)
            run_dirs.claim(cfg.train.run_dir, cfg.checkpoint.resume, overwrite=cfg.train.overwrite, rank=dist.rank)
            result = body(cfg, job)
        status = "KILLED" if result.train.stopped_by else "FINISHED"
        return result
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        job.stops.restore()
        job.tracker.close(status)
        destroy_distributed()


def run_vae(cfg: VAEExperimentConfig) -> RunResult:
    """Train the stage-1 autoencoder on `cfg.data` (the embedded demo atlas by default)."""
    return _run_job(cfg, _train_vae)


def _train_vae(cfg: VAEExperimentConfig, job: _Job) -> RunResult:
    dist = job.dist
    data = open_training_data(cfg.data, dist, seed=cfg.train.seed)
    model = build_vae(cfg.model, data.gene_vocab.num_genes)
    n_params = num_parameters(model)  # before the engine shards it (ZeRO-3 leaves empty local tensors)
    engine = build_engine(
        cfg.engine, model, optim_cfg=cfg.optim, max_steps=cfg.train.max_steps, precision=cfg.train.precision,
        device=dist.device, grad_accum_steps=cfg.train.grad_accum_steps,
    )
    job.tracker = tracker = open_tracker(cfg, dist, tags={"scldm.stage": "vae"})
    log_run_start(tracker, cfg, dist, data, extra={"run.num_parameters": n_params})
    job.trainer = trainer = Trainer(
        engine=engine,
        step_fn=vae_step,
        loader=data.loader,
        logger=tracker,
        cfg_train=cfg.train,
        cfg_ckpt=cfg.checkpoint,
        log_interval_steps=cfg.tracking.log_interval_steps,
        manifest=build_manifest(cfg, data, tracker, dist),
        stop_signals=job.stops,
    )
    return finish(tracker, cfg, dist, trainer.train())


def run_ldm(cfg: LDMExperimentConfig) -> RunResult:
    """Train the stage-2 DiT by flow matching on latents of the frozen stage-1 autoencoder.

    The autoencoder comes from `stage1.checkpoint` (a run_dir or one checkpoint) or `stage1.mlflow_run_id`;
    its gene vocabulary must be in the atlas. Latents are cached once when they fit `latent_cache.max_bytes`
    (or with `latent_cache.mode=always`), else encoded on the fly every step.
    """
    return _run_job(cfg, _train_ldm)


def _train_ldm(cfg: LDMExperimentConfig, job: _Job) -> RunResult:
    dist = job.dist
    stage1 = handoff.load_stage1(cfg, dist)
    data = open_training_data(cfg.data, dist, seed=cfg.train.seed, stage1=stage1)
    check_guidance_weights(cfg, data.loader.label_columns)
    cached, latent_stats = handoff.latent_loader(cfg, dist, data, stage1)
    stage1 = handoff.with_latent_stats(stage1, latent_stats)
    loader = cached or data.loader
    dit = build_dit(cfg.model, stage1.vae.latent_shape, data.label_cardinalities)
    n_params = num_parameters(dit)
    engine = build_engine(
        cfg.engine, dit, optim_cfg=cfg.optim, max_steps=cfg.train.max_steps, precision=cfg.train.precision,
        device=dist.device, grad_accum_steps=cfg.train.grad_accum_steps,
    )
    ema = EMA(
        engine,
        decay=cfg.flow.ema_decay,
        warmup_steps=cfg.flow.ema_update_after_step,
        update_every=cfg.flow.ema_update_every,
        ramp=cfg.flow.ema_decay_ramp,
    )
    job.tracker = tracker = open_tracker(cfg, dist, tags=stage1.tags)
    log_run_start(
        tracker,
        cfg,
        dist,
        data,
        extra={"run.num_parameters": n_params, "run.latent_cache": loader is not data.loader},
    )
    step_fn = functools.partial(ldm_step, vae=stage1.vae, latent_stats=stage1.latent_stats)
    manifest = build_manifest(cfg, data, tracker, dist, stage1=stage1)
    job.trainer = trainer = Trainer(
        engine=engine,
        step_fn=step_fn,
        loader=loader,
        logger=tracker,
        cfg_train=cfg.train,
        cfg_ckpt=cfg.checkpoint,
        ema=ema,
        log_interval_steps=cfg.tracking.log_interval_steps,
        manifest=manifest,
        stop_signals=job.stops,
    )
    train_result = trainer.train()
    if not train_result.stopped_by:  # a stopped job evaluates when it finishes, after its resume
        report.evaluate_generation(
            tracker, cfg, dist, engine=engine, ema=ema, stage1=stage1, data=data, manifest=manifest
        )
    return finish(tracker, cfg, dist, train_result)


# ---------------------------------------------------------------------------------------------- set-up
def open_training_data(
    data_cfg: SomaDataConfig, dist: DistInfo, *, seed: int, stage1: handoff.Stage1 | None = None
) -> TrainingData:
    """Resolve "demo" to the embedded atlas (built once, under a file lock), check it and open the loader.

    Stage 2 passes the stage-1 vocabulary, checked against the atlas first.
    """
    uri = data_cfg.atlas_uri
    if uri == DEMO_ATLAS:
        from data_pipelines.demo import ensure_demo_atlas  # lazy: only the demo needs the ingestion code

        uri = ensure_demo_atlas()
    try:
        loader = build_loader(
            data_cfg,
            rank=dist.rank,
            world_size=dist.world_size,
            atlas_uri=uri,
            seed=seed,
            gene_vocab=stage1.gene_vocab if stage1 is not None else None,
        )
    except NoSharedGenesError:
        if stage1 is None:
            raise
        handoff.check_vocabulary(None, uri, stage1)  # raises the vocabulary mismatch, naming the genes
        raise
    if stage1 is not None:
        handoff.check_vocabulary(loader, uri, stage1)
    return TrainingData(atlas_uri=uri, loader=loader)


def _resumed_run_id(cfg: ExperimentConfig) -> tuple[str | None, str | None] | None:
    """(MLflow run id, run key) in the checkpoint this job will resume from (rank 0; None = no checkpoint).

    Either may be None: the run id when the server was down until that checkpoint, the key in older checkpoints.
    """
    ckpt = resume_candidate(cfg.checkpoint.resume, cfg.train.run_dir)
    if ckpt is None:
        return None  # nothing to resume, or a bad checkpoint.resume the Trainer reports on every rank
    manifest = read_meta(ckpt).get("manifest", {})
    return manifest.get("mlflow_run_id"), manifest.get("mlflow_run_key")


def open_tracker(cfg: ExperimentConfig, dist: DistInfo, *, tags: dict[str, str]) -> MetricLogger:
    """One MLflow run per job: rank 0 opens (or, on resume, continues) it; every rank learns its id and key.

    A new job draws a run key (`tracker.run_key`, for the checkpoint manifest's `mlflow_run_key`); a resumed
    job passes the checkpoint's run id and key, so a run the server never saw before that checkpoint is found
    by its key (or created with it) instead of forked. `tracker.run_id` is None while the server is down.
    Rank 0 also keeps the metric history in memory for the end-of-run plots. A new run is named
    `<stage>-<preset>-<time>` unless `tracking.run_name` is set; a resumed run keeps its name.
    """
    import dataclasses
    import uuid

    from scldm_scale.tracking import STAGE_TAG, default_run_name

    found: tuple[str | None, str | None, str] = (None, None, "")
    if dist.rank == 0:
        run_dir = Path(cfg.train.run_dir).resolve()
        tags = {**tags, RUN_DIR_TAG: str(run_dir), "scldm.engine": cfg.engine.name}
        try:
            resumed = _resumed_run_id(cfg)
            run_id, run_key = resumed if resumed is not None else (None, uuid.uuid4().hex)
            tracking = cfg.tracking
            if run_id is None and tracking.run_name is None:
                name = default_run_name(tags.get(STAGE_TAG, "run"), str(run_dir))
                tracking = dataclasses.replace(tracking, run_name=name)
            real = build_logger(tracking, run_id=run_id, run_key=run_key, spill_dir=str(run_dir), tags=tags)
            tracker: MetricLogger = FanoutLogger([real, MemoryLogger()])
            found = (tracker.run_id, tracker.run_key or run_key, "")
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank below, so none waits forever
            found = (None, None, f"{type(exc).__name__}: {exc}")
    run_id, run_key, error = broadcast_object(found)
    if error:
        raise RuntimeError(f"opening the tracker failed on rank 0: {error}")
    return tracker if dist.rank == 0 else NullLogger(run_id, run_key)


def log_run_start(
    tracker: MetricLogger,
    cfg: ExperimentConfig,
    dist: DistInfo,
    data: TrainingData,
    extra: dict[str, Any] | None = None,
) -> None:
    """Rank 0: resolved config (params + artifact), run-time values, dataset input, gene vocabulary."""
    if dist.rank != 0:
        return
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    (run_dir / "gene_vocab.json").write_text(data.gene_vocab.to_json())
    cells_per_step = cfg.data.micro_batch_size * cfg.train.grad_accum_steps * dist.world_size
    runtime = {
        "run.world_size": dist.world_size,
        "run.device": str(dist.device),
        "run.atlas_uri": data.atlas_uri,
        "run.num_genes": data.gene_vocab.num_genes,
        "run.num_cells": data.loader.num_cells,
        "run.cells_per_step": cells_per_step,
        "run.peak_lr": peak_lr(cfg.optim, dist.world_size),
        **(extra or {}),
    }
    logger.info("run: %s", ", ".join(f"{k.removeprefix('run.')}={v}" for k, v in runtime.items()))
    tracker.log_params({**to_flat_dict(cfg), **runtime})
    tracker.log_dataset(dataset_info(cfg.data, data))
    tracker.log_artifact(str(run_dir / "config.yaml"))
    tracker.log_artifact(str(run_dir / "gene_vocab.json"))


def dataset_info(data_cfg: SomaDataConfig, data: TrainingData) -> DatasetInfo:
    """Atlas URI, value filter, cell count and a digest of the selected cells and the gene vocabulary."""
    cells_sha = data.loader.state_dict()["fingerprint"]["obs_joinids_sha1"]
    digest = hashlib.sha1(f"{data.atlas_uri}|{cells_sha}|{data.gene_vocab.to_json()}".encode()).hexdigest()
    return DatasetInfo(
        name=Path(data.atlas_uri.rstrip("/")).name,
        uri=data.atlas_uri,
        value_filter=data_cfg.value_filter,
        num_cells=data.loader.num_cells,
        digest=digest,
        num_genes=data.gene_vocab.num_genes,
    )


def build_manifest(
    cfg: ExperimentConfig,
    data: TrainingData,
    tracker: MetricLogger,
    dist: DistInfo,
    stage1: handoff.Stage1 | None = None,
) -> dict[str, Any]:
    """What every checkpoint carries: config, vocabularies, MLflow run id and run key (and stage-1 lineage).

    The run key finds the MLflow run again on resume even when the server was down when the job started
    (the run id is then None until the server answers; the Trainer refreshes it at every save).

    Only rank 0 writes `meta.json`, so only rank 0 streams cells for the library-size statistics.
    """
    manifest = {
        "stage": "ldm" if stage1 else "vae",
        "config_yaml": to_yaml(cfg),
        "mlflow_run_id": tracker.run_id,
        "mlflow_run_key": tracker.run_key,
        "gene_vocab": data.gene_vocab.to_json(),
        "atlas_uri": data.atlas_uri,
        "label_vocabs": {c: v.to_json() for c, v in data.loader.label_vocabs.items()},
        "library_size_stats": library_size_stats(
            cfg.data,
            max_cells=cfg.data.library_size_stats_cells or None,
            seed=cfg.train.seed,
            from_loader=data.loader,
        )
        if dist.rank == 0
        else None,
    }
    if stage1 is not None:
        manifest.update(
            stage1_checkpoint=str(stage1.checkpoint.resolve()),
            stage1_digest=stage1.digest,
            stage1_run_id=stage1.run_id,
            stage1_config_yaml=stage1.config_yaml,
            latent_stats=stage1.latent_stats.to_dict() if stage1.latent_stats else None,
        )
    return manifest


# ---------------------------------------------------------------------------------------------- end
def finish(tracker: MetricLogger, cfg: ExperimentConfig, dist: DistInfo, result: TrainResult) -> RunResult:
    """Rank 0: loss-curve plot (artifact), checkpoint tags for stage-2 look-ups; every rank: the result."""
    history: dict[str, list[tuple[int, float]]] = {}
    if dist.rank == 0:
        memory = next(lg for lg in tracker.loggers if isinstance(lg, MemoryLogger))
        history = memory.history
        if cfg.tracking.enable_plots and history:
            report.log_loss_curves(tracker, history, Path(cfg.train.run_dir))
        if result.last_checkpoint is not None:  # the checkpoint tags are set by every save
            tracker.set_tags({"scldm.final_step": str(result.final_step)})
        logger.info(
            "done: step %d, %d cells seen, last checkpoint %s",
            result.final_step,
            result.cells_seen,
            result.last_checkpoint,
        )
    return RunResult(run_dir=Path(cfg.train.run_dir), run_id=tracker.run_id, train=result, history=history)
