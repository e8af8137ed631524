"""Load a trained scLDM (stage-2 DiT + its frozen stage-1 autoencoder) for generation and evaluation.

One process, no process group: `checkpoint.load_model_weights` consolidates any engine's shards. Everything the
model needs travels in the stage-2 checkpoint manifest: both configs, the gene and label vocabularies, the
per-condition library-size statistics and the latent normalisation; only the stage-1 weights are read from
the stage-1 checkpoint the manifest names.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scldm_scale.checkpoint import (
    EMA,
    MODEL,
    load_model_weights,
    manifest_digest,
    resolve_checkpoint,
    verify_checkpoint,
)
from scldm_scale.config import ConfigError, LDMExperimentConfig, VAEExperimentConfig, load_config_text
from scldm_scale.config.eval import SamplingConfig
from scldm_scale.config.tracking import TrackingConfig
from scldm_scale.data.stats import LibrarySizeStats
from scldm_scale.data.vocab import GeneVocab, LabelVocab
from scldm_scale.distributed import DistInfo, broadcast_object
from scldm_scale.models import DiT, LatentStats, TransformerVAE, build_dit, build_vae
from scldm_scale.tracking import CHECKPOINT_DIGEST_TAG, CHECKPOINT_TAG, get_run_tags

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage1:
    """The frozen stage-1 autoencoder and what came with its checkpoint, as stage 2 trains on it
    (`train/handoff.load_stage1`; the end-of-run report reads it too)."""

    checkpoint: Path
    """Checkpoint directory the weights were read from."""
    vae: TransformerVAE
    """Frozen (requires_grad False, eval) on this rank's device."""
    gene_vocab: GeneVocab
    """The vocabulary the autoencoder was trained on (token ids must not change)."""
    config_yaml: str
    """Resolved stage-1 config."""
    run_id: str | None
    """Stage-1 MLflow run, if any."""
    digest: str = ""
    """sha256 of the checkpoint's meta.json (pinned in every stage-2 manifest)."""
    latent_stats: LatentStats | None = None
    """Scalar latent normalisation (flow.latent_normalization=standardize), fitted on cached latents
    (`train/handoff.with_latent_stats`)."""
    tags: dict[str, str] = field(default_factory=dict)
    """Lineage tags of the stage-2 run."""


@dataclass
class Stage2Model:
    """A trained scLDM ready to sample: the DiT (EMA or raw weights), the frozen autoencoder and the manifest."""

    dit: DiT | None
    """Velocity network in eval mode (EMA weights when `weights == "ema"`); None for a stage-1 checkpoint loaded
    for evaluation (the autoencoder's ceiling, reconstruction and baselines, no generation)."""
    vae: TransformerVAE
    """Frozen stage-1 autoencoder in eval mode."""
    cfg: LDMExperimentConfig | VAEExperimentConfig
    """The stage-2 training config (sampler defaults, label columns, atlas); the stage-1 one without a DiT."""
    gene_vocab: GeneVocab
    """Genes the autoencoder decodes (token id = 1 + index)."""
    label_vocabs: dict[str, LabelVocab]
    """Label columns in the DiT's order, with their training vocabularies (id 0 = null)."""
    library_size_stats: LibrarySizeStats
    """Per-condition log-normal library sizes of the training cells."""
    latent_stats: LatentStats | None = None
    """Latent normalisation applied in training (None = latents as encoded)."""
    checkpoint: Path | None = None
    """Stage-2 checkpoint directory (None for a model built in memory)."""
    stage1_checkpoint: Path | None = None
    """Stage-1 checkpoint directory."""
    weights: str = "ema"
    """Which DiT weights are loaded: "ema" or "raw"."""
    manifest: dict[str, Any] = field(default_factory=dict)
    """The stage-2 checkpoint manifest."""

    @property
    def label_columns(self) -> list[str]:
        return list(self.label_vocabs)

    @property
    def atlas_uri(self) -> str:
        return str(self.manifest.get("atlas_uri") or self.cfg.data.atlas_uri)

    def sampling_kwargs(self, sampling: SamplingConfig) -> dict[str, Any]:
        """Keyword arguments of `generate_cells`: the settings given, the model's training values elsewhere.

        Raises:
            ValueError: when the guidance weights do not match the label columns.
        """
        if self.dit is None:
            return {}
        flow = self.cfg.flow
        weights = sampling.guidance_weights or flow.guidance_weights or None
        if weights is not None and len(weights) != len(self.label_columns):
            raise ValueError(f"sampling.guidance_weights needs one weight per label column {self.label_columns}, "
                             f"got {weights}")
        return {"sampler": sampling.sampler or flow.sampler, "num_steps": sampling.num_steps or flow.num_steps,
                "guidance_weights": weights, "strategy": sampling.guidance or self.cfg.model.guidance,
                "atol": flow.atol, "rtol": flow.rtol, "latent_stats": self.latent_stats}

    def describe(self) -> dict[str, Any]:
        """JSON-able provenance (for h5ad `uns`, reports and MLflow params)."""
        return {
            "stage": "vae" if self.dit is None else "ldm",
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "stage1_checkpoint": str(self.stage1_checkpoint) if self.stage1_checkpoint else None,
            "mlflow_run_id": self.manifest.get("mlflow_run_id"),
            "stage1_run_id": self.manifest.get("stage1_run_id"),
            "weights": self.weights,
            "label_columns": self.label_columns,
            "num_genes": self.gene_vocab.num_genes,
            "atlas_uri": self.atlas_uri,
        }


