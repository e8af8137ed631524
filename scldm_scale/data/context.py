"""TileDB-SOMA contexts for local paths and s3:// URIs, and opening an atlas at its last committed write.

Ingestion (`data_pipelines/_commit.py`) writes each ingest at its own TileDB timestamp and records it in the
experiment metadata last; readers open the experiment at that timestamp, so what a failed or killed ingest
wrote after it is never read (docs/object_store.md).
"""

from __future__ import annotations

import logging

import tiledbsoma

logger = logging.getLogger(__name__)

COMMITTED_TIMESTAMP_KEY = "scldm_scale.committed_timestamp"
"""Experiment metadata: TileDB timestamp (ms) of the last committed ingest (`data_pipelines._commit`)."""
WRITE_TIMESTAMP_KEY = "scldm_scale.write_timestamp"
"""Experiment metadata: TileDB timestamp (ms) of the last ingest started (committed or not)."""


def make_soma_context(
    uri: str, s3_endpoint_url: str | None = None, *, verify_tls: bool = True, read_budget_mb: int | None = None
) -> tiledbsoma.SOMATileDBContext:
    """Build a SOMA context; for s3:// URIs with `s3_endpoint_url`, point TileDB's VFS at that server.

    `read_budget_mb` caps what one TileDB query may hold (`sm.mem.total_budget`). Without it a shuffled read
    that spans many fragments grows with them: 10^5 -> 10^6 cells (2 -> 20 fragments) took the loader from +243
    to +418 MB, and 269 MB with a 256 MB cap, at the same speed.

    TLS certificates of https endpoints are verified unless `verify_tls` is False (`data.s3_verify_tls`);
    an http:// endpoint has no TLS. Credentials come from the usual AWS environment variables.
    """
    config: dict[str, str] = {}
    if uri.startswith("s3://"):
        if s3_endpoint_url:
            scheme, _, host = s3_endpoint_url.partition("://")
            config.update(
                {
                    "vfs.s3.endpoint_override": host or scheme,
                    "vfs.s3.scheme": scheme if host else "https",
                    "vfs.s3.use_virtual_addressing": "false",
                }
            )
        config["vfs.s3.verify_ssl"] = "true" if verify_tls else "false"
        if not verify_tls and config.get("vfs.s3.scheme", "https") == "https":
            logger.warning("TLS certificate verification is off for %s (data.s3_verify_tls=false)", uri)
    if read_budget_mb is not None:
        config["sm.mem.total_budget"] = str(int(read_budget_mb) * 2**20)
    return tiledbsoma.SOMATileDBContext(tiledb_config=config)


def open_committed(uri: str, ctx: tiledbsoma.SOMATileDBContext) -> tiledbsoma.Experiment:
    """Open the experiment for reading at its last committed ingest; an atlas written without the commit
    keys (by other tools, or before them) at its latest state. The handle's `tiledb_timestamp_ms` is the
    snapshot read: reopen at it to read the same state again.

    Raises:
        ValueError: the atlas has a started but no committed ingest (its creation was interrupted).
    """
    exp = tiledbsoma.Experiment.open(uri, context=ctx)
    committed = exp.metadata.get(COMMITTED_TIMESTAMP_KEY)
    started = exp.metadata.get(WRITE_TIMESTAMP_KEY)
    if committed is None and started is None:
        return exp
    exp.close()
    if committed is None:
        raise ValueError(
            f"{uri}: no ingest into this atlas was ever committed (its first ingest was interrupted); delete it "
            "and ingest again"
        )
    return tiledbsoma.Experiment.open(uri, context=ctx, tiledb_timestamp=int(committed))
