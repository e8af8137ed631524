"""Stage-2 DiT denoiser over autoencoder latents (reference `nnets.DiT`; Peebles & Xie, DiT `models.py`).

Latent tokens (B, M, L) -> Linear(L -> H) + fixed sin-cos positions -> adaLN-Zero blocks conditioned on
c = t_emb + label_emb -> final adaLN layer -> velocity (B, M, L). No conditioning tokens.

Labels (B, K) follow the batch contract: column j holds 0 (null) or a category in 1..K_j. Label embedding:
  per_attribute: one table of K_j + 1 rows per column (row 0 = null), embeddings summed (reference);
  combination:   one table indexed by the mixed-radix id  sum_j y_j * prod_{k<j} (K_k + 1),  so every
                 combination (including partially null ones) has its own row and id 0 = all null.
Condition dropout for CFG happens in `forward` while training. Single-device.

Shape legend: B cells, K label columns, M latent tokens, L latent dim, H width.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from scldm_scale.config.model import DiTConfig
from scldm_scale.models.dit.guidance import guided_velocity
from scldm_scale.models.layers import Attention, SwiGLU, TimestepEmbedder, modulate, sincos_pos_embed_1d


class LabelEmbedder(nn.Module):
    """Label columns -> (B, H) condition embedding, with CFG dropout (see the module docstring)."""

    def __init__(self, cardinalities: Sequence[int], dim: int, mode: str = "per_attribute",
                 max_combinations: int = 1_000_000):
        super().__init__()
        self.cardinalities = [int(k) for k in cardinalities]
        self.mode = mode
        if mode == "combination":
            radix = [k + 1 for k in self.cardinalities]
            size = math.prod(radix)
            if size > max_combinations:
                raise ValueError(f"model.label_embedding=combination needs {size} rows > model.max_combinations")
            strides = [math.prod(radix[:j]) for j in range(len(radix))]
            self.register_buffer("strides", torch.tensor(strides, dtype=torch.long), persistent=False)
            self.tables = nn.ModuleList([nn.Embedding(size, dim)])
        else:
            self.tables = nn.ModuleList(nn.Embedding(k + 1, dim) for k in self.cardinalities)

    def combination_ids(self, labels_BK: torch.Tensor) -> torch.Tensor:
        """Mixed-radix id of each row's label combination (0 = all null)."""
        return (labels_BK.long() * self.strides).sum(-1)

    def drop(self, labels_BK: torch.Tensor, prob: float, joint: bool) -> torch.Tensor:
        """Replace labels by null with probability `prob`: per cell (joint) or per cell and column."""
        if prob <= 0.0:
            return labels_BK
        shape = (labels_BK.shape[0], 1) if joint else labels_BK.shape
        keep = torch.rand(shape, device=labels_BK.device) >= prob
        return labels_BK * keep

    def forward(self, labels_BK: torch.Tensor) -> torch.Tensor:
        if self.mode == "combination":
            return self.tables[0](self.combination_ids(labels_BK))
        out = 0
        for j, table in enumerate(self.tables):
            out = out + table(labels_BK[:, j])
        return out


class DiTBlock(nn.Module):
    """adaLN-Zero block: gated attention and SwiGLU residuals modulated by c (DiT)."""

    def __init__(self, dim: int, num_heads: int, multiple_of: int = 4, bias: bool = True, eps: float = 1e-8):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.attn = Attention(dim, num_heads, bias=bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.mlp = SwiGLU(dim, multiple_of, bias=bias)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x_BMH: torch.Tensor, c_BH: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c_BH).chunk(6, dim=1)
        x_BMH = x_BMH + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x_BMH), shift_msa, scale_msa))
        return x_BMH + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x_BMH), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """LN (no affine) -> adaLN modulate -> Linear(H -> L), zero-initialised."""

    def __init__(self, dim: int, out_dim: int, eps: float = 1e-8):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x_BMH: torch.Tensor, c_BH: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c_BH).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x_BMH), shift, scale))


class DiT(nn.Module):
    """Velocity network v(xt, t, labels) over latents of shape `latent_shape` = (M, L).

    Args:
        cfg: model section of the LDM config.
        latent_shape: (M, L) from the autoencoder.
        label_cardinalities: K_j per label column (categories 1..K_j; 0 = null).
    """

    block_lists = ("blocks",)
    """The ModuleList whose elements are the transformer blocks: the units of activation checkpointing, compile
    and FSDP2 sharding (`scldm_scale.distributed.parallelize`). The label tables are not blocks."""

    def __init__(self, cfg: DiTConfig, latent_shape: Sequence[int], label_cardinalities: Sequence[int]):
        super().__init__()
        self.cfg = cfg
        self.num_tokens, self.latent_dim = (int(s) for s in latent_shape)
        self.label_cardinalities = [int(k) for k in label_cardinalities]
        H = cfg.dim
        self.x_embedder = nn.Linear(self.latent_dim, H)
        self.register_buffer("pos_embed", sincos_pos_embed_1d(H, self.num_tokens).unsqueeze(0), persistent=False)
        self.t_embedder = TimestepEmbedder(H, cfg.time_embed_dim, cfg.time_scale)
        self.y_embedder = LabelEmbedder(self.label_cardinalities, H, cfg.label_embedding, cfg.max_combinations)
        self.blocks = nn.ModuleList(
            DiTBlock(H, cfg.num_heads, cfg.mlp_multiple_of, cfg.bias, cfg.norm_eps) for _ in range(cfg.num_layers)
        )
        self.final_layer = FinalLayer(H, self.latent_dim, cfg.norm_eps)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier Linears; N(0, 0.02) label tables and time MLP; adaLN and output layers zero (blocks = identity)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for table in self.y_embedder.tables:
            nn.init.normal_(table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _labels(self, labels: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        if labels is None:
            return torch.zeros(batch, len(self.label_cardinalities), dtype=torch.long, device=device)
        if labels.shape[-1] != len(self.label_cardinalities):
            raise ValueError(f"labels have {labels.shape[-1]} columns, the DiT was built for {self.label_cardinalities}")
        return labels.long()

    def forward(self, xt: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity (B, M, L) at state xt (B, M, L) and times t (B,) or scalar; labels (B, K), None = null.

        While training, labels are dropped to null with `cfg.cfg_dropout_prob` (per column for additive
        guidance, per cell for joint).
        """
        B = xt.shape[0]
        t_B = t.expand(B) if t.dim() == 0 else t
        labels_BK = self._labels(labels, B, xt.device)
        if self.training:
            labels_BK = self.y_embedder.drop(labels_BK, self.cfg.cfg_dropout_prob, self.cfg.guidance == "joint")
        c_BH = self.t_embedder(t_B) + self.y_embedder(labels_BK)
        x_BMH = self.x_embedder(xt) + self.pos_embed
        for block in self.blocks:
            x_BMH = block(x_BMH, c_BH)
        return self.final_layer(x_BMH, c_BH)

    def forward_with_guidance(
        self,
        xt: torch.Tensor,
        t: torch.Tensor,
        labels: torch.Tensor | None,
        weights: Sequence[float] | None = None,
        strategy: str | None = None,
    ) -> torch.Tensor:
        """CFG velocity; `strategy` defaults to `cfg.guidance`. See models/dit/guidance.py for the formulas.

        Call in eval mode: in training mode `forward` would also apply condition dropout.
        """
        B = xt.shape[0]
        t_B = t.expand(B) if t.dim() == 0 else t
        labels_BK = self._labels(labels, B, xt.device)
        return guided_velocity(self.forward, xt, t_B, labels_BK, weights, strategy or self.cfg.guidance)
