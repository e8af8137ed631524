"""Schema of the two networks: the stage-1 transformer autoencoder and the stage-2 DiT.

Owned by `scldm_scale/models/`. Torch-free. Size presets live in configs/{vae,ldm}/*.yaml; the defaults
here are the tiny `debug` shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

CountTransform = Literal["log1p", "log1pzero", "sqrt", "anscombe", "proj", "projconcat", "softbin"]


def _check_positive(section: str, obj: object, keys: tuple[str, ...]) -> None:
    for key in keys:
        if getattr(obj, key) < 1:
            raise ValueError(f"{section}.{key} must be >= 1, got {getattr(obj, key)}")


def _check_heads(section: str, dim: int, heads: dict[str, int]) -> None:
    for key, value in heads.items():
        if value >= 1 and dim % value != 0:
            raise ValueError(f"{section}.{key} must divide {section}.dim={dim}, got {value}")


@dataclass(kw_only=True)
class VAEConfig:
    num_genes: int | None = None
    """Gene vocabulary size without padding; None = taken from the data's vocabulary at start-up."""
    dim: int = 32
    """Token width d."""
    latent_dim: int = 16
    """Latent width D per latent token (the latent is num_latent_tokens x latent_dim)."""
    num_latent_tokens: int = 16
    """m, the number of MCAB inducing points (learned pooling queries)."""
    num_layers: int = 2
    """Self-attention blocks in the encoder and in the decoder (each)."""
    num_heads: int = 4
    """Self-attention heads (must divide dim)."""
    num_cross_heads: int = 4
    """MCAB cross-attention heads (must divide dim)."""
    mlp_multiple_of: int = 4
    """SwiGLU hidden size is rounded up to a multiple of this (hidden = 8 dim / 3, reference)."""
    norm_eps: float = 1e-8
    """LayerNorm epsilon (reference: 1e-8)."""
    bias: bool = False
    """Biases in attention and projection Linears (reference VAE: false)."""
    dropout: float = 0.0
    """Dropout on attention weights and residual branches."""
    count_transform: CountTransform = "projconcat"
    """How a gene token carries its count. projconcat (default, the paper's input): Linear([E[g], log1p c]);
    proj / softbin add a learned count embedding. The scale-only log1p / log1pzero / sqrt / anscombe give
    E[g] x f(c), as the authors' code does: the encoder's first LayerNorm removes that scale, so the latent
    sees only which genes are detected, not their counts. Keep them for reproducing that code only."""
    shared_embedding: bool = True
    """Decoder queries reuse the encoder's gene embedding table (reference default)."""
    likelihood: Literal["nb", "gaussian"] = "nb"
    """Reconstruction head: negative binomial on counts, or Gaussian (L2) on log1p-normalised counts."""
    dispersion: Literal["gene", "cell_gene"] = "gene"
    """NB inverse dispersion theta: one per gene shared across cells, or predicted per cell and gene."""
    gaussian_target_sum: float = 1e4
    """Gaussian head target: log1p(target_sum * x / library_size)."""
    posterior: Literal["deterministic", "gaussian"] = "deterministic"
    """Deterministic LayerNorm bottleneck (reference) or Gaussian posterior with a KL term (paper VAE)."""
    kl_weight: float = 1.0
    """beta, weight of KL(q(z|x) || N(0, I)) per cell; used only with posterior=gaussian."""
    gene_chunk_size: int | None = None
    """Genes decoded per chunk (bounds activation memory); None = automatic, batch x chunk x dim <= 16M."""
    enable_chunk_checkpointing: bool = False
    """Recompute each gene chunk in backward (activation memory of one chunk when training)."""

    def __post_init__(self) -> None:
        _check_positive(
            "model", self, ("dim", "latent_dim", "num_latent_tokens", "num_layers", "num_heads",
                            "num_cross_heads", "mlp_multiple_of")
        )
        _check_heads("model", self.dim, {"num_heads": self.num_heads, "num_cross_heads": self.num_cross_heads})
        if self.num_genes is not None and self.num_genes < 1:
            raise ValueError(f"model.num_genes must be >= 1 or null, got {self.num_genes}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.norm_eps <= 0:
            raise ValueError(f"model.norm_eps must be > 0, got {self.norm_eps}")
        if self.kl_weight < 0:
            raise ValueError(f"model.kl_weight must be >= 0, got {self.kl_weight}")
        if self.gaussian_target_sum <= 0:
            raise ValueError(f"model.gaussian_target_sum must be > 0, got {self.gaussian_target_sum}")
        if self.gene_chunk_size is not None and self.gene_chunk_size < 1:
            raise ValueError(f"model.gene_chunk_size must be >= 1 or null, got {self.gene_chunk_size}")
        if self.likelihood == "gaussian" and self.dispersion != "gene":
            raise ValueError("model.dispersion applies to likelihood=nb only; leave it at 'gene' for gaussian")


@dataclass(kw_only=True)
class DiTConfig:
    dim: int = 64
    """Hidden width H."""
    num_layers: int = 2
    """adaLN-Zero blocks."""
    num_heads: int = 4
    """Attention heads (must divide dim)."""
    mlp_multiple_of: int = 4
    """SwiGLU hidden size is rounded up to a multiple of this."""
    norm_eps: float = 1e-8
    """LayerNorm epsilon (reference: 1e-8)."""
    bias: bool = True
    """Biases in attention and MLP Linears (reference DiT: true)."""
    time_embed_dim: int = 256
    """Sinusoidal frequency features of t before the time MLP."""
    time_scale: float = 1.0
    """t in [0, 1] is multiplied by this before the sinusoid (reference: 1.0; DiT/SiT use 1000)."""
    guidance: Literal["joint", "additive"] = "additive"
    """Multi-attribute CFG: joint (one condition = all attributes) or additive (sum of per-attribute terms)."""
    label_embedding: Literal["per_attribute", "combination"] = "per_attribute"
    """per_attribute: one table per label column, summed; combination: one table over the mixed-radix id of
    all columns (joint only; size prod(K_j + 1))."""
    cfg_dropout_prob: float = 0.2
    """Probability of replacing a label by null during training (reference 0.8). Additive drops each
    attribute independently; joint drops all attributes of a cell together. 0.2 by measurement on the demo
    (benchmarks/README.md, guidance sweep: additive 0.2 scored FD 48.3 against 54.0 at 0.1)."""
    max_combinations: int = 1_000_000
    """Refuse a combination table with more rows than this."""

    def __post_init__(self) -> None:
        _check_positive("model", self, ("dim", "num_layers", "num_heads", "mlp_multiple_of", "time_embed_dim"))
        _check_heads("model", self.dim, {"num_heads": self.num_heads})
        if self.time_embed_dim % 2 != 0:
            raise ValueError(f"model.time_embed_dim must be even, got {self.time_embed_dim}")
        if not 0.0 <= self.cfg_dropout_prob <= 1.0:
            raise ValueError(f"model.cfg_dropout_prob must be in [0, 1], got {self.cfg_dropout_prob}")
        if self.label_embedding == "combination" and self.guidance != "joint":
            raise ValueError("model.label_embedding=combination requires model.guidance=joint")
        if self.time_scale <= 0:
            raise ValueError(f"model.time_scale must be > 0, got {self.time_scale}")
