"""The file table of a checkpoint (sizes and sha256 checksums in meta.json) and its verification. Torch-free.

meta.json (format_version >= 2) lists every other file of the checkpoint under "files":
`{"dcp/__0_0.distcp": {"size": 1234, "sha256": "..."}, ...}`. meta.json cannot list itself; its own
bytes are pinned by `manifest_digest`. Checkpoints written before checksums (format_version 1) have no
table: `verify_checkpoint` reports them as unverified, ok, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scldm_scale.checkpoint.layout import META_FILE

FILES_KEY = "files"
"""meta.json key of the file table."""
HASH_NAME = "sha256"
"""Checksum algorithm (the per-file key in the table)."""
LEGACY_WARNING = "unverified: written before checksums (no file table in meta.json)"
"""Warning for checkpoints of format_version 1."""
_CHUNK = 8 << 20
_RANK_MARKERS = (
    re.compile(r"(?:^|/)__(\d+)_\d+\.distcp$"),  # DCP: one file per writing rank
    re.compile(r"zero_pp_rank_(\d+)_"),  # DeepSpeed ZeRO shards
    re.compile(r"rank-(\d+)\.pt$"),  # our per-rank RNG files
)


@dataclass
class VerifyResult:
    """Verdict on one checkpoint."""

    path: Path
    """The checkpoint directory."""
    ok: bool = True
    """True when every listed file is present with its size and checksum (and the digest matches)."""
    problems: list[str] = field(default_factory=list)
    """What makes the checkpoint unusable, one entry per bad file ('<file>: <what is wrong>')."""
    warnings: list[str] = field(default_factory=list)
    """What does not block loading: files not in the table, a checkpoint written before checksums."""
    verified: bool = False
    """True when the checkpoint has a file table and every file was checked against it."""
    digest: str | None = None
    """`manifest_digest` of the checkpoint (None when meta.json is unreadable)."""
    files: int = 0
    """Number of files listed in the table."""
    size: int = 0
    """Total bytes of the listed files."""

    def add_problem(self, text: str) -> None:
        """Record a problem (the checkpoint is then not ok)."""
        self.problems.append(text)
        self.ok = False

    def summary(self) -> str:
        """One line: `OK|BAD|UNVERIFIED <path>` and the problems."""
        if not self.ok:
            return f"BAD {self.path}: " + "; ".join(self.problems)
        if not self.verified:
            return f"UNVERIFIED {self.path}"
        return f"OK {self.path} ({self.files} files, {self.size:,} bytes)"

    def to_json(self) -> dict[str, Any]:
        """A JSON-serializable dict."""
        return {
            "path": str(self.path), "ok": self.ok, "verified": self.verified, "problems": self.problems,
            "warnings": self.warnings, "digest": self.digest, "files": self.files, "size": self.size,
        }


def manifest_digest(ckpt_dir: str | Path) -> str:
    """sha256 hex digest of the checkpoint's meta.json bytes: pins the whole checkpoint (the file table
    inside it pins every other file)."""
    return hashlib.sha256((Path(ckpt_dir) / META_FILE).read_bytes()).hexdigest()


def hash_file(path: Path) -> tuple[int, str]:
    """(bytes read, sha256 hex digest) of one file."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def hash_files(root: Path, names: list[str], threads: int = 4) -> dict[str, dict[str, Any]]:
    """File table entries {name: {"size", "sha256"}} of `names` (relative to `root`), hashed in threads.

    Raises:
        OSError: a file could not be read.
    """
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(names)))) as pool:
        hashed = list(pool.map(lambda name: hash_file(root / name), names))
    return {name: {"size": size, HASH_NAME: digest} for name, (size, digest) in zip(names, hashed)}


def list_files(ckpt_dir: Path) -> list[tuple[str, int]]:
    """Every file under `ckpt_dir` except meta.json, as (relative posix path, size), sorted."""
    out = []
    for dirpath, _, filenames in os.walk(ckpt_dir):
        for name in filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(ckpt_dir).as_posix()
            if rel != META_FILE:
                out.append((rel, path.stat().st_size))
    return sorted(out)


