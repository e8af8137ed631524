"""The embedded demo atlas: built on first use from the three real datasets in `demo_data/`, then reused.

`ensure_demo_atlas()` is idempotent and safe to call from several processes at once (file lock + atomic
publish). `python -m data_pipelines.demo` builds it if needed and prints `atlas_summary()` as a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from importlib import resources

import anndata
import pandas as pd

from data_pipelines._atlas import META_DATASETS, SPLIT_VALUES, atlas_exists, soma_context
from data_pipelines._commit import open_committed
from data_pipelines._source import stratified_split
from data_pipelines._staging import atlas_lock
from data_pipelines.ingest import ingest_anndata

logger = logging.getLogger(__name__)

__all__ = [
    "DEMO_ATLAS_ENV",
    "DEMO_FILES",
    "DEMO_LABEL_COLUMNS",
    "SPLIT_SEED",
    "atlas_summary",
    "default_demo_atlas_uri",
    "ensure_demo_atlas",
    "main",
    "resolve_atlas_uri",
    "stratified_split",
]

DEMO_ATLAS_ENV = "SCLDM_SCALE_DEMO_ATLAS"
DEMO_VERSION = "v1"
DEMO_FILES = ("brain10k.h5ad", "pbmc700.h5ad", "wu2020_tcells.h5ad")
DEMO_LABEL_COLUMNS = ("cell_type", "cluster", "phase", "donor_id", "tissue")
"""Label columns of the demo atlas; a dataset without one gets `UNKNOWN` (brain10k has no cell_type)."""
UNKNOWN = "unknown"
SPLIT_SEED = 0
SPLIT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


def default_demo_atlas_uri() -> str:
    """`$SCLDM_SCALE_DEMO_ATLAS` if set, else `~/.cache/scldm_scale/demo_atlas-v1`."""
    default = os.path.join("~", ".cache", "scldm_scale", f"demo_atlas-{DEMO_VERSION}")
    return os.path.abspath(os.path.expanduser(os.environ.get(DEMO_ATLAS_ENV) or default))


def _load_demo_anndata() -> list[anndata.AnnData]:
    folder = resources.files("data_pipelines") / "demo_data"
    adatas = []
    for name in DEMO_FILES:
        with resources.as_file(folder / name) as path:
            adata = anndata.read_h5ad(path)
        for col in DEMO_LABEL_COLUMNS:
            if col not in adata.obs.columns:
                adata.obs[col] = UNKNOWN
        adatas.append(adata)
    strata = pd.concat([a.obs[["dataset_id", "cell_type"]].astype(str) for a in adatas], ignore_index=True)
    split = stratified_split(strata, seed=SPLIT_SEED, fractions=[SPLIT_FRACTIONS[k] for k in SPLIT_VALUES])
    start = 0
    for adata in adatas:
        adata.obs["split"] = split[start : start + adata.n_obs]
        start += adata.n_obs
    return adatas


def _build(path: str) -> None:
    logger.info("building the demo atlas at %s (first use)", path)
    ingest_anndata(
        path,
        _load_demo_anndata(),
        label_columns=list(DEMO_LABEL_COLUMNS),  # `split` is set above: ingestion keeps it
        fill_values=dict.fromkeys(DEMO_LABEL_COLUMNS, UNKNOWN),
        experiment_metadata={
            "split_seed": SPLIT_SEED,
            "split_stratified_by": json.dumps(["dataset_id", "cell_type"]),
            "split_fractions": json.dumps(SPLIT_FRACTIONS),
            "scldm_scale.demo_version": DEMO_VERSION,
        },
    )


def ensure_demo_atlas(uri: str | None = None) -> str:
    """Build the demo atlas at `uri` (default: `default_demo_atlas_uri()`) unless it exists; return its path.

    Idempotent and concurrency-safe: the build runs under an inter-process file lock and is published with
    one atomic rename, so an existing directory is always a complete atlas and a second call does nothing.
    """
    path = os.path.abspath(os.path.expanduser(uri)) if uri else default_demo_atlas_uri()
    if atlas_exists(path):
        return path
    with atlas_lock(path):
        if not atlas_exists(path):  # another process may have built it while we waited for the lock
            _build(path)
    return path


def resolve_atlas_uri(uri: str) -> str:
    """Map the config value "demo" to the (built on demand) demo atlas; return other URIs unchanged."""
    return ensure_demo_atlas() if uri == "demo" else uri


def atlas_summary(uri: str, s3_endpoint_url: str | None = None, s3_verify_tls: bool = True) -> dict:
    """Datasets with cell counts, total cells, genes, split counts and label columns of an atlas (as of its
    last commit)."""
    with open_committed(uri, soma_context(uri, s3_endpoint_url, s3_verify_tls)) as exp:
        names = exp.obs.schema.names
        cols = ["dataset_id"] + (["split"] if "split" in names else [])
        obs = exp.obs.read(column_names=cols).concat().to_pandas()
        n_vars = int(exp.ms["RNA"].var.count)
        metadata = dict(exp.metadata)
    datasets = obs["dataset_id"].value_counts(sort=False)
    order = [d["dataset_id"] for d in json.loads(metadata.get(META_DATASETS, "[]"))] or list(datasets.index)
    return {
        "uri": uri,
        "n_obs": len(obs),
        "n_vars": n_vars,
        "datasets": {d: int(datasets.get(d, 0)) for d in order},
        "splits": {k: int(v) for k, v in obs["split"].value_counts().items()} if "split" in obs else {},
        "label_columns": [c for c in names if c not in ("soma_joinid", "obs_id", "nnz")],
        "split_seed": metadata.get("split_seed"),
    }


def _print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"SOMA atlas {summary['uri']}")
    table.add_column("dataset_id")
    table.add_column("cells", justify="right")
    for dataset_id, n in summary["datasets"].items():
        table.add_row(dataset_id, f"{n:,}")
    table.add_row("[bold]total", f"[bold]{summary['n_obs']:,}")
    console = Console()
    console.print(table)
    splits = ", ".join(f"{k} {v:,}" for k, v in summary["splits"].items())
    console.print(
        f"genes: {summary['n_vars']:,}   splits: {splits or '-'}   split seed: {summary['split_seed']}"
    )
    console.print(f"obs columns: {', '.join(summary['label_columns'])}")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: build the demo atlas if needed and print its summary."""
    p = argparse.ArgumentParser(prog="python -m data_pipelines.demo", description=__doc__.splitlines()[0])
    p.add_argument(
        "--atlas", default=None, help=f"where to build it (default ${DEMO_ATLAS_ENV} or ~/.cache/...)"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _print_summary(atlas_summary(ensure_demo_atlas(args.atlas)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
