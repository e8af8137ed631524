"""PNG plots: loss curves and generated vs real cells (end of a training run, rank 0), and the evaluation
protocol's UMAPs of real and generated cells, per-condition score bars and loss overlays of several runs.

Matplotlib with the Agg backend (no display); umap-learn imported on use. Callers log the files as MLflow
artifacts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def plot_loss_curves(history: dict[str, list[tuple[int, float]]], path: str | Path, title: str = "") -> Path:
    """One panel per metric (e.g. `train/loss`, `train/nll`), value against optimizer step.

    Args:
        history: metric name -> [(step, value), ...].
        path: PNG to write.
    """
    plt = _pyplot()
    names = [n for n, points in history.items() if points]
    ncols = min(3, max(1, len(names)))
    nrows = -(-max(1, len(names)) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3 * nrows), squeeze=False)
    for ax in axes.flat[len(names) :]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names):
        steps, values = zip(*history[name])
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, lw=1.2)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_generated_vs_real(
    real_2d: np.ndarray, gen_2d: np.ndarray, path: str | Path, scores: dict[str, float] | None = None
) -> Path:
    """Scatter of real and generated cells on the first two principal components fitted on real cells.

    Args:
        real_2d, gen_2d: (N, >=2) PCA scores of real and generated cells.
        path: PNG to write.
        scores: distribution metrics (W2, MMD^2, FD) printed in the title.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.scatter(real_2d[:, 0], real_2d[:, 1], s=6, alpha=0.5, label=f"real ({len(real_2d)})")
    ax.scatter(gen_2d[:, 0], gen_2d[:, 1], s=6, alpha=0.5, label=f"generated ({len(gen_2d)})")
    ax.set_xlabel("PC1 (fitted on real)")
    ax.set_ylabel("PC2")
    ax.legend(markerscale=3)
    if scores:
        gen = "  ".join(f"{k} {v:.3g}" for k, v in scores.items() if not k.startswith("floor_"))
        floor = "  ".join(f"{k[6:]} {v:.3g}" for k, v in scores.items() if k.startswith("floor_"))
        ax.set_title(gen + (f"\nreal vs real floor: {floor}" if floor else ""), fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def umap_embedding(x: np.ndarray, seed: int = 0, n_neighbors: int = 15) -> np.ndarray:
    """(N, 2) UMAP of x (N, F) with umap-learn, deterministic for a seed (single-threaded then).

    Args:
        x: cells x features, e.g. PCA scores of real and generated cells together.
        seed: `random_state` of `umap.UMAP`.
        n_neighbors: capped at N - 1.
    """
    import umap

    x = np.asarray(x, np.float64)
    if len(x) < 3:
        raise ValueError(f"UMAP needs >= 3 cells, got {len(x)}")
    model = umap.UMAP(n_components=2, random_state=seed, n_neighbors=min(n_neighbors, len(x) - 1), n_jobs=1)
    return np.asarray(model.fit_transform(x), np.float64)


def _colours(plt, categories: Sequence[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10" if len(categories) <= 10 else "tab20")
    if len(categories) <= cmap.N:
        return {c: cmap(i) for i, c in enumerate(categories)}
    hsv = plt.get_cmap("hsv")
    return {c: hsv(i / len(categories)) for i, c in enumerate(categories)}


def _scatter_by(ax, plt, xy: np.ndarray, groups: np.ndarray, order: np.ndarray, title: str,
                max_legend: int = 20) -> None:
    categories = list(dict.fromkeys(groups.tolist()))
    colours = _colours(plt, categories)
    ax.scatter(xy[order, 0], xy[order, 1], c=[colours[g] for g in groups[order]], s=3, alpha=0.6,
               linewidths=0, rasterized=True)
    if len(categories) <= max_legend:
        handles = [plt.Line2D([], [], ls="", marker="o", ms=5, color=colours[c],
                              label=f"{c} ({int((groups == c).sum())})") for c in categories]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
    ax.set_title(f"{title} ({len(categories)})", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("UMAP1")
    ax.set_ylabel("UMAP2")


def plot_umap(xy: np.ndarray, source: Sequence[str], condition: Sequence[str], path: str | Path,
              title: str = "") -> Path:
    """Two UMAP panels side by side: cells coloured by source ("real", "scLDM", ...) and by condition.

    Points are drawn in one fixed random order, so no group hides another. Legends sit outside the axes,
    with cell counts; the condition panel has none beyond 20 conditions.

    Args:
        xy: (N, 2) embedding, e.g. from `umap_embedding`.
        source, condition: (N,) labels of each cell (any strings).
        path: PNG to write.
    """
    plt = _pyplot()
    xy = np.asarray(xy)
    source, condition = np.asarray(source).astype(str), np.asarray(condition).astype(str)
    if not len(xy) == len(source) == len(condition):
        raise ValueError(f"xy, source, condition differ in length: {len(xy)}, {len(source)}, {len(condition)}")
    order = np.random.default_rng(0).permutation(len(xy))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    _scatter_by(axes[0], plt, xy, source, order, "source")
    _scatter_by(axes[1], plt, xy, condition, order, "condition")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def _mean_err(value: float | dict[str, float] | None) -> tuple[float, float]:
    if value is None:
        return float("nan"), 0.0
    if isinstance(value, dict):
        return float(value["mean"]), float(value.get("std", 0.0))
    return float(value), 0.0


def plot_condition_bars(per_condition: dict[str, dict[str, dict[str, float | dict[str, float]]]],
                        path: str | Path, metrics: Sequence[str] = ("w2", "mmd2_unbiased", "fd", "energy"),
                        title: str = "") -> Path:
    """Grouped bars of per-condition scores: one panel per metric, a group per condition, a bar per source.

    Args:
        per_condition: source (e.g. "scldm", "gaussian_baseline", "stage1_ceiling", "real_floor") ->
            condition -> metric -> float, or {"mean", "std"} (drawn with an error bar). Missing values
            (skipped conditions) leave a gap.
        path: PNG to write.
        metrics: the metrics to draw, one panel each, top to bottom.
    """
    plt = _pyplot()
    sources = list(per_condition)
    conditions = list(dict.fromkeys(c for src in per_condition.values() for c in src))
    x, width = np.arange(len(conditions)), 0.8 / max(1, len(sources))
    colours = _colours(plt, sources)
    fig, axes = plt.subplots(len(metrics), 1, figsize=(max(6.0, 0.25 * len(conditions) * len(sources) + 2),
                                                       2.6 * len(metrics)), squeeze=False, sharex=True)
    for ax, metric in zip(axes[:, 0], metrics):
        for i, src in enumerate(sources):
            vals = [_mean_err(per_condition[src].get(c, {}).get(metric)) for c in conditions]
            means, errs = np.array([v[0] for v in vals]), np.array([v[1] for v in vals])
            ax.bar(x + (i - (len(sources) - 1) / 2) * width, means, width, yerr=errs if errs.any() else None,
                   color=colours[src], label=src, capsize=2, error_kw={"lw": 0.8})
        ax.set_ylabel(metric)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    tilt = len(conditions) > 6
    axes[-1, 0].set_xticks(x, conditions, rotation=60 if tilt else 0, ha="right" if tilt else "center",
                           fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_loss_overlay(curves: dict[str, list[tuple[int, float]]], path: str | Path, title: str = "",
                      ylabel: str = "train/loss") -> Path:
    """One line per run (value against optimizer step) on shared axes, to compare runs.

    Args:
        curves: run name -> [(step, value), ...]; empty runs are left out.
        path: PNG to write.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, points in curves.items():
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, ms=3, lw=1.2, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)
