"""Classifier-free guidance over several label attributes (arXiv 2511.02986, multi-attribute CFG).

Works on any velocity callable `fn(xt, t, labels) -> v`, so the formulas can be tested on a hand-made
field. Label id 0 is the null / unconditional id in every column (batch contract).

  joint:    v = v(null) + w [v(y) - v(null)],  y = all attributes together, w = mean of the weights
  additive: v = v(null) + sum_j w_j [v(y_j) - v(null)],  y_j = attribute j alone, others null

All needed evaluations run as one batched call; the unconditional pass is B rows, not 2B (the reference
duplicated the whole batch), and is skipped when it cancels (joint with w = 1).

Shape legend: B cells, K label columns, M latent tokens, L latent dim.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _weights(weights: Sequence[float] | torch.Tensor | None, num_columns: int) -> list[float]:
    if weights is None or len(weights) == 0:
        return [1.0] * num_columns
    weights = [float(w) for w in weights]
    if len(weights) != num_columns:
        raise ValueError(f"flow.guidance_weights needs one weight per label column ({num_columns}), got {weights}")
    return weights


def guided_velocity(
    fn: VelocityFn,
    xt_BML: torch.Tensor,
    t_B: torch.Tensor,
    labels_BK: torch.Tensor,
    weights: Sequence[float] | torch.Tensor | None = None,
    strategy: str = "additive",
) -> torch.Tensor:
    """Guided velocity for `strategy` in {"joint", "additive"}; see the module docstring.

    Args:
        fn: velocity field taking (xt (N, M, L), t (N,), labels (N, K)).
        xt_BML, t_B, labels_BK: the state, times and requested labels (0 = leave this attribute free).
        weights: per-column weights (None / empty = all 1). Weight 0 gives the unconditional field.
        strategy: "joint" or "additive".
    """
    B, K = labels_BK.shape
    w = _weights(weights, K)
    null_BK = torch.zeros_like(labels_BK)
    if strategy == "joint":
        w_joint = sum(w) / max(K, 1)
        if K == 0 or w_joint == 0.0:
            return fn(xt_BML, t_B, null_BK)
        if w_joint == 1.0:
            return fn(xt_BML, t_B, labels_BK)
        v = fn(torch.cat([xt_BML, xt_BML]), torch.cat([t_B, t_B]), torch.cat([null_BK, labels_BK]))
        v_null, v_cond = v.chunk(2)
        return v_null + w_joint * (v_cond - v_null)
    if strategy != "additive":
        raise ValueError(f"model.guidance must be 'joint' or 'additive', got {strategy!r}")
    active = [j for j in range(K) if w[j] != 0.0]
    if not active:
        return fn(xt_BML, t_B, null_BK)
    rows = [null_BK]
    for j in active:
        single_BK = null_BK.clone()
        single_BK[:, j] = labels_BK[:, j]
        rows.append(single_BK)
    n = len(rows)
    v = fn(xt_BML.repeat(n, 1, 1), t_B.repeat(n), torch.cat(rows))
    v_null, *v_single = v.chunk(n)
    out = v_null.clone()
    for j, v_j in zip(active, v_single):
        out = out + w[j] * (v_j - v_null)
    return out
