"""Ingest .h5ad files or AnnData objects into one SOMA atlas (appending, union gene vocabulary).

`python -m data_pipelines.ingest --atlas PATH FILE.h5ad [FILE.h5ad ...]`. Every input is validated completely
(ids, labels, split values, every count) before anything is written; every cell gets a train / val / test
`split` (its own, else a seeded stratified draw). Every ingest is one committed write (`_commit.py`): readers
see the atlas as of the last successful ingest, whatever a failed or killed one wrote (s3:// and local paths);
local atlases are in addition written in a staging copy, fsynced and published atomically
(`_staging.staged_atlas`). Layout: DEVELOPERS.md, "Atlas layout"; protocol: docs/object_store.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import anndata
import pandas as pd
import tiledbsoma

from data_pipelines._append import plan_var, write_sources
from data_pipelines._atlas import SPLIT_COLUMN, SPLIT_VALUES, AtlasState, read_state, soma_context
from data_pipelines._source import (
    DEFAULT_SPLIT_FRACTIONS,
    IngestError,
    Source,
    assign_split,
    check_split_fractions,
    default_label_columns,
    open_h5ad,
    validate_source,
)
from data_pipelines._staging import staged_atlas

logger = logging.getLogger(__name__)

__all__ = ["IngestError", "ingest_anndata", "ingest_h5ads", "main"]


def ingest_h5ads(
    atlas_uri: str,
    paths: list[str],
    *,
    dataset_ids: list[str] | None = None,
    label_columns: list[str] | None = None,
    fill_values: dict[str, str] | None = None,
    chunk_rows: int = 10_000,
    s3_endpoint_url: str | None = None,
    s3_verify_tls: bool = True,
    experiment_metadata: dict[str, str | int | float] | None = None,
    split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    split_seed: int = 0,
) -> dict:
    """Append .h5ad files to the atlas at `atlas_uri` (created if absent), reading X in backed row chunks.

    Args:
        atlas_uri: local path or s3:// URI of the SOMA Experiment.
        paths: .h5ad files; each becomes one dataset, stored contiguously in the order given.
        dataset_ids: one id per path; used when a file has no obs['dataset_id'] (default: the file stem).
        label_columns: obs columns stored as string labels. Default for a new atlas: the categorical or
            string obs columns every input has, except dataset_id and split; for an existing atlas: its label
            columns (an existing atlas cannot gain label columns, that would rewrite stored cells).
        fill_values: column -> value used for missing labels (NaN, empty, or the column absent from a file).
        chunk_rows: cells per read / write chunk (bounds peak memory).
        s3_endpoint_url: endpoint override for s3:// atlases.
        s3_verify_tls: verify the TLS certificate of an https endpoint (False only for a trusted private one).
        experiment_metadata: extra key -> scalar written into the experiment metadata.
        split_fractions: train / val / test fractions of the cells whose split is assigned here.
        split_seed: seed of the split assignment.

    obs gets `obs_id` (the input obs_names: unique within a dataset, not across datasets), `dataset_id`, the
    label columns and `split` as strings. A cell keeps the input's obs['split'] (train / val / test; any other
    value is an error); the others are drawn per dataset by `split_fractions`, stratified by the first label
    column (`_source.assign_split`). An atlas written before ingestion assigned splits has no split column:
    appending to it works, without split (a warning says so). var gets `feature_id` (var['feature_id'] if present, else var_names),
    `feature_name` (var['feature_name'] or var['gene_symbol'] if present, else var_names) and `n_cells`.

    Returns:
        A summary: atlas_uri, n_obs, n_vars, n_new_genes, label_columns and one dict per ingested dataset
        (with its split counts).

    Raises:
        IngestError: (a ValueError) on any bad input; the atlas is left untouched. Any other failure (or a
            kill) leaves the atlas as of its last commit for every reader; the next ingest discards the rest.
    """
    if dataset_ids is not None and len(dataset_ids) != len(paths):
        raise IngestError(f"got {len(dataset_ids)} dataset ids for {len(paths)} files")
    openers = [(p, (lambda p=p: open_h5ad(p)), os.path.splitext(os.path.basename(p))[0]) for p in paths]
    return _ingest(
        atlas_uri,
        openers,
        dataset_ids,
        label_columns,
        fill_values,
        chunk_rows,
        soma_context(atlas_uri, s3_endpoint_url, s3_verify_tls),
        experiment_metadata,
        _SplitOptions(check_split_fractions(split_fractions), int(split_seed)),
    )


def ingest_anndata(
    atlas_uri: str,
    adatas: list[anndata.AnnData],
    *,
    dataset_ids: list[str] | None = None,
    label_columns: list[str] | None = None,
    fill_values: dict[str, str] | None = None,
    chunk_rows: int = 10_000,
    s3_endpoint_url: str | None = None,
    s3_verify_tls: bool = True,
    experiment_metadata: dict[str, str | int | float] | None = None,
    split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    split_seed: int = 0,
) -> dict:
    """Like `ingest_h5ads` for in-memory (or backed) AnnData objects; the default dataset id is `adata<i>`."""
    if dataset_ids is not None and len(dataset_ids) != len(adatas):
        raise IngestError(f"got {len(dataset_ids)} dataset ids for {len(adatas)} AnnData objects")
    openers = [(f"AnnData #{i}", (lambda a=a: a), f"adata{i}") for i, a in enumerate(adatas)]
    return _ingest(
        atlas_uri,
        openers,
        dataset_ids,
        label_columns,
        fill_values,
        chunk_rows,
        soma_context(atlas_uri, s3_endpoint_url, s3_verify_tls),
        experiment_metadata,
        _SplitOptions(check_split_fractions(split_fractions), int(split_seed)),
    )


@dataclass(frozen=True)
class _SplitOptions:
    fractions: tuple[float, float, float]
    seed: int


def _resolve_labels(
    state: AtlasState, requested: list[str] | None, adatas: list[anndata.AnnData]
) -> list[str]:
    if requested is not None:  # split is always stored (not as a label column); naming it changes nothing
        requested = [c for c in requested if c != SPLIT_COLUMN]
    if not state.exists:
        return list(requested) if requested is not None else default_label_columns(adatas)
    extra = [c for c in (requested or []) if c not in state.label_columns]
    if extra:
        raise IngestError(
            f"label column(s) {extra} are not in the existing atlas (its label columns: {state.label_columns}); "
            "label columns are fixed when the atlas is created"
        )
    return state.label_columns


def _validate_all(
    state: AtlasState,
    openers: list[tuple[str, Callable[[], anndata.AnnData], str]],
    dataset_ids: list[str] | None,
    label_columns: list[str] | None,
    fill_values: dict[str, str],
    chunk_rows: int,
) -> tuple[list[Source], list[str]]:
    adatas = [(name, opener(), stem) for name, opener, stem in openers]
    sources: list[Source] = []
    try:
        labels = _resolve_labels(state, label_columns, [a for _, a, _ in adatas])
        for i, (name, adata, stem) in enumerate(adatas):
            given = dataset_ids[i] if dataset_ids is not None else None
            src = validate_source(
                name,
                adata,
                dataset_id=given,
                stem=stem,
                label_columns=labels,
                fill_values=fill_values,
                chunk_rows=chunk_rows,
            )
            sources.append(src)
            taken = state.dataset_ids + [s.dataset_id for s in sources[:-1]]
            if src.dataset_id in taken:
                raise IngestError(
                    f"{name}: dataset_id {src.dataset_id!r} is already in the atlas or in an earlier input"
                )
    except BaseException:
        for _, adata, _ in adatas:
            if adata.isbacked:
                adata.file.close()
        raise
    return sources, labels


def _assign_splits(state: AtlasState, sources: list[Source], labels: list[str], opts: _SplitOptions) -> None:
    """Give every new cell a split (kept from its input, else drawn); none for an atlas without the column."""
    if not state.has_split:
        given = [s.name for s in sources if s.split is not None]
        logger.warning(
            "the atlas has no %r obs column (written by an older data_pipelines.ingest): the new cells get no "
            "split either%s; train on it with data.value_filter=null data.val_value_filter=null, or re-ingest "
            "every file into a new atlas to get one",
            SPLIT_COLUMN,
            f" (obs[{SPLIT_COLUMN!r}] of {', '.join(given)} is not stored)" if given else "",
        )
        for src in sources:
            src.split = None
        return
    for src in sources:
        assign_split(src, labels[0] if labels else None, seed=opts.seed, fractions=opts.fractions)


def _split_summary(src: Source, opts: _SplitOptions, labels: list[str]) -> dict:
    if src.split is None:
        return {}
    counts = pd.Series(src.split).value_counts()
    return {
        "split": {v: int(counts.get(v, 0)) for v in SPLIT_VALUES},
        "split_kept": src.n_split_kept,
        "split_seed": opts.seed,
        "split_fractions": list(opts.fractions),
        "split_stratified_by": ["dataset_id", *labels[:1]],
    }


def _ingest(
    atlas_uri: str,
    openers: list[tuple[str, Callable[[], anndata.AnnData], str]],
    dataset_ids: list[str] | None,
    label_columns: list[str] | None,
    fill_values: dict[str, str] | None,
    chunk_rows: int,
    ctx: tiledbsoma.SOMATileDBContext,
    experiment_metadata: dict | None,
    split_opts: _SplitOptions,
) -> dict:
    if chunk_rows < 1:
        raise IngestError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if not openers:
        raise IngestError("nothing to ingest: no input files")
    with staged_atlas(atlas_uri) as target:
        # Read and validate under the atlas lock (staged_atlas holds it for local paths), before any write.
        state = read_state(atlas_uri, ctx)
        sources, labels = _validate_all(
            state, openers, dataset_ids, label_columns, fill_values or {}, chunk_rows
        )
        try:
            _assign_splits(state, sources, labels, split_opts)
            var, maps = plan_var(state, sources)
            datasets = write_sources(
                target,
                ctx,
                state,
                sources,
                labels,
                var,
                maps,
                chunk_rows=chunk_rows,
                experiment_metadata=experiment_metadata or {},
                dataset_extra=lambda src: _split_summary(src, split_opts, labels),
            )
        finally:
            for src in sources:
                src.close()
    n_new = len(var) - len(state.var)
    logger.info(
        "ingested %d dataset(s) into %s: %d cells, %d genes (%d new)",
        len(sources),
        atlas_uri,
        datasets[-1]["obs_joinid_stop"],
        len(var),
        n_new,
    )
    return {
        "atlas_uri": atlas_uri,
        "n_obs": int(datasets[-1]["obs_joinid_stop"]),
        "n_vars": len(var),
        "n_new_genes": n_new,
        "label_columns": labels,
        "datasets": datasets[len(state.datasets) :],
    }


def _parse_fill(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        col, sep, value = item.partition("=")
        if not sep or not col:
            raise IngestError(f"--fill expects COLUMN=VALUE, got {item!r}")
        out[col] = value
    return out


def _parse_fractions(text: str) -> tuple[float, float, float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise IngestError(f"--split-fractions expects TRAIN,VAL,TEST numbers, got {text!r}") from None
    return check_split_fractions(values)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_pipelines.ingest", description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", metavar="FILE.h5ad", help="input files, one dataset each")
    p.add_argument(
        "--atlas", required=True, help="SOMA experiment: local path or s3:// URI (created if absent)"
    )
    p.add_argument(
        "--dataset-id", action="append", dest="dataset_ids", help="dataset id per file (repeat, in order)"
    )
    p.add_argument(
        "--label-column", action="append", dest="label_columns", help="obs label column (repeatable)"
    )
    p.add_argument(
        "--fill", action="append", default=[], metavar="COL=VALUE", help="fill value for missing labels"
    )
    p.add_argument(
        "--split-fractions",
        default=",".join(f"{f:g}" for f in DEFAULT_SPLIT_FRACTIONS),
        metavar="TRAIN,VAL,TEST",
        help="fractions of the split drawn for cells without obs['split'] (default 0.8,0.1,0.1)",
    )
    p.add_argument("--split-seed", type=int, default=0, help="seed of the split draw (default 0)")
    p.add_argument("--chunk-rows", type=int, default=10_000, help="cells per chunk (default 10000)")
    p.add_argument("--s3-endpoint-url", default=None, help="endpoint override for s3:// atlases")
    p.add_argument(
        "--s3-no-verify-tls",
        dest="s3_verify_tls",
        action="store_false",
        help="do not verify the TLS certificate of an https endpoint (a trusted private one only)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns 0 on success, 2 on bad input (message on stderr, atlas unchanged)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = ingest_h5ads(
            args.atlas,
            args.files,
            dataset_ids=args.dataset_ids,
            label_columns=args.label_columns,
            fill_values=_parse_fill(args.fill),
            chunk_rows=args.chunk_rows,
            s3_endpoint_url=args.s3_endpoint_url,
            s3_verify_tls=args.s3_verify_tls,
            split_fractions=_parse_fractions(args.split_fractions),
            split_seed=args.split_seed,
        )
    except ValueError as exc:  # IngestError, or an atlas path that is not a SOMA experiment
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for d in summary["datasets"]:
        split = ", ".join(f"{k} {v}" for k, v in d.get("split", {}).items()) or "no split column"
        print(f"{d['dataset_id']}: {d['n_cells']} cells, {d['n_genes']} genes, split {split} ({d['source']})")
    print(
        f"atlas {summary['atlas_uri']}: {summary['n_obs']} cells, {summary['n_vars']} genes ({summary['n_new_genes']} new)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