def assign_files(files: list[tuple[str, int]], world_size: int) -> list[list[str]]:
    """Split files between ranks for hashing: a per-rank shard goes to the rank that wrote it (its page cache),
    the rest to the least loaded rank, biggest first. Deterministic: every rank computes the same split."""
    shares: list[list[str]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    rest = []
    for name, size in files:
        owner = _owner(name)
        if owner is not None and owner < world_size:
            shares[owner].append(name)
            load[owner] += size
        else:
            rest.append((name, size))
    for name, size in sorted(rest, key=lambda item: (-item[1], item[0])):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        shares[rank].append(name)
        load[rank] += size
    return shares


def _owner(name: str) -> int | None:
    for pattern in _RANK_MARKERS:
        match = pattern.search(name)
        if match:
            return int(match.group(1))
    return None


def read_file_table(ckpt_dir: Path, result: VerifyResult, expected_digest: str | None) -> dict[str, Any] | None:
    """The file table of meta.json, or None (legacy: warning; unreadable or digest mismatch: problem)."""
    meta_path = ckpt_dir / META_FILE
    try:
        raw = meta_path.read_bytes()
        meta = json.loads(raw)
    except (OSError, ValueError) as exc:
        result.add_problem(f"{META_FILE}: unreadable ({type(exc).__name__}: {exc})")
        return None
    result.digest = hashlib.sha256(raw).hexdigest()
    if expected_digest is not None and result.digest != expected_digest:
        result.add_problem(f"{META_FILE}: digest {result.digest} != expected {expected_digest}")
    table = meta.get(FILES_KEY) if isinstance(meta, dict) else None
    if table is None:
        result.warnings.append(LEGACY_WARNING)
        return None
    bad = [name for name, entry in table.items() if not _valid_entry(entry)] if isinstance(table, dict) else None
    if bad is None or bad:
        where = f"entries {bad[:3]}" if bad else f"'{FILES_KEY}'"
        result.add_problem(f"{META_FILE}: malformed file table ({where} need an integer size and a {HASH_NAME})")
        return None
    result.files = len(table)
    result.size = sum(int(entry.get("size", 0)) for entry in table.values())
    return table


def _valid_entry(entry: Any) -> bool:
    return isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get(HASH_NAME), str)


def check_files(ckpt_dir: Path, table: dict[str, Any], names: list[str], threads: int = 4) -> list[str]:
    """Problems of the listed files `names` (hashed in threads): missing, unreadable, size or checksum
    different from the table."""
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(names)))) as pool:
        found = list(pool.map(lambda name: _check_one(ckpt_dir, name, table[name]), names))
    return [problem for problem in found if problem is not None]


def _check_one(ckpt_dir: Path, name: str, entry: dict[str, Any]) -> str | None:
    path = ckpt_dir / name
    try:
        size = path.stat().st_size
        if size == entry["size"]:  # a size mismatch needs no hashing
            size, digest = hash_file(path)
    except FileNotFoundError:
        return f"{name}: missing"
    except OSError as exc:
        return f"{name}: unreadable ({type(exc).__name__}: {exc})"
    if size != entry["size"]:
        return f"{name}: size {size} != {entry['size']} bytes listed (truncated or rewritten)"
    if digest != entry[HASH_NAME]:
        return f"{name}: {HASH_NAME} checksum mismatch (contents changed, same size)"
    return None


def unexpected_files(ckpt_dir: Path, table: dict[str, Any]) -> list[str]:
    """Warnings for files present but not in the table (e.g. an export written after publication)."""
    try:
        present = list_files(ckpt_dir)
    except OSError as exc:
        return [f"could not list {ckpt_dir}: {exc}"]
    return [f"{name}: not listed in {META_FILE} (ignored)" for name, _ in present if name not in table]


def verify_checkpoint(
    ckpt_dir: str | Path, *, expected_digest: str | None = None, files: list[str] | None = None
) -> VerifyResult:
    """Check a checkpoint against its meta.json file table, on one process (no process group).

    Args:
        ckpt_dir: a checkpoint directory (`.../checkpoints/step-XXXXXXXX`).
        expected_digest: if given, meta.json must have this `manifest_digest`.
        files: check only these listed files (relative paths); None = every listed file, and also warn
            about files that are not listed.

    Returns:
        A `VerifyResult`; `ok` is False when a listed file is missing, has another size or checksum, or
        meta.json is unreadable. A checkpoint written before checksums is ok but not `verified`.
    """
    ckpt_dir = Path(ckpt_dir)
    result = VerifyResult(path=ckpt_dir)
    table = read_file_table(ckpt_dir, result, expected_digest)
    if table is None:
        return result
    unknown = [name for name in (files or []) if name not in table]
    for name in unknown:
        result.add_problem(f"{name}: not listed in {META_FILE}")
    names = sorted(table) if files is None else [name for name in files if name in table]
    for problem in check_files(ckpt_dir, table, names):
        result.add_problem(problem)
    if files is None:
        result.warnings.extend(unexpected_files(ckpt_dir, table))
    result.verified = result.ok
    return result


def checkpoint_size(ckpt_dir: Path) -> int:
    """Bytes of a checkpoint: from its file table, or by walking it (format_version 1)."""
    try:
        table = json.loads((ckpt_dir / META_FILE).read_text()).get(FILES_KEY)
    except (OSError, ValueError, AttributeError):
        table = None
    meta_size = (ckpt_dir / META_FILE).stat().st_size
    if isinstance(table, dict):
        return meta_size + sum(int(entry.get("size", 0)) for entry in table.values())
    return meta_size + sum(size for _, size in list_files(ckpt_dir))
