"""Per-label library-size statistics: computed from the training cells for every checkpoint manifest, read
back by generation to draw library sizes per condition (one type, `LibrarySizeStats`, both ways).

The statistics come from one streaming pass over the filtered cells through the loader itself (so the library
size is the same sum over vocabulary genes the model sees). Rank-agnostic: call it on one process.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from scldm_scale.config.data import SomaDataConfig
from scldm_scale.data.loader import _FROM_CONFIG, SomaLoader, build_loader
from scldm_scale.data.vocab import GeneVocab, LabelVocab

SAMPLE_CHUNK_CELLS = 16
"""Contiguous cells per sampled run of the library-size sample (short runs: many datasets, still fast reads)."""
SAMPLE_BUDGET_MB = 128
"""`data.memory_budget_mb` of the sample pass (at most; TileDB then holds at most 64 MiB per query). The sample's
runs are spread over the whole atlas, so one read of them touches as many X tiles as the budget lets TileDB
hold: at the training budget (1,024 MiB: 128 MiB per query) rank 0's peak grew by up to ~90 MB from a 10^5- to
a 10^6-cell atlas (benchmarks/README.md, scale section)."""
MIN_GROUP_CELLS = 2
"""A label combination seen in fewer training cells than this has no statistics of its own."""


@dataclass(frozen=True)
class LogNormalFit:
    """n cells, mean and std of their natural-log library sizes."""

    n: int
    mean_log: float
    std_log: float

    def to_dict(self) -> dict[str, float]:
        return {"n": int(self.n), "mean_log": float(self.mean_log), "std_log": float(self.std_log)}


def _pool(fits: list[LogNormalFit]) -> LogNormalFit:
    """The moments of the union of several groups (weighted by their cells)."""
    n = sum(f.n for f in fits)
    mean = sum(f.n * f.mean_log for f in fits) / n
    second = sum(f.n * (f.std_log**2 + f.mean_log**2) for f in fits) / n
    return LogNormalFit(n, mean, float(np.sqrt(max(second - mean**2, 0.0))))


@dataclass
class LibrarySizeStats:
    """Log-normal library-size fits: one per label-id combination (`groups`) and one over all cells.

    A condition is a row of label ids (K,), 0 meaning "any value" in that column. A fully given row seen in
    at least `MIN_GROUP_CELLS` training cells uses its own fit; otherwise the groups that agree with the row on
    its given columns are pooled; a row that matches nothing (or K = 0, or no labels) uses `overall`.
    """

    label_columns: list[str]
    """Columns of the label rows, in the batches' order."""
    overall: LogNormalFit
    """Fit over every cell."""
    groups: dict[tuple[int, ...], LogNormalFit] = field(default_factory=dict)
    """Fit per label-id combination."""

    @classmethod
    def fit(cls, library_size, labels=None, label_columns: list[str] | None = None) -> LibrarySizeStats:
        """Fit from library sizes (N,) and label ids (N, K) (tensors or arrays); zeros are left out."""
        lib = np.asarray(library_size, dtype=np.float64).reshape(-1)
        keep = lib > 0
        labels = np.zeros((len(lib), 0), np.int64) if labels is None else np.asarray(labels, np.int64)
        labels = labels.reshape(len(lib), -1)[keep]
        logs = np.log(lib[keep])
        acc = _Accumulator()
        acc.add(logs, labels)
        return acc.result(label_columns or [f"label_{j}" for j in range(labels.shape[1])])

    @classmethod
    def from_manifest(cls, stats: dict[str, Any], *, source: str = "manifest") -> LibrarySizeStats:
        """Read the `library_size_stats` entry of a checkpoint manifest (the format of `to_dict`).

        Raises:
            ValueError: naming `source` and the missing or malformed key.
        """
        try:
            columns = [str(c) for c in stats["label_columns"]]
            overall = LogNormalFit(**stats["overall"])
            groups = {
                tuple(int(v) for v in key.split(",")) if key else (): LogNormalFit(**fit)
                for key, fit in stats["groups"].items()
            }
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"{source}: library_size_stats is malformed ({type(exc).__name__}: {exc}); expected "
                "{label_columns, overall: {n, mean_log, std_log}, groups: {'<id>,<id>': {...}}}"
            ) from None
        if any(len(k) != len(columns) for k in groups):
            raise ValueError(f"{source}: library_size_stats groups do not have {len(columns)} label ids each")
        return cls(columns, overall, groups)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form stored in manifests."""
        return {
            "label_columns": list(self.label_columns),
            "overall": self.overall.to_dict(),
            "groups": {",".join(map(str, k)): v.to_dict() for k, v in sorted(self.groups.items())},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def fit_for(self, row: tuple[int, ...]) -> LogNormalFit:
        """The fit used for one condition row (0 = any value)."""
        row = tuple(int(v) for v in row)
        own = self.groups.get(row)
        if own is not None and own.n >= MIN_GROUP_CELLS:
            return own
        matching = [
            fit
            for key, fit in self.groups.items()
            if fit.n > 0 and all(r == 0 or r == k for r, k in zip(row, key))
        ]
        return _pool(matching) if matching and any(row) else self.overall

    def params(
        self, labels_BK: torch.Tensor | np.ndarray | None, batch: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) of the log library size per row, (B,) float64 each."""
        if labels_BK is None or np.asarray(labels_BK).shape[-1] == 0:
            return np.full(batch, self.overall.mean_log), np.full(batch, self.overall.std_log)
        rows = np.asarray(labels_BK, dtype=np.int64)
        uniq, inverse = np.unique(rows, axis=0, return_inverse=True)
        fits = [self.fit_for(tuple(r)) for r in uniq.tolist()]
        inverse = inverse.reshape(-1)
        return (np.array([f.mean_log for f in fits])[inverse], np.array([f.std_log for f in fits])[inverse])

    def sample(self, labels_BK, eps_B: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Library sizes exp(mean_c + std_c * eps) per row from standard-normal draws `eps_B`, (B,) float32."""
        eps = np.asarray(eps_B, dtype=np.float64).reshape(-1)
        mean, std = self.params(labels_BK, len(eps))
        return torch.from_numpy(np.exp(mean + std * eps)).float()


class _Accumulator:
    """Running (n, sum log, sum log^2) per label-id combination."""

    def __init__(self) -> None:
        self.sums: dict[tuple[int, ...], np.ndarray] = {}

    def add(self, logs: np.ndarray, labels: np.ndarray) -> None:
        if len(logs) == 0:
            return
        keys, inverse = np.unique(labels, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        n = np.bincount(inverse, minlength=len(keys))
        s1 = np.bincount(inverse, weights=logs, minlength=len(keys))
        s2 = np.bincount(inverse, weights=logs**2, minlength=len(keys))
        for i, key in enumerate(map(tuple, keys.tolist())):
            self.sums[key] = self.sums.get(key, np.zeros(3)) + (n[i], s1[i], s2[i])

    def result(self, label_columns: list[str]) -> LibrarySizeStats:
        def summary(v: np.ndarray) -> LogNormalFit:
            n = max(v[0], 1.0)
            mean = v[1] / n
            return LogNormalFit(int(v[0]), float(mean), float(np.sqrt(max(v[2] / n - mean**2, 0.0))))

        total = sum(self.sums.values(), np.zeros(3))
        return LibrarySizeStats(
            list(label_columns), summary(total), {k: summary(v) for k, v in sorted(self.sums.items())}
        )


def library_size_stats(
    cfg: SomaDataConfig,
    *,
    gene_vocab: GeneVocab | None = None,
    label_vocabs: dict[str, LabelVocab] | None = None,
    atlas_uri: str | None = None,
    value_filter: str | None = _FROM_CONFIG,
    batch_size: int = 4096,
    max_cells: int | None = None,
    seed: int = 0,
    from_loader: SomaLoader | None = None,
) -> dict[str, Any]:
    """`LibrarySizeStats` of the filtered cells, as the JSON-able dict that manifests store (`to_dict`).

    With `max_cells`, the statistics come from the first `max_cells` cells of a seeded shuffled pass in chunks
    of `SAMPLE_CHUNK_CELLS` (a sample of thousands of runs spread over every dataset of the atlas, where the
    training chunks of 2,048 cells would cover only a few dozen), not from every cell. Cells with library
    size 0 are left out. `from_loader` (the training loader) gives the cells, snapshot and vocabularies
    without opening the atlas again (`SomaLoader.derive`; `gene_vocab`, `label_vocabs`, `atlas_uri` and
    `value_filter` are then its own).
    """
    sample = max_cells is not None
    if from_loader is not None:  # same cells, snapshot and vocabularies: the atlas is not opened again
        loader = from_loader.derive(
            shuffle=sample,
            chunk_cells=SAMPLE_CHUNK_CELLS if sample else None,
            buffer_cells=max(SAMPLE_CHUNK_CELLS, max_cells) if sample else None,
            batch_size=batch_size,
            num_workers=0,
            rank=0,
            world_size=1,
            seed=(cfg.seed if cfg.seed is not None else seed) if sample else 0,
            memory_budget_mb=min(from_loader.dataset.spec.memory_budget_mb, SAMPLE_BUDGET_MB) if sample else None,
        )
    else:
        if sample:
            cfg = replace(
                cfg,
                shuffle_chunk_cells=SAMPLE_CHUNK_CELLS,
                shuffle_buffer_cells=max(SAMPLE_CHUNK_CELLS, max_cells),
                memory_budget_mb=min(cfg.memory_budget_mb, SAMPLE_BUDGET_MB),
            )
        loader = build_loader(
            cfg,
            rank=0,
            world_size=1,
            gene_vocab=gene_vocab,
            label_vocabs=label_vocabs,
            atlas_uri=atlas_uri,
            value_filter=value_filter,
            seed=seed,
            shuffle=sample,
            batch_size=batch_size,
            num_workers=0,
        )
    acc = _Accumulator()
    seen = 0
    for batch in loader:
        if max_cells is not None and seen >= max_cells:
            break
        seen += len(batch["library_size"])
        keep = ~batch["is_padding"].numpy() & (batch["library_size"].numpy() > 0)
        acc.add(np.log(batch["library_size"].numpy()[keep].astype(np.float64)), batch["labels"].numpy()[keep])
    return acc.result(list(loader.label_vocabs)).to_dict()
