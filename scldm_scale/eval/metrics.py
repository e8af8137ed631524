"""Distribution metrics between real and generated cells (REFERENCE.md section 8, CFGen protocol):
HVGs chosen on real cells -> normalise to 1e4 -> log1p -> PCA (30) fitted on real cells, generated cells
projected; then W2 by exact OT, MMD^2 with a mixture of RBF kernels, Frechet distance; per condition, averaged.

numpy / scipy / POT on dense arrays of cells x features; torch-free.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from scipy import linalg

logger = logging.getLogger(__name__)

RBF_SIGMAS = (0.01, 0.1, 1.0, 10.0, 100.0)


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


def highly_variable_genes(counts: np.ndarray, n_top: int = 2000) -> np.ndarray:
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


def fit_pca(x: np.ndarray, n_components: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """(mean (F,), components (C, F)) of x (N, F) by SVD."""
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    return mean, vt[: min(n_components, vt.shape[0])]


def project(x: np.ndarray, pca: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Scores of x on fitted components."""
    mean, components = pca
    return (x - mean) @ components.T


def preprocess(real_counts: np.ndarray, gen_counts: np.ndarray, n_hvg: int = 2000,
               n_components: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """HVG on real -> log1p-CP10k -> PCA fitted on real; returns (real, generated) in PCA space."""
    hvg = highly_variable_genes(real_counts, n_hvg)
    real = log1p_normalize(np.asarray(real_counts)[:, hvg])
    gen = log1p_normalize(np.asarray(gen_counts)[:, hvg])
    pca = fit_pca(real, n_components)
    return project(real, pca), project(gen, pca)


def wasserstein2(x: np.ndarray, y: np.ndarray) -> float:
    """W2 by exact OT (ot.emd2) with uniform weights and squared Euclidean cost; sqrt of the cost."""
    import ot

    cost = ot.dist(np.asarray(x, np.float64), np.asarray(y, np.float64), metric="sqeuclidean")
    a, b = np.full(len(x), 1.0 / len(x)), np.full(len(y), 1.0 / len(y))
    return float(np.sqrt(max(ot.emd2(a, b, cost, numItermax=1_000_000), 0.0)))


def mmd2_rbf(x: np.ndarray, y: np.ndarray, sigmas: Sequence[float] = RBF_SIGMAS) -> float:
    """Biased MMD^2 with the kernel sum_s exp(-|a - b|^2 / (2 s^2)) (CFGen / conditional-flow-matching)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)

    def sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T, 0.0)

    def kernel(d2: np.ndarray) -> np.ndarray:
        return sum(np.exp(-d2 / (2 * s * s)) for s in sigmas)

    return float(kernel(sqdist(x, x)).mean() + kernel(sqdist(y, y)).mean() - 2 * kernel(sqdist(x, y)).mean())


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """|mu_x - mu_y|^2 + Tr(S_x + S_y - 2 (S_x S_y)^(1/2)) of the Gaussian fits."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    mu_x, mu_y = x.mean(0), y.mean(0)
    s_x, s_y = np.atleast_2d(np.cov(x, rowvar=False)), np.atleast_2d(np.cov(y, rowvar=False))
    covmean = linalg.sqrtm(s_x @ s_y)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(((mu_x - mu_y) ** 2).sum() + np.trace(s_x + s_y - 2 * covmean))


def distribution_metrics(real: np.ndarray, gen: np.ndarray) -> dict[str, float]:
    """W2, MMD^2 RBF (on min(n_real, n_gen) cells each) and FD between two point clouds."""
    n = min(len(real), len(gen))
    return {"w2": wasserstein2(real, gen), "mmd2_rbf": mmd2_rbf(real[:n], gen[:n]),
            "fd": frechet_distance(real, gen)}


def per_condition_metrics(real: np.ndarray, gen: np.ndarray, real_conditions: np.ndarray,
                          gen_conditions: np.ndarray, min_cells: int = 2) -> dict[str, float]:
    """Metrics per condition present in both sets (at least `min_cells` each), then averaged."""
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