def _label_vocabs(manifest: dict[str, Any], cfg: LDMExperimentConfig) -> dict[str, LabelVocab]:
    """Label vocabularies in the DiT's column order (the manifest's JSON object does not keep order; the
    library-size statistics and the config do)."""
    vocabs = manifest["label_vocabs"]
    order = (manifest.get("library_size_stats") or {}).get("label_columns") or cfg.data.label_columns or []
    if sorted(order) != sorted(vocabs):
        raise ValueError(f"manifest label columns disagree: {list(order)} against vocabularies {sorted(vocabs)}")
    return {col: LabelVocab.from_json(vocabs[col]) for col in order}


def _load_weights(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load every parameter (buffers are rebuilt by the constructor; an EMA holds parameters only)."""
    missing, _ = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if k in dict(module.named_parameters())]
    if missing:
        raise ValueError(f"{source} lacks parameters {missing[:5]} ({len(missing)} in all)")


def config_from_yaml(root: type, text: str, source: str):
    """A config dataclass from the resolved YAML a manifest carries."""
    try:
        return load_config_text(root, text, source="the stored config")
    except ValueError as exc:
        raise ValueError(f"{source}: the stored config does not load with this version: {exc}") from None


def checkpoint_of_run(tracking: TrackingConfig, run_id: str, dist: DistInfo, key: str) -> str:
    """The checkpoint an MLflow run's tags name, checked against the digest the run recorded with it.

    A path read from a tracking server is not trusted by itself: the checkpoint is used only when its
    meta.json has the sha256 the run tagged (`scldm.checkpoint_digest`) and every file it lists matches its
    size and checksum. Looked up and verified on rank 0 and broadcast, so every rank gets the answer or the
    same `ConfigError` naming `key`.
    """
    found: tuple[str | None, str] = (None, "")
    if dist.rank == 0:
        try:
            found = (_verified_checkpoint_of_run(get_run_tags(tracking, run_id)), "")
        except ValueError as exc:
            found = (None, f"{key}={run_id!r}: {exc}")
    path, error = broadcast_object(found)
    if path is None:
        raise ConfigError(error)
    return path


def _verified_checkpoint_of_run(tags: dict[str, str]) -> str:
    path, digest = tags.get(CHECKPOINT_TAG), tags.get(CHECKPOINT_DIGEST_TAG)
    if not path:
        raise ValueError(f"the run has no {CHECKPOINT_TAG} tag (it saved no checkpoint yet)")
    if not digest:
        raise ValueError(
            f"the run names {path} but recorded no {CHECKPOINT_DIGEST_TAG} (written before checkpoints were "
            "checksummed), so it cannot be verified; pass the checkpoint directory itself if you trust it"
        )
    result = verify_checkpoint(path, expected_digest=digest)
    if not result.ok:
        raise ValueError(f"checkpoint {path} does not match what the run recorded: {'; '.join(result.problems)}")
    return path


def verified(ckpt: Path) -> Path:
    """`ckpt` when every file its meta.json lists has the recorded size and checksum, else a ValueError naming
    the bad files (checkpoints written before checksums pass, with a warning)."""
    result = verify_checkpoint(ckpt)
    if not result.ok:
        raise ValueError(f"checkpoint {ckpt} is damaged: {'; '.join(result.problems)}")
    for warning in result.warnings:
        logger.warning("%s: %s", ckpt, warning)
    return ckpt


def load_autoencoder(location: str | Path, device: torch.device | str = "cpu", *, verify: bool = True
                     ) -> tuple[TransformerVAE, GeneVocab, Path, dict[str, Any]]:
    """The frozen stage-1 autoencoder of a stage-1 run_dir or checkpoint: the model on `device`, its gene
    vocabulary, the checkpoint directory and its meta.json (the manifest under "manifest").

    `verify=False` skips the checksums, for a caller that verified this checkpoint already (once, on rank 0).

    Raises:
        ValueError: when the checkpoint is not a stage-1 autoencoder's, or (verify) is damaged.
    """
    ckpt = resolve_checkpoint(location)
    if verify:
        verified(ckpt)
    state, meta = load_model_weights(ckpt)
    vae, vocab, _ = _autoencoder(ckpt, state, meta, device)
    return vae, vocab, ckpt, meta


def _autoencoder(ckpt: Path, state: dict[str, torch.Tensor], meta: dict[str, Any], device: torch.device | str
                 ) -> tuple[TransformerVAE, GeneVocab, VAEExperimentConfig]:
    """The frozen autoencoder of loaded stage-1 weights and meta.json, its vocabulary and its config."""
    manifest = meta.get("manifest", {})
    if "gene_vocab" not in manifest or "config_yaml" not in manifest:
        raise ValueError(f"{ckpt} is not a stage-1 autoencoder checkpoint (its manifest has no gene_vocab/config_yaml)")
    vae_cfg = config_from_yaml(VAEExperimentConfig, manifest["config_yaml"], f"{ckpt}/meta.json")
    vocab = GeneVocab.from_json(manifest["gene_vocab"])
    vae = build_vae(vae_cfg.model, vocab.num_genes)
    vae.load_state_dict(state)
    return vae.requires_grad_(False).eval().to(device), vocab, vae_cfg


def load_stage2(location: str | Path, *, device: torch.device | str = "cpu", weights: str = "ema",
                stage1_ok: bool = False) -> Stage2Model:
    """Load a stage-2 run_dir (its latest checkpoint) or checkpoint directory, and the stage-1 model it names.

    Args:
        location: stage-2 run_dir or `checkpoints/step-XXXXXXXX` directory.
        device: where the models go.
        weights: "ema" (the default; falls back to raw weights, with a warning, when the checkpoint has no EMA)
            or "raw".
        stage1_ok: accept a stage-1 checkpoint too, loaded without a DiT (for evaluating the autoencoder).

    Raises:
        ValueError: naming the location when it holds no stage-2 checkpoint, or its stage-1 checkpoint is gone.
    """
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    try:
        ckpt = resolve_checkpoint(location)
    except (FileNotFoundError, ValueError) as exc:
        raise ValueError(f"no stage-2 checkpoint at {str(location)!r} ({exc})") from None
    state, meta = load_model_weights(verified(ckpt), which=MODEL)
    manifest = meta.get("manifest", {})
    if stage1_ok and manifest.get("stage") == "vae":
        return _stage1_only(ckpt, state, meta, device)
    if manifest.get("stage") != "ldm":
        raise ValueError(f"{ckpt} is not a stage-2 (ldm) checkpoint: its manifest says stage={manifest.get('stage')!r}")
    cfg = config_from_yaml(LDMExperimentConfig, manifest["config_yaml"], f"{ckpt}/meta.json")
    stage1_path = manifest.get("stage1_checkpoint")
    if not stage1_path or not Path(stage1_path).exists():
        raise ValueError(f"{ckpt}: its stage-1 checkpoint {stage1_path!r} is missing; the stage-2 model needs it to decode")
    pinned = manifest.get("stage1_digest")
    if pinned and manifest_digest(stage1_path) != pinned:
        raise ValueError(
            f"{ckpt}: its stage-1 checkpoint {stage1_path} changed since stage 2 was trained on it (meta.json sha256 "
            f"is no longer {pinned[:12]}...); the latents would decode wrongly"
        )
    vae, gene_vocab, stage1_ckpt, _ = load_autoencoder(stage1_path, device)
    label_vocabs = _label_vocabs(manifest, cfg)
    dit = build_dit(cfg.model, vae.latent_shape, [v.num_classes - 1 for v in label_vocabs.values()])
    _load_weights(dit, state, f"{ckpt} (model)")
    loaded = "raw"
    if weights == "ema":
        try:
            ema_state, _ = load_model_weights(ckpt, which=EMA)
            _load_weights(dit, ema_state, f"{ckpt} (ema)")
            loaded = "ema"
        except (KeyError, FileNotFoundError) as exc:
            logger.warning("%s has no EMA weights (%s): sampling with the raw weights", ckpt, exc)
    stats = manifest.get("library_size_stats")
    if stats is None:
        raise ValueError(f"{ckpt}: the manifest has no library_size_stats (needed to draw library sizes)")
    latent = manifest.get("latent_stats")
    return Stage2Model(
        dit=dit.requires_grad_(False).eval().to(device),
        vae=vae,
        cfg=cfg,
        gene_vocab=gene_vocab,
        label_vocabs=label_vocabs,
        library_size_stats=LibrarySizeStats.from_manifest(stats, source=f"{ckpt}/meta.json"),
        latent_stats=LatentStats.from_dict(latent) if latent else None,
        checkpoint=ckpt,
        stage1_checkpoint=stage1_ckpt,
        weights=loaded,
        manifest=manifest,
    )


def _stage1_only(ckpt: Path, state: dict[str, torch.Tensor], meta: dict[str, Any], device: torch.device | str
                 ) -> Stage2Model:
    """A stage-1 checkpoint as a `Stage2Model` without a DiT: the autoencoder, its vocabularies and statistics."""
    vae, gene_vocab, cfg = _autoencoder(ckpt, state, meta, device)
    manifest = meta["manifest"]
    stats = manifest.get("library_size_stats")
    if stats is None or "label_vocabs" not in manifest:
        raise ValueError(f"{ckpt}: the manifest has no library_size_stats / label_vocabs (an older stage-1 format)")
    return Stage2Model(dit=None, vae=vae, cfg=cfg, gene_vocab=gene_vocab, label_vocabs=_label_vocabs(manifest, cfg),
                       library_size_stats=LibrarySizeStats.from_manifest(stats, source=f"{ckpt}/meta.json"),
                       checkpoint=ckpt, stage1_checkpoint=ckpt, weights="raw", manifest=manifest)


def stage2_from_memory(
    dit: nn.Module, vae: TransformerVAE, cfg: LDMExperimentConfig, manifest: dict[str, Any], weights: str
) -> Stage2Model:
    """A `Stage2Model` of a model still in memory (the end-of-run report), from the manifest it would save."""
    label_vocabs = _label_vocabs(manifest, cfg)
    latent = manifest.get("latent_stats")
    return Stage2Model(
        dit=dit.eval(),
        vae=vae.eval(),
        cfg=cfg,
        gene_vocab=GeneVocab.from_json(manifest["gene_vocab"]),
        label_vocabs=label_vocabs,
        library_size_stats=LibrarySizeStats.from_manifest(manifest["library_size_stats"]),
        latent_stats=LatentStats.from_dict(latent) if latent else None,
        weights=weights,
        manifest=json.loads(json.dumps(manifest, default=str)),
    )
