"""Per-label library-size statistics (generation samples a library size per label combination).

One sequential streaming pass over the filtered cells through the loader itself (so the library size is the
same sum over vocabulary genes the model sees). Rank-agnostic: call it on one process.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from scldm_scale.config.data import SomaDataConfig
from scldm_scale.data.loader import _FROM_CONFIG, build_loader
from scldm_scale.data.vocab import GeneVocab, LabelVocab


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
) -> dict[str, Any]:
    """Mean / std of log(library size) per label-id combination, JSON-able.

    With `max_cells`, the statistics come from the first `max_cells` cells of a seeded shuffled pass (a sample
    that spans datasets), not from every cell.

    Returns:
        {"label_columns": [...], "overall": {"n", "mean_log", "std_log"},
         "groups": {"<id>,<id>": {"n", "mean_log", "std_log"}, ...}}; ids as in the batches' `labels`.
        Cells with library size 0 are left out of the log statistics.
    """
    loader = build_loader(
        cfg,
        rank=0,
        world_size=1,
        gene_vocab=gene_vocab,
        label_vocabs=label_vocabs,
        atlas_uri=atlas_uri,
        value_filter=value_filter,
        seed=seed,
        shuffle=max_cells is not None,
        batch_size=batch_size,
        num_workers=0,
    )
    sums: dict[tuple[int, ...], np.ndarray] = {}  # key -> (n, sum log, sum log^2)
    seen = 0
    for batch in loader:
        if max_cells is not None and seen >= max_cells:
            break
        seen += len(batch["library_size"])
        keep = ~batch["is_padding"].numpy() & (batch["library_size"].numpy() > 0)
        logs = np.log(batch["library_size"].numpy()[keep].astype(np.float64))
        labels = batch["labels"].numpy()[keep]
        keys, inverse = np.unique(labels, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        n = np.bincount(inverse, minlength=len(keys))
        s1 = np.bincount(inverse, weights=logs, minlength=len(keys))
        s2 = np.bincount(inverse, weights=logs**2, minlength=len(keys))
        for i, key in enumerate(map(tuple, keys.tolist())):
            sums[key] = sums.get(key, np.zeros(3)) + (n[i], s1[i], s2[i])

    def summary(v: np.ndarray) -> dict[str, float]:
        n = max(v[0], 1.0)
        mean = v[1] / n
        return {
            "n": int(v[0]),
            "mean_log": float(mean),
            "std_log": float(np.sqrt(max(v[2] / n - mean**2, 0.0))),
        }

    total = sum(sums.values(), np.zeros(3))
    return {
        "label_columns": list(cfg.label_columns),
        "overall": summary(total),
        "groups": {",".join(map(str, k)): summary(v) for k, v in sorted(sums.items())},
    }
