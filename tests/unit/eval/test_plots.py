"""Evaluation plots write real PNGs; the UMAP embedding is (N, 2), finite and fixed by its seed."""

from __future__ import annotations

import numpy as np

from scldm_scale.eval.plots import (
    plot_condition_bars,
    plot_generated_vs_real,
    plot_loss_curves,
    plot_loss_overlay,
    plot_umap,
    umap_embedding,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path, min_bytes=5_000):
    data = path.read_bytes()
    return data[:8] == PNG_MAGIC and len(data) > min_bytes


def test_umap_embedding_is_2d_finite_and_seeded():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(100, 10)), rng.normal(size=(100, 10)) + 4.0])
    a, b = umap_embedding(x, seed=3), umap_embedding(x, seed=3)
    assert a.shape == (200, 2) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    # the two clusters stay apart
    gap = np.linalg.norm(a[:100].mean(0) - a[100:].mean(0))
    assert gap > 3 * max(a[:100].std(0).max(), a[100:].std(0).max())


def test_plot_umap(tmp_path):
    rng = np.random.default_rng(1)
    n = 600
    xy = rng.normal(size=(n, 2)) * 3
    source = rng.choice(["real", "scLDM", "gaussian_baseline"], size=n)
    few = plot_umap(xy, source, rng.choice(["brain10k|Neuron", "brain10k|Astro", "pbmc|T"], size=n),
                    tmp_path / "few.png", title="UMAP")
    many = plot_umap(xy, source, [f"c{i}" for i in rng.integers(0, 40, size=n)], tmp_path / "sub" / "many.png")
    assert _is_png(few) and _is_png(many)


def test_plot_condition_bars(tmp_path):
    rng = np.random.default_rng(2)
    metrics = ("w2", "mmd2_unbiased", "fd", "energy")
    conditions = [f"c{i}" for i in range(8)]
    per = {src: {c: {m: {"mean": float(rng.uniform(0.1, 2)), "std": float(rng.uniform(0, 0.2))} for m in metrics}
                 for c in conditions}
           for src in ("scldm", "gaussian_baseline", "stage1_ceiling")}
    per["real_floor"] = {c: {m: float(rng.uniform(0, 0.1)) for m in metrics} for c in conditions[:-1]}  # c7 missing
    path = plot_condition_bars(per, tmp_path / "bars.png", title="per condition")
    assert _is_png(path)


def test_loss_plots(tmp_path):
    steps = range(0, 500, 10)
    curves = {"fsdp": [(s, 2.0 * np.exp(-s / 200) + 0.5) for s in steps],
              "zero2": [(s, 2.1 * np.exp(-s / 180) + 0.5) for s in steps], "empty": []}
    assert _is_png(plot_loss_overlay(curves, tmp_path / "overlay.png", title="engines"))
    assert _is_png(plot_loss_curves({"train/loss": curves["fsdp"], "train/nll": curves["zero2"]},
                                    tmp_path / "loss.png"))
    rng = np.random.default_rng(3)
    assert _is_png(plot_generated_vs_real(rng.normal(size=(200, 2)), rng.normal(size=(200, 2)) + 1,
                                          tmp_path / "gen.png", scores={"w2": 1.0, "floor_w2": 0.2}))
