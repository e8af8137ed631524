"""PNG plots written at the end of a run (rank 0): loss curves, and generated vs real cells for stage 2.

Matplotlib with the Agg backend (no display). Callers log the files as MLflow artifacts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
