"""Evaluate a trained scLDM against the atlas cells of one split (docs/evaluation.md): generation beside three
references (real floor, Gaussian-latent baseline, stage-1 ceiling), reconstruction, and embeddings.

Single process. Cells are read through the training loader (same gene vocabulary, same labels), never
truncated, and reduced at once to the HVGs plus each cell's total over all genes, so memory is
O(cells x HVGs) apart from one decoded batch.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from scldm_scale.config import ConfigError
from scldm_scale.config.eval import ProtocolConfig, SamplingConfig
from scldm_scale.data.loader import build_loader
from scldm_scale.eval import metrics as M
from scldm_scale.eval import protocol as P
from scldm_scale.eval.generation import cell_noise, cell_seed, generate_cells, sample_counts
from scldm_scale.eval.loading import Stage2Model

logger = logging.getLogger(__name__)

ExternalSource = Callable[[np.ndarray, np.ndarray, int], np.ndarray]
"""Another model's cells, scored like scLDM's: called with the evaluation cells' label ids (N, K) (the model's
label vocabularies, 0 = null), the library sizes scLDM draws for them (N,) and a seed; returns raw counts
(N, G) over the model's gene vocabulary, in its order."""


SOURCES = ("scldm", "gaussian_baseline", "stage1_ceiling", "real_floor")
"""Every generated or reference set scored, in report order."""


@dataclass
class RealCells:
    """Atlas cells in token form (CPU batches without padding), with their labels and library sizes."""

    batches: list[dict[str, torch.Tensor]]
    labels: np.ndarray
    library_size: np.ndarray

    def __len__(self) -> int:
        return len(self.library_size)

    def keep(self, mask: np.ndarray) -> RealCells:
        """The cells where `mask` (N,) is True."""
        out, start = [], 0
        for b in self.batches:
            n = len(b["library_size"])
            sel = torch.from_numpy(mask[start : start + n])
            if sel.any():
                out.append({k: v[sel] for k, v in b.items()})
            start += n
        return RealCells(out, self.labels[mask], self.library_size[mask])


def known_labels(cells: RealCells, source: str) -> tuple[RealCells, int]:
    """Only the cells whose every label value the model was trained on (a condition it never saw can be
    neither generated nor given a floor); how many were left out, with a warning."""
    known = (cells.labels > 0).all(1) if cells.labels.shape[1] else np.ones(len(cells), dtype=bool)
    dropped = int((~known).sum())
    if dropped == len(cells):
        raise ValueError(f"none of the {len(cells)} cells of {source} has label values the model was trained on")
    if dropped:
        logger.warning("evaluation: %d of %d cells of %s have label values the model was not trained on and are "
                       "left out", dropped, len(cells), source)
    return (cells.keep(known) if dropped else cells), dropped


def read_cells(model: Stage2Model, atlas_uri: str, value_filter: str | None, *, max_cells: int, seed: int,
               batch_size: int) -> RealCells:
    """Up to `max_cells` cells of `value_filter` (a seeded shuffled sample), whole (no token cap)."""
    data_cfg = dataclasses.replace(model.cfg.data, label_columns=model.label_columns, max_tokens_per_cell=None)
    loader = build_loader(data_cfg, rank=0, world_size=1, gene_vocab=model.gene_vocab,
                          label_vocabs=model.label_vocabs, atlas_uri=atlas_uri, value_filter=value_filter,
                          seed=seed, shuffle=True, batch_size=batch_size, num_workers=0)
    batches, n = [], 0
    for batch in loader:
        keep = ~batch["is_padding"]
        batch = {k: v[keep] for k, v in batch.items()}
        if n + len(batch["library_size"]) > max_cells:
            batch = {k: v[: max_cells - n] for k, v in batch.items()}
        batches.append(batch)
        n += len(batch["library_size"])
        if n >= max_cells:
            break
    if n == 0:
        raise ValueError(f"no cells match {value_filter!r} in {atlas_uri}")
    return RealCells(batches, torch.cat([b["labels"] for b in batches]).numpy(),
                     torch.cat([b["library_size"] for b in batches]).double().numpy())


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def real_cellset(model: Stage2Model, cells: RealCells, hvg_idx: np.ndarray, conditions: np.ndarray) -> P.CellSet:
    hvg = [model.vae.dense_targets(b["gene_ids"], b["counts"], b["mask"])[:, hvg_idx].numpy() for b in cells.batches]
    return P.CellSet(np.concatenate(hvg).astype(np.float32), cells.library_size.copy(), conditions)


