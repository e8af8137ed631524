"""Evaluation metrics of generated and reconstructed cells, numpy / scipy / POT / scikit-learn on dense
float arrays (cells x features); torch-free and deterministic.

Generation is scored as in CFGen (Palma et al., theislab/CFGen) and the scLDM paper (arXiv 2511.02986):
HVGs chosen on real cells -> normalise to 1e4 -> log1p -> PCA (30) fitted on real cells, generated cells
projected; then, per condition, W2 by exact OT, unbiased MMD^2 with a mixture of RBF kernels, Frechet
distance and energy distance, averaged over conditions weighted by their real cell counts. Also: kNN
condition accuracy, reconstruction correlations, linear / kNN probes of embeddings, mean +- std over seeds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np
from scipy.spatial.distance import cdist

from scldm_scale.config.eval import DEFAULT_MIN_CELLS_PER_CONDITION, DEFAULT_NUM_HVG, DEFAULT_NUM_PCS

logger = logging.getLogger(__name__)

RBF_SIGMAS = (0.01, 0.1, 1.0, 10.0, 100.0)
METRICS = ("w2", "mmd2_unbiased", "fd", "energy")

_BLOCK_ENTRIES = 4_000_000  # pairwise distances held at once (32 MB of float64)


def log1p_normalize(counts: np.ndarray, target_sum: float = 1e4) -> np.ndarray:
    """log1p(target_sum * x / row sum); empty cells stay zero."""
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(1, keepdims=True)
    return np.log1p(target_sum * counts / np.where(totals > 0, totals, 1.0))


def _mean_variance_trend(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Fitted log10 variance: seurat_v3's loess (span 0.3, degree 2). On few cells many genes share a mean and
    the loess can be singular (scanpy then fails); wider spans are tried, then a quadratic, with a warning."""
    from skmisc.loess import loess

    for span in (0.3, 0.5, 0.8):
        try:
            model = loess(x, y, span=span, degree=2)
            model.fit()
        except ValueError as exc:
            logger.warning("HVG loess with span %.1f failed (%s); trying a wider span", span, exc)
            continue
        return np.asarray(model.outputs.fitted_values)
    logger.warning("HVG loess failed at every span: a quadratic mean-variance trend stands in")
    return np.polyval(np.polyfit(x, y, deg=2), x)


def highly_variable_genes(counts: np.ndarray, n_top: int = DEFAULT_NUM_HVG) -> np.ndarray:
    """Indices (sorted) of the `n_top` most variable genes by seurat_v3 on raw counts (Stuart et al. 2019), as
    scanpy's `highly_variable_genes(flavor="seurat_v3")` computes it for one batch.

    A loess (span 0.3, degree 2; scikit-misc, as scanpy) of log10 variance on log10 mean gives each gene's
    expected std; counts are clipped at mean + std * sqrt(N); genes rank by the variance of the standardised,
    clipped counts around the mean. Constant genes rank last.
    """
    counts = np.asarray(counts, dtype=np.float64)
    n = counts.shape[0]
    mean, var = counts.mean(0), counts.var(0, ddof=1)
    ok = var > 0
    if ok.sum() < 10:
        raise ValueError(f"seurat_v3 HVG selection needs >= 10 non-constant genes, got {int(ok.sum())}")
    fitted = np.zeros_like(mean)
    fitted[ok] = _mean_variance_trend(np.log10(mean[ok]), np.log10(var[ok]))
    reg_std = np.sqrt(10**fitted)
    clipped = np.minimum(counts, mean + reg_std * np.sqrt(n))
    norm_var = ((clipped - mean) ** 2).sum(0) / ((n - 1) * reg_std**2)
    score = np.where(ok, norm_var, -np.inf)
    return np.sort(np.argsort(-score, kind="stable")[: min(n_top, counts.shape[1])])


def fit_pca(x: np.ndarray, n_components: int = DEFAULT_NUM_PCS) -> tuple[np.ndarray, np.ndarray]:
    """(mean (F,), components (C, F)) of x (N, F) by SVD."""
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    return mean, vt[: min(n_components, vt.shape[0])]


