"""TileDB-SOMA contexts for local paths and s3:// URIs (with an optional endpoint override)."""

from __future__ import annotations

import tiledbsoma


def make_soma_context(uri: str, s3_endpoint_url: str | None = None) -> tiledbsoma.SOMATileDBContext:
    """Build a SOMA context; for s3:// URIs with `s3_endpoint_url`, point TileDB's VFS at that server.

    Credentials come from the usual AWS environment variables.
    """
    config: dict[str, str] = {}
    if uri.startswith("s3://") and s3_endpoint_url:
        scheme, _, host = s3_endpoint_url.partition("://")
        config.update(
            {
                "vfs.s3.endpoint_override": host or scheme,
                "vfs.s3.scheme": scheme if host else "https",
                "vfs.s3.use_virtual_addressing": "false",
                "vfs.s3.verify_ssl": "false",
            }
        )
    return tiledbsoma.SOMATileDBContext(tiledb_config=config)
