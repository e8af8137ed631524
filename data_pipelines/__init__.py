"""Atlas data pipelines: h5ad ingestion into SOMA, the embedded demo atlas, the synthetic scale atlas.

Submodules import tiledbsoma; import them directly (`from data_pipelines.demo import ensure_demo_atlas`).
"""

__all__ = ["demo", "ingest", "synthetic_atlas"]