def project(x: np.ndarray, pca: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Scores of x on fitted components."""
    mean, components = pca
    return (x - mean) @ components.T


def preprocess(real_counts: np.ndarray, gen_counts: np.ndarray, n_hvg: int = DEFAULT_NUM_HVG,
               n_components: int = DEFAULT_NUM_PCS) -> tuple[np.ndarray, np.ndarray]:
    """HVG on real -> log1p-CP10k -> PCA fitted on real; returns (real, generated) in PCA space."""
    hvg = highly_variable_genes(real_counts, n_hvg)
    real = log1p_normalize(np.asarray(real_counts)[:, hvg])
    gen = log1p_normalize(np.asarray(gen_counts)[:, hvg])
    pca = fit_pca(real, n_components)
    return project(real, pca), project(gen, pca)


def _as_2d(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x[:, None] if x.ndim == 1 else x


def _pair_sum(a: np.ndarray, b: np.ndarray, block_sum: Callable[[np.ndarray], float], squared: bool,
              exclude_diag: bool = False) -> float:
    """Sum over blocks of rows of `a` of block_sum(D), D the Euclidean distances to `b` (squared: by the BLAS
    expansion |a|^2 + |b|^2 - 2 a.b, clipped at 0); `exclude_diag` (a is b) sets the i == j entries to inf
    first, so a kernel scores them 0."""
    step = max(1, _BLOCK_ENTRIES // max(1, len(b)))
    b_sq = (b * b).sum(1)
    total = 0.0
    for i0 in range(0, len(a), step):
        blk = a[i0 : i0 + step]
        if squared:
            d = np.maximum((blk * blk).sum(1)[:, None] + b_sq[None] - 2 * blk @ b.T, 0.0)
        else:
            d = cdist(blk, b)
        if exclude_diag:
            rows = np.arange(d.shape[0])
            d[rows, rows + i0] = np.inf
        total += float(block_sum(d))
    return total


def wasserstein2(x: np.ndarray, y: np.ndarray) -> float:
    """W2 by exact OT (ot.emd2) with uniform weights and squared Euclidean cost; sqrt of the cost."""
    import ot

    cost = ot.dist(_as_2d(x), _as_2d(y), metric="sqeuclidean")
    a, b = np.full(len(x), 1.0 / len(x)), np.full(len(y), 1.0 / len(y))
    return float(np.sqrt(max(ot.emd2(a, b, cost, numItermax=1_000_000), 0.0)))


def _rbf_mixture(sigmas: Sequence[float]) -> Callable[[np.ndarray], float]:
    """Sum over a block of squared distances of sum_s exp(-d2 / (2 s^2)), in place (5x faster than naive)."""

    def kernel_sum(d2: np.ndarray) -> float:
        buf, total = np.empty_like(d2), 0.0
        for s in sigmas:
            np.multiply(d2, -1.0 / (2 * s * s), out=buf)
            total += float(np.exp(buf, out=buf).sum())
        return total

    return kernel_sum


def mmd2_rbf(x: np.ndarray, y: np.ndarray, sigmas: Sequence[float] = RBF_SIGMAS) -> float:
    """BIASED (V-statistic) MMD^2 with the kernel sum_s exp(-|a - b|^2 / (2 s^2)), self-pairs included, as in
    CFGen / conditional-flow-matching. Never negative, but positive by O(1/n) even for equal distributions:
    prefer `mmd2_unbiased`."""
    x, y = _as_2d(x), _as_2d(y)
    k = _rbf_mixture(sigmas)
    return (_pair_sum(x, x, k, True) / len(x) ** 2 + _pair_sum(y, y, k, True) / len(y) ** 2
            - 2 * _pair_sum(x, y, k, True) / (len(x) * len(y)))


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, sigmas: Sequence[float] = RBF_SIGMAS) -> float:
    """Unbiased (U-statistic) MMD^2 (Gretton et al. 2012) with the kernel sum_s exp(-|a - b|^2 / (2 s^2)).

    Means over the n(n-1) and m(m-1) pairs of distinct cells within x and within y, and over all n*m cross
    pairs. Its expectation is 0 for equal distributions, so it can be slightly negative; returned as is.

    Raises:
        ValueError: fewer than 2 cells in x or y.
    """
    x, y = _as_2d(x), _as_2d(y)
    n, m = len(x), len(y)
    if n < 2 or m < 2:
        raise ValueError(f"unbiased MMD^2 needs >= 2 cells in each set, got {n} and {m}")
    k = _rbf_mixture(sigmas)
    kxx = _pair_sum(x, x, k, True, exclude_diag=True) / (n * (n - 1))
    kyy = _pair_sum(y, y, k, True, exclude_diag=True) / (m * (m - 1))
    return kxx + kyy - 2 * _pair_sum(x, y, k, True) / (n * m)


def energy_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Energy distance sqrt(2 E|X - Y| - E|X - X'| - E|Y - Y'|) with Euclidean norms and V-statistic means
    (self-pairs included), the form of `scipy.stats.energy_distance`, which it equals in 1-D. The inside is
    clipped at 0."""
    x, y = _as_2d(x), _as_2d(y)
    dxy = _pair_sum(x, y, np.sum, False) / (len(x) * len(y))
    dxx = _pair_sum(x, x, np.sum, False) / len(x) ** 2
    dyy = _pair_sum(y, y, np.sum, False) / len(y) ** 2
    return float(np.sqrt(max(2 * dxy - dxx - dyy, 0.0)))


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """|mu_x - mu_y|^2 + Tr(S_x + S_y - 2 (S_x S_y)^(1/2)) of the Gaussian fits.

    Tr (S_x S_y)^(1/2) is the sum of the square roots of the eigenvalues of the symmetric PSD matrix
    S_x^(1/2) S_y S_x^(1/2) (negative round-off clipped to 0), which stays stable when the covariances are
    singular (fewer cells than features) where `scipy.linalg.sqrtm` warns or goes complex.
    """
    x, y = _as_2d(x), _as_2d(y)
    s_x, s_y = np.atleast_2d(np.cov(x, rowvar=False)), np.atleast_2d(np.cov(y, rowvar=False))
    root = _psd_sqrt(s_x)
    inner = root @ s_y @ root
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum()
    return float(((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(s_x) + np.trace(s_y) - 2 * tr_covmean)


def distribution_metrics(real: np.ndarray, gen: np.ndarray) -> dict[str, float]:
    """W2, biased MMD^2 RBF (on min(n_real, n_gen) cells each) and FD between two point clouds (the stage-2
    run report's scores; the evaluation protocol uses `distribution_scores`)."""
    n = min(len(real), len(gen))
    return {"w2": wasserstein2(real, gen), "mmd2_rbf": mmd2_rbf(real[:n], gen[:n]),
            "fd": frechet_distance(real, gen)}


def per_condition_metrics(real: np.ndarray, gen: np.ndarray, real_conditions: np.ndarray,
                          gen_conditions: np.ndarray, min_cells: int = 2) -> dict[str, float]:
    """`distribution_metrics` per condition present in both sets (at least `min_cells` each), unweighted mean."""
    results = []
    for cond in np.unique(real_conditions):
        r, g = real[real_conditions == cond], gen[gen_conditions == cond]
        if len(r) >= min_cells and len(g) >= min_cells:
            results.append(distribution_metrics(r, g))
    if not results:
        raise ValueError("no condition has at least min_cells real and generated cells")
    out = {k: float(np.mean([r[k] for r in results])) for k in results[0]}
    out["num_conditions"] = float(len(results))
    return out


def distribution_scores(real: np.ndarray, gen: np.ndarray) -> dict[str, float]:
    """The protocol's four scores (`METRICS`) between two point clouds (cells x PCs), all cells used."""
    return {"w2": wasserstein2(real, gen), "mmd2_unbiased": mmd2_unbiased(real, gen),
            "fd": frechet_distance(real, gen), "energy": energy_distance(real, gen)}


def condition_scores(real: np.ndarray, gen: np.ndarray, real_cond: Sequence[Hashable],
                     gen_cond: Sequence[Hashable],
                     min_cells: int = DEFAULT_MIN_CELLS_PER_CONDITION) -> dict[str, Any]:
    """`distribution_scores` per condition of `real_cond`, and their mean weighted by real cell counts.

    Conditions are compared as strings (`str(c)`), so "c3" or "brain10k|Neuron" both work.

    Args:
        real, gen: (N_real, F), (N_gen, F) cells in a shared space (e.g. PCs fitted on real cells).
        real_cond, gen_cond: condition of each real / generated cell.
        min_cells: a condition with fewer real or generated cells is skipped.

    Returns:
        {"per_condition": {cond: {"n_real", "n_gen", "w2", "mmd2_unbiased", "fd", "energy"}, or for a skipped
        condition {"n_real", "n_gen", "skipped": reason}}, "weighted": {metric: mean over scored conditions
        weighted by n_real}, "num_conditions": scored conditions, "cells_scored": real cells in them}.

    Raises:
        ValueError: no condition has `min_cells` real and generated cells (the counts are in the message).
    """
    real_cond, gen_cond = np.asarray(real_cond).astype(str), np.asarray(gen_cond).astype(str)
    if len(real_cond) != len(real) or len(gen_cond) != len(gen):
        raise ValueError(f"condition labels do not match the cells: {len(real_cond)} labels for {len(real)} "
                         f"real cells, {len(gen_cond)} for {len(gen)} generated")
    per: dict[str, dict[str, Any]] = {}
    for cond in np.unique(real_cond):
        r, g = real[real_cond == cond], gen[gen_cond == cond]
        entry: dict[str, Any] = {"n_real": len(r), "n_gen": len(g)}
        if min(len(r), len(g)) >= min_cells:
            entry.update(distribution_scores(r, g))
        else:
            entry["skipped"] = f"fewer than {min_cells} cells (real {len(r)}, generated {len(g)})"
        per[str(cond)] = entry
    scored = {c: e for c, e in per.items() if "skipped" not in e}
    if not scored:
        counts = ", ".join(f"{c}: real {e['n_real']} gen {e['n_gen']}" for c, e in list(per.items())[:20])
        raise ValueError(f"no condition has >= {min_cells} real and generated cells ({counts})")
    weights = np.array([e["n_real"] for e in scored.values()], np.float64)
    weighted = {m: float(np.average([e[m] for e in scored.values()], weights=weights)) for m in METRICS}
    return {"per_condition": per, "weighted": weighted, "num_conditions": len(scored),
            "cells_scored": int(weights.sum())}


def knn_condition_accuracy(train_x: np.ndarray, train_y: Sequence[Hashable], query_x: np.ndarray,
                           query_y: Sequence[Hashable], k: int = 15) -> float:
    """Accuracy of a kNN classifier (k = min(k, len(train))) fitted on (train_x, train_y) at predicting
    query_y from query_x, e.g. trained on real cells and queried with generated ones."""
    from sklearn.neighbors import KNeighborsClassifier

    clf = KNeighborsClassifier(n_neighbors=min(k, len(train_x))).fit(_as_2d(train_x), np.asarray(train_y))
    return float(np.mean(clf.predict(_as_2d(query_x)) == np.asarray(query_y)))


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """{"mean", "std"} of the values, population std (ddof=0; 0 for one value)."""
    if len(values) == 0:
        raise ValueError("mean_std needs at least one value")
    arr = np.asarray(values, np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std())}


def _is_float(v: Any) -> bool:
    return isinstance(v, (float, np.floating))


def aggregate_seeds(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean +- std over seeds of nested dicts with one structure (one dict per seed).

    Every float leaf becomes `mean_std` of its values across seeds; other leaves (ints such as n_real,
    strings, None) are taken from the first seed. Should the structures differ (a condition scored in one
    seed and skipped in another), a key missing from some seeds is aggregated over the seeds that have it
    (float values only), with a warning naming its path.
    """
    if not results:
        raise ValueError("aggregate_seeds needs at least one result")

    def merge(nodes: list[Any], path: str) -> Any:
        if all(isinstance(node, dict) for node in nodes):
            keys = list(dict.fromkeys(k for node in nodes for k in node))
            out = {}
            for k in keys:
                present = [node[k] for node in nodes if k in node]
                sub = f"{path}.{k}" if path else str(k)
                if len(present) < len(nodes):
                    logger.warning("aggregate_seeds: %s is in %d of %d seeds", sub, len(present), len(nodes))
                out[k] = merge(present, sub)
            return out
        if _is_float(nodes[0]):
            return mean_std([float(v) for v in nodes if _is_float(v)])
        return nodes[0]

    return merge(list(results), "")


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r of each row of a with the same row of b; NaN where either row is constant."""
    a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(1) / np.where(den > 0, den, 1.0), np.nan)


def _normalise(x: np.ndarray, totals: np.ndarray | None) -> np.ndarray:
    """log1p(1e4 x / total), the total being the row sum unless given; zero totals leave the row 0."""
    x = np.asarray(x, np.float64)
    totals = x.sum(1) if totals is None else np.asarray(totals, np.float64).reshape(-1)
    if totals.shape != (len(x),):
        raise ValueError(f"{len(totals)} row totals for {len(x)} cells")
    return np.log1p(1e4 * x / np.where(totals > 0, totals, 1.0)[:, None])


def reconstruction_scores(real_counts: np.ndarray, mu: np.ndarray, real_totals: np.ndarray | None = None,
                          mu_totals: np.ndarray | None = None) -> dict[str, float]:
    """Agreement of decoded NB means with the real counts, both normalised as log1p(1e4 x / total).

    Args:
        real_counts: (N, G) raw counts.
        mu: (N, G) decoded NB means of the same cells and genes.
        real_totals, mu_totals: (N,) totals to normalise by, e.g. over all genes when only HVG columns are
            given; by default the row sums of the given genes. Zero totals leave the row 0.

    Returns:
        {"pearson_gene": mean over genes (non-constant in both) of Pearson r across cells, "pearson_cell":
        mean over cells (non-constant in both) of Pearson r across genes, "mse": mean squared error}.
    """
    if np.shape(real_counts) != np.shape(mu):
        raise ValueError(f"real_counts {np.shape(real_counts)} and mu {np.shape(mu)} differ in shape")
    real, rec = _normalise(real_counts, real_totals), _normalise(mu, mu_totals)
    r_gene, r_cell = _pearson_rows(real.T, rec.T), _pearson_rows(real, rec)
    nan = float("nan")
    return {"pearson_gene": float(np.nanmean(r_gene)) if np.isfinite(r_gene).any() else nan,
            "pearson_cell": float(np.nanmean(r_cell)) if np.isfinite(r_cell).any() else nan,
            "mse": float(np.mean((real - rec) ** 2))}


def classification_scores(emb: np.ndarray, labels: Sequence[Hashable], folds: int = 5, seed: int = 0,
                          k: int = 15) -> dict[str, Any]:
    """Linear and kNN probes of an embedding: stratified K-fold out-of-fold predictions of `labels`.

    Classes with fewer than 2 cells are dropped (listed under "dropped_classes" with their counts); folds are
    reduced to the smallest remaining class (at least 2). Features are standardised on each training fold;
    LogisticRegression(max_iter=1000) and KNeighborsClassifier(min(k, train size)) are fitted on it.

    Returns:
        {"logreg_acc", "knn_acc", "macro_f1" (logistic regression), "knn_macro_f1"} over the pooled
        out-of-fold predictions, and "folds", "n_cells", "n_classes", "dropped_classes" ({label: count}).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import StandardScaler

    emb, labels = _as_2d(emb), np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    dropped = {str(c): int(n) for c, n in zip(classes, counts) if n < 2}
    keep = np.isin(labels, classes[counts >= 2])
    emb, labels, counts = emb[keep], labels[keep], counts[counts >= 2]
    if len(counts) < 2:
        raise ValueError(f"classification needs >= 2 classes with >= 2 cells, got {len(counts)} "
                         f"(dropped: {dropped})")
    n_folds = max(2, min(folds, int(counts.min())))
    pred_lr, pred_knn = np.empty_like(labels), np.empty_like(labels)
    for tr, te in StratifiedKFold(n_folds, shuffle=True, random_state=seed).split(emb, labels):
        scaler = StandardScaler().fit(emb[tr])
        x_tr, x_te = scaler.transform(emb[tr]), scaler.transform(emb[te])
        pred_lr[te] = LogisticRegression(max_iter=1000).fit(x_tr, labels[tr]).predict(x_te)
        pred_knn[te] = KNeighborsClassifier(min(k, len(tr))).fit(x_tr, labels[tr]).predict(x_te)
    return {"logreg_acc": float(np.mean(pred_lr == labels)), "knn_acc": float(np.mean(pred_knn == labels)),
            "macro_f1": float(f1_score(labels, pred_lr, average="macro")),
            "knn_macro_f1": float(f1_score(labels, pred_knn, average="macro")),
            "folds": n_folds, "n_cells": len(labels), "n_classes": len(counts), "dropped_classes": dropped}
