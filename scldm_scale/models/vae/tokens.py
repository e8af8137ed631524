"""Gene-token input layer of the autoencoder: how each expressed gene's token carries its count. Raw counts,
not library-normalised.

The default `projconcat` is the paper's input, a linear map of the gene embedding concatenated with the count;
`proj` and `softbin` add a learned count embedding. The scale-only transforms (`SCALE_TRANSFORMS`, the authors'
code: token = E[g] x f(c)) are kept for reproducing that code. Beware: the encoder's first LayerNorm gives
LayerNorm(s e) = LayerNorm(e) for any s > 0, so with them the latent cannot see counts, only which genes are
detected.

Shape legend: B cells, T tokens, D width.
"""

from __future__ import annotations

import torch
from torch import nn

SCALE_TRANSFORMS = ("log1p", "log1pzero", "sqrt", "anscombe")
LEARNED_TRANSFORMS = ("proj", "projconcat", "softbin")


def transform_counts(counts_BT: torch.Tensor, name: str) -> torch.Tensor:
    """Scalar count transforms of the reference `agg_func` (log1p default).

    log1p: log(1 + c); log1pzero: log1p, with zeros mapped to -1; sqrt: sqrt(c + 1);
    anscombe: asinh(sqrt(c + 1)) (as written in the reference).
    """
    if name == "log1p":
        return torch.log1p(counts_BT)
    if name == "log1pzero":
        return torch.where(counts_BT > 0, torch.log1p(counts_BT), -torch.ones_like(counts_BT))
    if name == "sqrt":
        return torch.sqrt(counts_BT + 1)
    if name == "anscombe":
        return torch.asinh(torch.sqrt(counts_BT + 1))
    raise ValueError(f"model.count_transform: unknown scalar transform {name!r}")


class GeneTokenizer(nn.Module):
    """Gene embedding table E (G+1, D), row 0 = padding, combined with the token counts.

    Args:
        num_genes: G, vocabulary size without padding.
        dim: D.
        transform: one of SCALE_TRANSFORMS (E[g] * f(c)) or LEARNED_TRANSFORMS:
            proj: E[g] + Linear(1 -> D)(log1p c); projconcat: Linear(2D -> D)([E[g], log1p c * 1]);
            softbin: E[g] + softmax(MLP(log1p c)) @ bins (10 learned bins).
    """

    def __init__(self, num_genes: int, dim: int, transform: str = "projconcat", num_bins: int = 10):
        super().__init__()
        if transform not in SCALE_TRANSFORMS + LEARNED_TRANSFORMS:
            raise ValueError(f"model.count_transform must be one of {SCALE_TRANSFORMS + LEARNED_TRANSFORMS}")
        self.transform = transform
        self.embedding = nn.Embedding(num_genes + 1, dim)
        if transform == "proj":
            self.count_proj = nn.Linear(1, dim)
        elif transform == "projconcat":
            self.count_proj = nn.Linear(2 * dim, dim)
        elif transform == "softbin":
            self.count_proj = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, num_bins))
            self.bins = nn.Parameter(torch.randn(num_bins, dim) * 0.02)

    def gene_embedding(self, gene_ids_BT: torch.Tensor) -> torch.Tensor:
        """E[g] without counts (decoder queries when the embedding is shared)."""
        return self.embedding(gene_ids_BT)

    def forward(self, gene_ids_BT: torch.Tensor, counts_BT: torch.Tensor) -> torch.Tensor:
        emb_BTD = self.embedding(gene_ids_BT)
        counts_BT = counts_BT.to(emb_BTD.dtype)
        if self.transform in SCALE_TRANSFORMS:
            return emb_BTD * transform_counts(counts_BT, self.transform).unsqueeze(-1)
        c_BT1 = torch.log1p(counts_BT).unsqueeze(-1)
        if self.transform == "proj":
            return emb_BTD + self.count_proj(c_BT1)
        if self.transform == "projconcat":
            return self.count_proj(torch.cat([emb_BTD, c_BT1.expand_as(emb_BTD)], dim=-1))
        weights_BTK = torch.softmax(self.count_proj(c_BT1), dim=-1)
        return emb_BTD + weights_BTK @ self.bins
