"""Stage-1 transformer autoencoder of scLDM (arXiv 2511.02986; reference `TransformerVAE`).

Encoder: gene tokens -> MCAB pooling onto m learned queries -> pre-LN blocks -> Linear(d -> L) -> posterior.
Decoder: LN -> Linear(L -> d) -> blocks -> MCAB unpooling with gene-embedding queries -> NB or Gaussian head.
The decoder reconstructs every queried gene (all G by default, zeros included), in gene chunks if asked.
Single-device; knows the batch contract of DEVELOPERS.md but nothing about loaders or optimisers.

Shape legend: B cells, G genes (decoded), T tokens (expressed genes), M latent tokens, D width d, L latent dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from scldm_scale.config.model import VAEConfig
from scldm_scale.models.layers import Block, CrossAttentionBlock
from scldm_scale.models.output import LossOutput
from scldm_scale.models.vae.likelihood import (
    GaussianHead,
    NBHead,
    gaussian_kl,
    nb_log_prob,
    normalized_log1p,
)
from scldm_scale.models.vae.tokens import GeneTokenizer

LOGVAR_MIN, LOGVAR_MAX = -14.0, 10.0  # log-variance clamp (scVI baseline clamps log-scale to [-7, 5])
AUTO_CHUNK_ELEMENTS = 2**24  # automatic gene chunk: about B x chunk x d <= 16M activations (64 MB fp32)


@dataclass
class LatentPosterior:
    """q(z | x): `mean` (B, M, L) and `logvar` (None for the deterministic bottleneck)."""

    mean: torch.Tensor
    logvar: torch.Tensor | None = None

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised draw; the mean itself when deterministic."""
        if self.logvar is None:
            return self.mean
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + (0.5 * self.logvar).exp() * eps

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per cell, (B,); zeros when deterministic."""
        if self.logvar is None:
            return self.mean.new_zeros(self.mean.shape[0])
        return gaussian_kl(self.mean, self.logvar).flatten(1).sum(-1)


class Encoder(nn.Module):
    """MCAB pooling of the (masked) gene tokens onto m learned queries, then self-attention blocks."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        d, kw = cfg.dim, dict(multiple_of=cfg.mlp_multiple_of, bias=cfg.bias, dropout=cfg.dropout, eps=cfg.norm_eps)
        self.queries = nn.Parameter(torch.randn(cfg.num_latent_tokens, d))
        self.pool = CrossAttentionBlock(d, cfg.num_cross_heads, **kw)
        self.blocks = nn.ModuleList(Block(d, cfg.num_heads, **kw) for _ in range(cfg.num_layers))
        out_dim = cfg.latent_dim * (2 if cfg.posterior == "gaussian" else 1)
        self.out = nn.Linear(d, out_dim, bias=cfg.bias)

    def forward(self, tokens_BTD: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
        B = tokens_BTD.shape[0]
        h_BMD = self.pool(self.queries.unsqueeze(0).expand(B, -1, -1), tokens_BTD, mask_BT)
        for block in self.blocks:
            h_BMD = block(h_BMD)
        return self.out(h_BMD)


class Decoder(nn.Module):
    """Latent blocks, then MCAB unpooling: one query per decoded gene, keys/values = latent tokens."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        d, kw = cfg.dim, dict(multiple_of=cfg.mlp_multiple_of, bias=cfg.bias, dropout=cfg.dropout, eps=cfg.norm_eps)
        self.norm_in = nn.LayerNorm(cfg.latent_dim, eps=cfg.norm_eps, elementwise_affine=False)
        self.proj_in = nn.Linear(cfg.latent_dim, d, bias=cfg.bias)
        self.blocks = nn.ModuleList(Block(d, cfg.num_heads, **kw) for _ in range(cfg.num_layers))
        self.unpool = CrossAttentionBlock(d, cfg.num_cross_heads, **kw)

    def latent_states(self, z_BML: torch.Tensor) -> torch.Tensor:
        h_BMD = self.proj_in(self.norm_in(z_BML))
        for block in self.blocks:
            h_BMD = block(h_BMD)
        return h_BMD

    def forward(self, h_BMD: torch.Tensor, queries_BGD: torch.Tensor) -> torch.Tensor:
        return self.unpool(queries_BGD, h_BMD)


class TransformerVAE(nn.Module):
    """Stage-1 autoencoder. See the module docstring; public API follows scvi's inference / generative / loss.

    Args:
        cfg: model section; `cfg.num_genes` if set must equal `num_genes`.
        num_genes: G, gene vocabulary size without padding (token ids 1..G, 0 = padding).
    """

    block_lists = ("encoder.blocks", "decoder.blocks")
    """The ModuleLists whose elements are the transformer blocks: the units of activation checkpointing,
    compile and FSDP2 sharding (`scldm_scale.distributed.parallelize`). The MCAB pooling layers stay in the root."""

    def __init__(self, cfg: VAEConfig, num_genes: int):
        super().__init__()
        self.cfg = cfg
        self.num_genes = num_genes
        self.tokenizer = GeneTokenizer(num_genes, cfg.dim, cfg.count_transform)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.query_embedding = None if cfg.shared_embedding else nn.Embedding(num_genes + 1, cfg.dim)
        if cfg.likelihood == "nb":
            self.head: nn.Module = NBHead(num_genes, cfg.dim, cfg.dispersion)
        else:
            self.head = GaussianHead(cfg.dim, eps=cfg.norm_eps)
        self.latent_norm = nn.LayerNorm(cfg.latent_dim, eps=cfg.norm_eps, elementwise_affine=False)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier-uniform Linears with zero bias; N(0, 1) gene embeddings and queries; log theta = 1."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.tokenizer.embedding.weight)
        if self.query_embedding is not None:
            nn.init.normal_(self.query_embedding.weight)
        nn.init.normal_(self.encoder.queries)
        if isinstance(self.head, NBHead) and self.head.dispersion == "gene":
            nn.init.ones_(self.head.log_theta.weight)

    @property
    def latent_shape(self) -> tuple[int, int]:
        """(M, L): latent tokens and their width."""
        return self.cfg.num_latent_tokens, self.cfg.latent_dim

    def encode(self, gene_ids: torch.Tensor, counts: torch.Tensor, mask: torch.Tensor) -> LatentPosterior:
        """Encode expressed-gene tokens (B, T) into q(z | x); padding (mask False) is never attended to.

        The deterministic posterior's mean is LayerNorm(Linear(h)) without affine (reference); the Gaussian
        posterior predicts mean and log-variance.
        """
        tokens_BTD = self.tokenizer(gene_ids, counts)
        out_BMX = self.encoder(tokens_BTD, mask.bool())
        if self.cfg.posterior == "deterministic":
            return LatentPosterior(self.latent_norm(out_BMX))
        mean_BML, logvar_BML = out_BMX.chunk(2, dim=-1)
        return LatentPosterior(mean_BML, logvar_BML.clamp(LOGVAR_MIN, LOGVAR_MAX))

    def _queries(self, gene_ids_BG: torch.Tensor) -> torch.Tensor:
        if self.query_embedding is None:
            return self.tokenizer.gene_embedding(gene_ids_BG)
        return self.query_embedding(gene_ids_BG)

    def _decode_chunk(self, h_BMD: torch.Tensor, gene_ids_BG: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        states_BGD = self.decoder(h_BMD, self._queries(gene_ids_BG))
        logits_BG, second_BG = self.head.logits(states_BGD, gene_ids_BG)
        return logits_BG, (second_BG if second_BG is not None else logits_BG.new_zeros(()))

    def decode(
        self,
        z: torch.Tensor,
        library_size: torch.Tensor,
        gene_ids: torch.Tensor | None = None,
        gene_chunk_size: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Decode latents (B, M, L) to likelihood parameters for the queried genes.

        Args:
            z: latents (B, M, L).
            library_size: (B,) total counts; sets the NB means' sum (ignored by the Gaussian head).
            gene_ids: (G,) shared or (B, G) per-cell gene ids to decode; None = all genes 1..num_genes.
            gene_chunk_size: genes per chunk; None = `cfg.gene_chunk_size`, and None there = automatic
                (B x chunk x d <= 16M elements, so large batches x vocabularies never materialise at once).
                Chunking is exact (genes do not attend to each other; the softmax is taken at the end).

        Returns:
            NB: {"mu": (B, G), "theta": (B, G) or (1, G)}; Gaussian: {"mean": (B, G)} in log1p-normalised space.
        """
        B = z.shape[0]
        if gene_ids is None:
            gene_ids = torch.arange(1, self.num_genes + 1, device=z.device)
        gene_ids_BG = gene_ids.unsqueeze(0).expand(B, -1) if gene_ids.dim() == 1 else gene_ids
        chunk = gene_chunk_size or self.cfg.gene_chunk_size or max(1, AUTO_CHUNK_ELEMENTS // (B * self.cfg.dim))
        h_BMD = self.decoder.latent_states(z)
        recompute = self.cfg.enable_chunk_checkpointing and torch.is_grad_enabled()
        firsts, seconds = [], []
        for start in range(0, gene_ids_BG.shape[1], chunk):
            ids_BG = gene_ids_BG[:, start : start + chunk]
            if recompute:
                first, second = checkpoint(self._decode_chunk, h_BMD, ids_BG, use_reentrant=False)
            else:
                first, second = self._decode_chunk(h_BMD, ids_BG)
            firsts.append(first)
            seconds.append(second)
        logits_BG = torch.cat(firsts, dim=1)
        second_BG = torch.cat(seconds, dim=1) if seconds[0].dim() > 0 else None
        return self.head.finalize(logits_BG, second_BG, library_size)

    def dense_targets(self, gene_ids: torch.Tensor, counts: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Scatter tokens into (B, G) counts on the batch's device; genes not in the tokens are zero."""
        B = gene_ids.shape[0]
        dense = counts.new_zeros(B, self.num_genes + 1, dtype=torch.float32)
        dense.scatter_(1, gene_ids * mask, (counts * mask).float())
        return dense[:, 1:]

    def reconstruction_target(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, G) counts the decoder is scored on: every cell whole, also a cell the token cap subsampled for
        the encoder (the loader then sends the whole cells as `target_*`; its unexpressed genes are known
        zeros, scored like any cell's)."""
        if "target_gene_ids" in batch:
            return self.dense_targets(batch["target_gene_ids"], batch["target_counts"], batch["target_mask"])
        return self.dense_targets(batch["gene_ids"], batch["counts"], batch["mask"])

    def reconstruction_nll(self, params: dict[str, torch.Tensor], x_BG: torch.Tensor,
                           library_size_B: torch.Tensor) -> torch.Tensor:
        """Per-cell reconstruction loss (B,) over every gene: NB negative log-likelihood, or the Gaussian head's
        sum of squared errors on log1p-normalised counts (reference; sigma not used)."""
        if "mu" in params:
            per_gene = -nb_log_prob(x_BG, params["mu"], params["theta"])
        else:
            target_BG = normalized_log1p(x_BG, library_size_B, self.cfg.gaussian_target_sum)
            per_gene = (target_BG - params["mean"]).square()
        return per_gene.sum(-1)

    def loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> LossOutput:
        """Reconstruction of all G genes (+ beta KL with the Gaussian posterior), averaged over cells.

        Terms: `nll` (per cell, summed over genes), `kl` (per cell; zero when deterministic),
        `nll_per_gene` (nll / G, for comparing vocabularies).
        """
        posterior = self.encode(batch["gene_ids"], batch["counts"], batch["mask"])
        z_BML = posterior.sample(generator) if self.training else posterior.mean
        params = self.decode(z_BML, batch["library_size"])
        x_BG = self.reconstruction_target(batch)
        nll = self.reconstruction_nll(params, x_BG, batch["library_size"]).mean()
        kl = posterior.kl().mean()
        loss = nll + (self.cfg.kl_weight * kl if self.cfg.posterior == "gaussian" else 0.0)
        terms = {"nll": nll.detach(), "kl": kl.detach(), "nll_per_gene": nll.detach() / self.num_genes}
        return LossOutput(loss=loss, terms=terms)

    @torch.no_grad()
    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cell embeddings (B, M * L): the flattened posterior mean."""
        return self.encode(batch["gene_ids"], batch["counts"], batch["mask"]).mean.flatten(1)