def dense_counts(model: Stage2Model, cells: RealCells) -> np.ndarray:
    """(N, G) raw counts over the whole vocabulary (for the HVG choice)."""
    return np.concatenate(
        [model.vae.dense_targets(b["gene_ids"], b["counts"], b["mask"]).numpy() for b in cells.batches]
    )


class Sampler:
    """Draws the generated and reference sets of one seed, in the protocol's reduced form."""

    def __init__(self, model: Stage2Model, sampling: SamplingConfig, *, batch_size: int, hvg_idx: np.ndarray,
                 device: torch.device, progress: bool = True) -> None:
        self.model = model
        self.batch_size = batch_size
        self.hvg_idx = torch.as_tensor(hvg_idx)
        self.device = device
        self.progress = progress
        self.kwargs = model.sampling_kwargs(sampling)

    def settings(self) -> dict[str, Any]:
        return {k: v for k, v in self.kwargs.items() if k != "latent_stats"}

    def _reduce(self, counts: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        return counts[:, self.hvg_idx].numpy().astype(np.float32), counts.sum(1).double().numpy()

    def _chunks(self, n: int, desc: str):
        starts = range(0, n, self.batch_size)
        return tqdm(starts, desc=desc, leave=False, disable=not self.progress)

    @torch.no_grad()
    def scldm(self, labels_NK: np.ndarray, conditions: np.ndarray, seed: int) -> P.CellSet:
        """Cells generated with the real cells' labels; library sizes drawn from the manifest statistics."""
        hvg, totals = [], []
        for s in self._chunks(len(labels_NK), f"scLDM seed {seed}"):
            idx = range(s, min(s + self.batch_size, len(labels_NK)))
            labels = torch.as_tensor(labels_NK[s : idx.stop]) if labels_NK.shape[1] else None
            out = generate_cells(self.model.dit, self.model.vae, self.model.library_size_stats, labels, idx,
                                 seed=seed, **self.kwargs)
            h, t = self._reduce(out["counts"])
            hvg.append(h)
            totals.append(t)
        return P.CellSet(np.concatenate(hvg), np.concatenate(totals), conditions)

    def external(self, name: str, source: ExternalSource, labels_NK: np.ndarray, conditions: np.ndarray,
                 seed: int) -> P.CellSet:
        """Another model's cells for these labels, with scLDM's library sizes of this seed."""
        lib = self.library_sizes(labels_NK, range(len(labels_NK)), seed)
        counts = torch.as_tensor(np.asarray(source(labels_NK, lib.numpy(), seed)))
        want = (len(labels_NK), self.model.gene_vocab.num_genes)
        if tuple(counts.shape) != want:
            raise ValueError(f"external source {name!r} returned counts of shape {tuple(counts.shape)}, expected {want} "
                             "(evaluation cells x the model's gene vocabulary)")
        h, t = self._reduce(counts.float())
        return P.CellSet(h, t, conditions)

    @torch.no_grad()
    def decode_and_sample(self, z: torch.Tensor, library_size: torch.Tensor, indices: range,
                          seeds: list[int]) -> tuple[dict[str, torch.Tensor], list[tuple[np.ndarray, np.ndarray]]]:
        """Decode latents once; counts for every seed (cell i of seed s drawn from (s, i))."""
        params = self.model.vae.decode(z.to(self.device), library_size.float().to(self.device))
        params = {k: v.cpu() for k, v in params.items()}
        target_sum = self.model.vae.cfg.gaussian_target_sum
        draws = []
        for seed in seeds:
            gens = [torch.Generator().manual_seed(cell_seed(seed, i) ^ 0x5EED) for i in indices]
            draws.append(self._reduce(sample_counts(params, gens, library_size.float(), target_sum)))
        return params, draws

    @torch.no_grad()
    def encode(self, cells: RealCells) -> torch.Tensor:
        """Posterior means (N, M, L) of real cells."""
        return torch.cat([
            self.model.vae.encode(*(_to(b, self.device)[k] for k in ("gene_ids", "counts", "mask"))).mean.cpu()
            for b in cells.batches
        ])

    def library_sizes(self, labels_NK: np.ndarray, indices: range, seed: int) -> torch.Tensor:
        """The library sizes scLDM draws for these cells (same draws, so the baseline is compared fairly)."""
        _, _, eps = cell_noise(seed, indices, tuple(self.model.vae.latent_shape))
        rows = labels_NK[indices.start : indices.stop] if labels_NK.shape[1] else None
        return self.model.library_size_stats.sample(rows, eps.numpy())


def fit_gaussians(latents_NX: np.ndarray, labels_NK: np.ndarray, min_cells: int = 2) -> dict[Any, tuple]:
    """Full-covariance Gaussian per label row of the training latents (flattened), plus one over all cells
    (key None) for rows seen in fewer than `min_cells` training cells."""
    fits: dict[Any, tuple] = {None: (latents_NX.mean(0), np.cov(latents_NX, rowvar=False))}
    rows, inverse = np.unique(labels_NK, axis=0, return_inverse=True)
    for i, row in enumerate(rows):
        sel = latents_NX[inverse.reshape(-1) == i]
        if len(sel) >= min_cells:
            fits[tuple(row.tolist())] = (sel.mean(0), np.atleast_2d(np.cov(sel, rowvar=False)))
    return fits


def sample_gaussians(fits: dict[Any, tuple], labels_NK: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((len(labels_NK), len(fits[None][0])))
    rows, inverse = np.unique(labels_NK, axis=0, return_inverse=True)
    for i, row in enumerate(rows):
        sel = np.flatnonzero(inverse.reshape(-1) == i)
        mean, cov = fits.get(tuple(row.tolist()), fits[None])
        out[sel] = rng.multivariate_normal(mean, cov, size=len(sel), method="eigh")
    return out


def embeddings(z_NML: torch.Tensor, kind: str) -> np.ndarray:
    return (z_NML.flatten(1) if kind == "flattened" else z_NML.mean(1)).numpy()


def _conditions(model: Stage2Model, labels_NK: np.ndarray, columns: list[str] | None) -> np.ndarray:
    use = model.label_columns if columns is None else columns
    missing = [c for c in use if c not in model.label_columns]
    if missing:
        raise ConfigError(f"protocol.condition_columns: {missing} are not label columns of the model "
                         f"({model.label_columns})")
    cats = {c: v.categories for c, v in model.label_vocabs.items()}
    return P.condition_names(labels_NK, model.label_columns, cats, use)


def _protocol_record(cfg: ProtocolConfig, sampler: Sampler, n_eval: int, n_train: int, n_hvg: int, n_pcs: int,
                     eval_filter: str, train_filter: str | None, model: Stage2Model) -> dict[str, Any]:
    return {
        "eval_filter": eval_filter,
        "train_filter": train_filter,
        "eval_cells": n_eval,
        "train_cells_sampled": n_train,
        "max_cells": cfg.max_cells,
        "seeds": list(cfg.seeds),
        "hvg": {"flavor": "seurat_v3", "n": n_hvg, "chosen_on": "training cells (raw counts)"},
        "normalization": "counts / each cell's total over all vocabulary genes x 1e4, log1p",
        "pca": {"n_components": n_pcs, "fitted_on": "real evaluation cells"},
        "conditions": {"columns": cfg.condition_columns or model.label_columns,
                       "min_cells": cfg.min_cells_per_condition,
                       "averaging": "mean over scored conditions weighted by their real cells"},
        "generated_per_condition": "as many as real evaluation cells (same label rows)",
        "library_sizes": "drawn from the checkpoint manifest's per-condition log-normal statistics",
        "metrics": {"w2": "exact OT (POT emd2), squared Euclidean cost, sqrt",
                    "mmd2_unbiased": "U-statistic, RBF mixture sigma in {0.01, 0.1, 1, 10, 100}",
                    "fd": "Frechet distance of Gaussian fits", "energy": "energy distance (scipy form)",
                    "knn_condition_acc": f"kNN (k={cfg.knn_k}) trained on half of the training cells' PCs"},
        "references": {"real_floor": "training cells with the evaluation cells' label mix (from the half of "
                                     "the training sample the kNN classifier did not see)",
                       "gaussian_baseline": "full-covariance Gaussian per label row on training latents",
                       "stage1_ceiling": "evaluation cells encoded (posterior mean), decoded at their own "
                                         "library size, NB-sampled"},
        "sampling": sampler.settings(),
        "weights": model.weights,
        "embedding": cfg.embedding,
    }


def evaluate(model: Stage2Model, protocol: ProtocolConfig, sampling: SamplingConfig, *, atlas_uri: str | None = None,
             batch_size: int = 256, device: torch.device | str = "cpu", extra_weights: Stage2Model | None = None,
             external: dict[str, ExternalSource] | None = None,
             progress: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the whole protocol.

    `external` adds other models (e.g. scVI in benchmarks/quality_bench.py), scored on the same cells, seeds and
    library sizes as scLDM, under their own names.

    Returns:
        (result JSON, plot data: PCs and condition names of the real cells and of seed 0's samples).
    """
    t0 = time.perf_counter()
    device = torch.device(device)
    atlas = atlas_uri or model.atlas_uri
    seeds = list(protocol.seeds)
    train_filter = protocol.train_value_filter or model.cfg.data.value_filter
    real = read_cells(model, atlas, protocol.eval_filter, max_cells=protocol.max_cells, seed=seeds[0],
                      batch_size=batch_size)
    train = read_cells(model, atlas, train_filter, max_cells=protocol.max_cells, seed=seeds[0] + 1,
                       batch_size=batch_size)
    real, dropped = known_labels(real, repr(protocol.eval_filter))
    logger.info("evaluation: %d cells of %r, %d training cells of %r", len(real), protocol.eval_filter,
                len(train), train_filter)
    hvg_idx = P.choose_hvgs(dense_counts(model, train), protocol.num_hvg)
    real_cond = _conditions(model, real.labels, protocol.condition_columns)
    train_cond = _conditions(model, train.labels, protocol.condition_columns)
    real_set = real_cellset(model, real, hvg_idx, real_cond)
    train_set = real_cellset(model, train, hvg_idx, train_cond)
    space = P.fit_space(hvg_idx, real_set, protocol.num_pcs)
    knn_cells, floor_pool = P.halves(train_set)
    scorer = P.Scorer(space, real_set, knn_cells, min_cells=protocol.min_cells_per_condition, knn_k=protocol.knn_k)
    sampler = Sampler(model, sampling, batch_size=batch_size, hvg_idx=hvg_idx, device=device, progress=progress)

    samples: dict[str, list[P.CellSet]] = {s: [] for s in SOURCES}
    if model.dit is None:  # a stage-1 checkpoint: the autoencoder's ceiling, reconstruction and baselines
        samples.pop("scldm")
    else:
        samples["scldm"] = [sampler.scldm(real.labels, real_cond, s) for s in seeds]
    if extra_weights is not None:
        other = Sampler(extra_weights, sampling, batch_size=batch_size, hvg_idx=hvg_idx, device=device,
                        progress=progress)
        samples[f"scldm_{extra_weights.weights}"] = [other.scldm(real.labels, real_cond, s) for s in seeds]
    for name, source in (external or {}).items():
        samples[name] = [sampler.external(name, source, real.labels, real_cond, s) for s in seeds]
    recon, z_real = _ceiling_and_reconstruction(model, sampler, real, real_set, seeds, samples, hvg_idx)
    if protocol.baselines:
        _gaussian_baseline(sampler, train, real, real_cond, seeds, samples)
        for s in seeds:
            samples["real_floor"].append(P.floor_sample(floor_pool, real_cond, np.random.default_rng(s)))
    else:
        for key in ("gaussian_baseline", "stage1_ceiling", "real_floor"):
            samples.pop(key)
    # One wrong-condition mapping for every seed, so the seeds average the same conditions.
    if "scldm" in samples:
        samples["scldm_shuffled_labels"] = [c.relabel(P.derange(c.conditions, np.random.default_rng(seeds[0])))
                                            for c in samples["scldm"]]
    logger.info("evaluation: samples drawn in %.0f s; scoring", time.perf_counter() - t0)

    result = {
        "generation": _score_all(scorer, samples, progress),
        "knn_condition_acc_real": scorer.knn_on_real(),
        "reconstruction": recon,
        "classification": _classification(model, z_real, real, protocol, seeds[0]),
        "protocol": {**_protocol_record(protocol, sampler, len(real), len(train), len(hvg_idx),
                                        len(space.pca[1]), protocol.eval_filter, train_filter, model),
                     "eval_cells_left_out_unknown_labels": dropped},
        "model": model.describe(),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    result["summary"] = summary(result)
    plot_data = {"real": (scorer.real_pc, real_cond),
                 **{k: (space.pcs(v[0]), v[0].conditions) for k, v in samples.items()
                    if k in ("scldm", "gaussian_baseline", *(external or {}))}}
    return result, plot_data


def _score_all(scorer: P.Scorer, samples: dict[str, list[P.CellSet]], progress: bool) -> dict[str, Any]:
    """Every source's per-seed scores, summarised; the shuffled-label control may have no condition left."""
    generation = {}
    for name, sets in samples.items():
        try:
            generation[name] = P.summarize([scorer.score(c) for c in tqdm(
                sets, desc=f"scoring {name}", leave=False, disable=not progress)])
        except ValueError as exc:
            if name != "scldm_shuffled_labels":
                raise
            # renaming conditions can leave none with enough cells (e.g. one large condition)
            generation[name] = {"skipped": str(exc)}
    return generation


def _ceiling_and_reconstruction(model: Stage2Model, sampler: Sampler, real: RealCells, real_set: P.CellSet,
                                seeds: list[int], samples: dict, hvg_idx: np.ndarray):
    """The stage-1 ceiling's samples (decoded once, drawn per seed) and the reconstruction scores."""
    z = sampler.encode(real)
    per_seed = [([], []) for _ in seeds]
    nll, mu_hvg, mu_tot = [], [], []
    start = 0
    for b in real.batches:
        n = len(b["library_size"])
        params, draws = sampler.decode_and_sample(z[start : start + n], b["library_size"], range(start, start + n),
                                                  seeds)
        for acc, (h, t) in zip(per_seed, draws):
            acc[0].append(h)
            acc[1].append(t)
        x = model.vae.dense_targets(b["gene_ids"], b["counts"], b["mask"])
        nll.append(model.vae.reconstruction_nll(params, x, b["library_size"]).numpy())
        mean = params.get("mu", params.get("mean"))
        mu_hvg.append(mean[:, hvg_idx].numpy())
        mu_tot.append(mean.sum(1).double().numpy())
        start += n
    if "stage1_ceiling" in samples:
        samples["stage1_ceiling"] = [P.CellSet(np.concatenate(h), np.concatenate(t), real_set.conditions)
                                      for h, t in per_seed]
    recon = M.reconstruction_scores(real_set.hvg, np.concatenate(mu_hvg), real_totals=real.library_size,
                                    mu_totals=np.concatenate(mu_tot))
    recon = {"nll": float(np.concatenate(nll).mean()), **{k: recon[k] for k in ("pearson_gene", "pearson_cell", "mse")},
             "n_cells": len(real), "genes": "HVGs, normalised by each cell's total over all genes",
             "nll_genes": "all vocabulary genes (per cell, summed)"}
    return recon, z


def _gaussian_baseline(sampler: Sampler, train: RealCells, real: RealCells, real_cond: np.ndarray,
                       seeds: list[int], samples: dict) -> None:
    z_train = sampler.encode(train)
    shape = z_train.shape[1:]
    fits = fit_gaussians(z_train.flatten(1).double().numpy(), train.labels)
    for seed in seeds:
        z = torch.from_numpy(sample_gaussians(fits, real.labels, seed)).float().reshape(-1, *shape)
        hvg, tot = [], []
        for s in range(0, len(real), sampler.batch_size):
            idx = range(s, min(s + sampler.batch_size, len(real)))
            lib = sampler.library_sizes(real.labels, idx, seed)
            _, ((h, t),) = sampler.decode_and_sample(z[idx.start : idx.stop], lib, idx, [seed])
            hvg.append(h)
            tot.append(t)
        samples["gaussian_baseline"].append(P.CellSet(np.concatenate(hvg), np.concatenate(tot), real_cond))


def _classification(model: Stage2Model, z_real: torch.Tensor, real: RealCells, protocol: ProtocolConfig,
                    seed: int) -> dict[str, Any]:
    emb = embeddings(z_real, protocol.embedding)
    out = {}
    for j, (col, vocab) in enumerate(model.label_vocabs.items()):
        ids = real.labels[:, j]
        if len(np.unique(ids)) < 2:
            out[col] = {"skipped": f"one class in the evaluation cells ({vocab.categories[ids[0] - 1] if ids[0] else '?'})"}
            continue
        out[col] = M.classification_scores(emb, ids.astype(str), folds=protocol.classification_folds, seed=seed)
    return out


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """Headline ratios: each source's per-condition FD / energy / W2 over the real floor's, and kNN accuracy
    relative to its accuracy on real cells."""
    gen = result["generation"]
    out: dict[str, Any] = {}
    floor = gen.get("real_floor")
    for name, scores in gen.items():
        if "skipped" in scores:
            continue
        row = {}
        if floor is not None and name != "real_floor":
            for m in ("w2", "fd", "energy"):
                denom = floor[m]["mean"]
                row[f"{m}_over_floor"] = float(scores[m]["mean"] / denom) if denom > 0 else None
        real_acc = result["knn_condition_acc_real"]
        row["knn_acc_over_real"] = float(scores["knn_condition_acc"]["mean"] / real_acc) if real_acc > 0 else None
        out[name] = row
    return out
