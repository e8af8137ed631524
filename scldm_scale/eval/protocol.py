"""The scoring protocol (docs/evaluation.md): one gene space, one PC space, per-condition metrics, seeds.

1. HVGs (seurat_v3, raw counts) are chosen on training cells.
2. A cell's HVG counts are divided by its total over *all* genes, times 1e4, then log1p.
3. 30 PCs are fitted on the real evaluation cells; every other set is projected onto them.
4. Per condition (a combination of label values): W2, unbiased MMD^2, FD and energy distance between the
   real evaluation cells and a sample with the same number of cells of that condition; averaged over the
   conditions with at least `min_cells_per_condition` real cells, weighted by their cells. Pooled over all
   cells as well. Conditional fidelity: a kNN classifier trained on training cells predicts each sample
   cell's condition.

Arrays only (numpy); the model-side sources of samples are in `eval/evaluate.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from scldm_scale.eval import metrics as M

TARGET_SUM = 1e4
"""Counts per cell after normalisation (before log1p)."""
NULL_VALUE = "?"
"""Condition value shown for a label id 0 (unknown / not in the training vocabulary)."""


@dataclass
class CellSet:
    """Cells reduced to what the protocol reads: HVG counts, totals over all genes and condition names."""

    hvg: np.ndarray
    """(N, H) counts of the highly variable genes."""
    totals: np.ndarray
    """(N,) total counts over all genes."""
    conditions: np.ndarray
    """(N,) condition names (str)."""

    def __len__(self) -> int:
        return len(self.totals)

    def take(self, idx: np.ndarray) -> CellSet:
        return CellSet(self.hvg[idx], self.totals[idx], self.conditions[idx])

    def relabel(self, conditions: np.ndarray) -> CellSet:
        return CellSet(self.hvg, self.totals, conditions)


def log_normalize(cells: CellSet, target_sum: float = TARGET_SUM) -> np.ndarray:
    """log1p(target_sum * HVG counts / total over all genes); empty cells stay 0."""
    totals = np.where(cells.totals > 0, cells.totals, 1.0).astype(np.float64)
    return np.log1p(target_sum * cells.hvg.astype(np.float64) / totals[:, None])


def condition_names(labels_NK: np.ndarray, columns: list[str], categories: dict[str, list[str]],
                    use: list[str]) -> np.ndarray:
    """`col=value|col=value` per cell over the columns `use` (label id 0 shows as `?`); "all" when none."""
    if not use:
        return np.full(len(labels_NK), "all", dtype=object)
    parts = []
    for col in use:
        j = columns.index(col)
        names = np.array([NULL_VALUE, *categories[col]], dtype=object)
        parts.append(np.char.add(f"{col}=", names[labels_NK[:, j]].astype(str)))
    out = parts[0]
    for part in parts[1:]:
        out = np.char.add(np.char.add(out, "|"), part)
    return out.astype(object)


@dataclass
class Space:
    """The fitted gene and PC space every set is scored in."""

    hvg_idx: np.ndarray
    """0-based vocabulary indices of the HVGs (token id - 1)."""
    pca: tuple[np.ndarray, np.ndarray]
    """(mean, components) fitted on the evaluation cells."""

    def pcs(self, cells: CellSet) -> np.ndarray:
        return M.project(log_normalize(cells), self.pca)


def choose_hvgs(train_counts_NG: np.ndarray, num_hvg: int) -> np.ndarray:
    """seurat_v3 HVG indices on raw training counts (all genes when the vocabulary is smaller)."""
    if train_counts_NG.shape[1] <= num_hvg:
        return np.arange(train_counts_NG.shape[1])
    return M.highly_variable_genes(train_counts_NG, num_hvg)


def fit_space(hvg_idx: np.ndarray, eval_cells: CellSet, num_pcs: int) -> Space:
    n = int(min(num_pcs, len(eval_cells) - 1, len(hvg_idx)))
    return Space(hvg_idx, M.fit_pca(log_normalize(eval_cells), n))


def halves(cells: CellSet) -> tuple[CellSet, CellSet]:
    """Two disjoint halves of a (shuffled) training sample: one trains the kNN condition classifier, the other
    is the real floor's pool, so the floor's kNN accuracy is not inflated by cells the classifier saw."""
    idx = np.arange(len(cells))
    return cells.take(idx[0::2]), cells.take(idx[1::2])


def floor_sample(train: CellSet, eval_conditions: np.ndarray, rng: np.random.Generator) -> CellSet:
    """Training cells with the evaluation cells' label mix: n_c cells of each condition c, drawn without
    replacement (with replacement only where the training cells of c are fewer than n_c)."""
    picks = []
    for cond in np.unique(eval_conditions):
        need = int((eval_conditions == cond).sum())
        pool = np.flatnonzero(train.conditions == cond)
        if len(pool) == 0:
            continue
        picks.append(rng.choice(pool, size=need, replace=len(pool) < need))
    return train.take(np.concatenate(picks) if picks else np.zeros(0, dtype=np.int64))


def derange(conditions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each condition renamed to another one (a random cyclic shift of the condition list), so every cell
    carries a wrong condition; used to show that the scores see conditioning."""
    names = np.unique(conditions)
    if len(names) < 2:
        return conditions.copy()
    order = rng.permutation(len(names))
    mapping = {names[order[i]]: names[order[(i + 1) % len(names)]] for i in range(len(names))}
    return np.array([mapping[c] for c in conditions], dtype=object)


class Scorer:
    """Scores samples against the real evaluation cells in one fitted space."""

    def __init__(self, space: Space, real: CellSet, train: CellSet, *, min_cells: int, knn_k: int) -> None:
        self.space = space
        self.real = real
        self.real_pc = space.pcs(real)
        self.train = train
        self.train_pc = space.pcs(train)
        self.min_cells = min_cells
        self.knn_k = knn_k

    def knn_on_real(self) -> float:
        """Accuracy of the condition classifier on the real evaluation cells (its ceiling)."""
        return M.knn_condition_accuracy(self.train_pc, self.train.conditions, self.real_pc,
                                        self.real.conditions, k=self.knn_k)

    def score(self, sample: CellSet) -> dict[str, Any]:
        """Per-condition and pooled distances to the real cells, and the kNN condition accuracy."""
        pc = self.space.pcs(sample)
        per = M.condition_scores(self.real_pc, pc, self.real.conditions, sample.conditions,
                                 min_cells=self.min_cells)
        pooled = M.distribution_scores(self.real_pc, pc)
        knn = M.knn_condition_accuracy(self.train_pc, self.train.conditions, pc, sample.conditions, k=self.knn_k)
        return {**per["weighted"], "knn_condition_acc": knn, "pooled": pooled,
                "per_condition": per["per_condition"], "num_conditions": per["num_conditions"]}


def summarize(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and std over seeds of every metric, keeping the per-condition breakdown."""
    return M.aggregate_seeds(per_seed)


def headline(result: dict[str, Any], source: str, metric: str) -> float:
    """result["generation"][source][metric]["mean"]."""
    return float(result["generation"][source][metric]["mean"])
