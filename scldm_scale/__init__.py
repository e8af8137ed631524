"""scldm_scale: atlas-scale training of scLDM (arXiv 2511.02986)."""

__version__ = "0.1.0"
__all__ = ["__version__"]
