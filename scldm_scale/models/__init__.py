"""Networks only (single-device): the stage-1 autoencoder, the stage-2 DiT, builders.

The EMA of the DiT weights is a training concern and works on engine shards: `scldm_scale.train.ema.EMA`.
"""

from scldm_scale.models.dit import DiT, guided_velocity
from scldm_scale.models.latent import LatentStats
from scldm_scale.models.output import LossOutput
from scldm_scale.models.registry import (
    build_dit,
    build_vae,
    count_dit_parameters,
    count_vae_parameters,
    num_parameters,
)
from scldm_scale.models.vae import LatentPosterior, TransformerVAE, nb_log_prob, sample_nb

__all__ = [
    "DiT",
    "LatentPosterior",
    "LatentStats",
    "LossOutput",
    "TransformerVAE",
    "build_dit",
    "build_vae",
    "count_dit_parameters",
    "count_vae_parameters",
    "guided_velocity",
    "nb_log_prob",
    "num_parameters",
    "sample_nb",
]
