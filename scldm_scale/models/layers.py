"""Building blocks shared by the autoencoder and the DiT: attention, SwiGLU, pre-LN and cross-attention blocks,
adaLN modulation and the time embedder. Single-device; no parallelism here.

Attention is `torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels on GPU,
math kernel on CPU) with an optional key-padding mask; the reference attends to padding, we do not.

Shape legend: B cells, T tokens (keys), M queries, D width, H heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def swiglu_hidden(dim: int, multiple_of: int) -> int:
    """SwiGLU hidden width of the reference: multiple_of * ceil(int(8 dim / 3) / multiple_of)."""
    return multiple_of * math.ceil(int(8 * dim / 3) / multiple_of)


def modulate(x_BTD: torch.Tensor, shift_BD: torch.Tensor, scale_BD: torch.Tensor) -> torch.Tensor:
    """adaLN modulation x * (1 + scale) + shift, broadcast over tokens (DiT)."""
    return x_BTD * (1 + scale_BD.unsqueeze(1)) + shift_BD.unsqueeze(1)


def key_padding_bias(mask_BT: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Turn a key mask (True = real token) into an SDPA boolean mask and a per-row 'has any key' flag.

    A row with no real key would make the softmax NaN; such rows attend to every key instead and the
    caller zeroes their attention output with the returned flag.

    Returns:
        attn_mask_B11T (True = attend) or None, has_keys_B or None.
    """
    if mask_BT is None:
        return None, None
    has_keys_B = mask_BT.any(dim=1)
    safe_BT = mask_BT | ~has_keys_B.unsqueeze(1)
    return safe_BT[:, None, None, :], has_keys_B


class SwiGLU(nn.Module):
    """c_proj(silu(w1 x) * w2 x), no biases by default (reference `MLP`)."""

    def __init__(self, dim: int, multiple_of: int = 4, bias: bool = False, dropout: float = 0.0):
        super().__init__()
        hidden = swiglu_hidden(dim, multiple_of)
        self.w1 = nn.Linear(dim, hidden, bias=bias)
        self.w2 = nn.Linear(dim, hidden, bias=bias)
        self.c_proj = nn.Linear(hidden, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.silu(self.w1(x)) * self.w2(x)))


class Attention(nn.Module):
    """Multi-head attention; self-attention when `kv` is None, cross-attention otherwise."""

    def __init__(self, dim: int, num_heads: int, bias: bool = False, dropout: float = 0.0, cross: bool = False):
        super().__init__()
        assert dim % num_heads == 0, f"dim {dim} not divisible by heads {num_heads}"
        self.num_heads = num_heads
        self.cross = cross
        if cross:
            self.q = nn.Linear(dim, dim, bias=bias)
            self.kv = nn.Linear(dim, 2 * dim, bias=bias)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.attn_dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def _heads(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        return x_BTD.view(B, T, self.num_heads, D // self.num_heads).transpose(1, 2)  # B H T D/H

    def forward(
        self, x_BMD: torch.Tensor, kv_BTD: torch.Tensor | None = None, mask_BT: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Args: x queries (B, M, D); kv keys/values (B, T, D) for cross-attention; mask_BT True = real key."""
        if self.cross:
            assert kv_BTD is not None, "cross-attention needs kv"
            q_BMD = self.q(x_BMD)
            k_BTD, v_BTD = self.kv(kv_BTD).chunk(2, dim=-1)
        else:
            q_BMD, k_BTD, v_BTD = self.qkv(x_BMD).chunk(3, dim=-1)
        attn_mask, has_keys_B = key_padding_bias(mask_BT)
        out = F.scaled_dot_product_attention(
            self._heads(q_BMD),
            self._heads(k_BTD),
            self._heads(v_BTD),
            attn_mask=attn_mask,
            dropout_p=self.attn_dropout if self.training else 0.0,
        )
        B, M, D = x_BMD.shape
        out_BMD = self.proj(out.transpose(1, 2).reshape(B, M, D))
        if has_keys_B is not None:
            # Cells with no real token get a zero attention update instead of attending to padding.
            out_BMD = out_BMD * has_keys_B.to(out_BMD.dtype)[:, None, None]
        return self.resid_dropout(out_BMD)


class Block(nn.Module):
    """Pre-LN transformer block: x += Attn(LN(x)); x += SwiGLU(LN(x)) (reference `Block`)."""

    def __init__(self, dim: int, num_heads: int, multiple_of: int = 4, bias: bool = False,
                 dropout: float = 0.0, eps: float = 1e-8):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, bias=bias, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = SwiGLU(dim, multiple_of, bias=bias, dropout=dropout)

    def forward(self, x_BMD: torch.Tensor, mask_BM: torch.Tensor | None = None) -> torch.Tensor:
        x_BMD = x_BMD + self.attn(self.norm1(x_BMD), mask_BT=mask_BM)
        return x_BMD + self.mlp(self.norm2(x_BMD))


class CrossAttentionBlock(nn.Module):
    """MCAB: h = Q + Attn(LN_q(Q), LN_x(X)); out = h + SwiGLU(LN(h)). The residual is on the queries, so
    the output has one token per query; it is invariant to permutations of X and equivariant in Q."""

    def __init__(self, dim: int, num_heads: int, multiple_of: int = 4, bias: bool = False,
                 dropout: float = 0.0, eps: float = 1e-8):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim, eps=eps)
        self.norm_x = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, bias=bias, dropout=dropout, cross=True)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = SwiGLU(dim, multiple_of, bias=bias, dropout=dropout)

    def forward(self, q_BMD: torch.Tensor, x_BTD: torch.Tensor, mask_BT: torch.Tensor | None = None) -> torch.Tensor:
        h_BMD = q_BMD + self.attn(self.norm_q(q_BMD), self.norm_x(x_BTD), mask_BT)
        return h_BMD + self.mlp(self.norm2(h_BMD))


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t followed by an MLP (DiT / SiT `TimestepEmbedder`)."""

    def __init__(self, dim: int, freq_dim: int = 256, time_scale: float = 1.0, max_period: float = 10_000.0):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_scale = time_scale
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def timestep_features(self, t_B: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t_B.device, dtype=torch.float32) / half)
        args = (t_B.float() * self.time_scale)[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t_B: torch.Tensor) -> torch.Tensor:
        feats = self.timestep_features(t_B).to(self.mlp[0].weight.dtype)
        return self.mlp(feats)


def sincos_pos_embed_1d(dim: int, length: int) -> torch.Tensor:
    """Fixed 1-D sin-cos positional embedding (length, dim) over latent token positions (MAE / DiT)."""
    assert dim % 2 == 0, "positional embedding dim must be even"
    omega = 1.0 / 10_000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = torch.arange(length, dtype=torch.float64)[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1).float()
