"""A fake checkpoint directory with a meta.json file table computed independently (hashlib)."""

from __future__ import annotations

import hashlib
import json

from scldm_scale.checkpoint import checkpoint_name
from scldm_scale.checkpoint.layout import META_FILE

FILES = {
    "state.json": b'{"step": 3}',
    "rng/rank-00000.pt": b"r0" * 50,
    "rng/rank-00001.pt": b"r1" * 50,
    "dcp/__0_0.distcp": bytes(range(256)) * 8,
    "dcp/__1_0.distcp": bytes(range(255, -1, -1)) * 8,
    "dcp/.metadata": b"meta" * 10,
}


def make_ckpt(run, step, files=FILES, *, table=True):
    """A checkpoint directory with `files` and a meta.json whose table is computed here with hashlib."""
    ckpt = run / "checkpoints" / checkpoint_name(step)
    for name, data in files.items():
        (ckpt / name).parent.mkdir(parents=True, exist_ok=True)
        (ckpt / name).write_bytes(data)
    meta = {"format_version": 2 if table else 1, "step": step}
    if table:
        meta["files"] = {n: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in files.items()}
    (ckpt / META_FILE).write_text(json.dumps(meta))
    return ckpt
