"""Stage-2 DiT denoiser and multi-attribute classifier-free guidance."""

from scldm_scale.models.dit.guidance import guided_velocity
from scldm_scale.models.dit.model import DiT, DiTBlock, FinalLayer, LabelEmbedder

__all__ = ["DiT", "DiTBlock", "FinalLayer", "LabelEmbedder", "guided_velocity"]
