"""Stage-1 transformer autoencoder: tokenizer, encoder / decoder, likelihood heads."""

from scldm_scale.models.vae.likelihood import gaussian_kl, nb_log_prob, normalized_log1p, sample_nb
from scldm_scale.models.vae.model import LatentPosterior, TransformerVAE
from scldm_scale.models.vae.tokens import GeneTokenizer, transform_counts

__all__ = [
    "GeneTokenizer",
    "LatentPosterior",
    "TransformerVAE",
    "gaussian_kl",
    "nb_log_prob",
    "normalized_log1p",
    "sample_nb",
    "transform_counts",
]
