"""File tables and verification on one process: what each kind of damage reports, legacy checkpoints, the
hashing split between ranks, the free-space check before a save."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil

import pytest

from scldm_scale.checkpoint import manifest_digest, verify_checkpoint
from scldm_scale.checkpoint.integrity import check_free_space
from scldm_scale.checkpoint.layout import META_FILE
from scldm_scale.checkpoint.manifest import (
    LEGACY_WARNING,
    assign_files,
    checkpoint_size,
    hash_files,
    list_files,
)
from tests.unit.checkpoint.conftest import FILES, make_ckpt


def test_intact_checkpoint_verifies_and_digest_pins_meta(tmp_path):
    ckpt = make_ckpt(tmp_path, 3)
    result = verify_checkpoint(ckpt)
    assert result.ok and result.verified and not result.problems and not result.warnings
    assert result.files == len(FILES) and result.size == sum(map(len, FILES.values()))
    digest = manifest_digest(ckpt)
    assert digest == hashlib.sha256((ckpt / META_FILE).read_bytes()).hexdigest() == result.digest
    assert verify_checkpoint(ckpt, expected_digest=digest).ok
    other = verify_checkpoint(ckpt, expected_digest="0" * 64)
    assert not other.ok and other.problems == [f"meta.json: digest {digest} != expected {'0' * 64}"]


def test_each_kind_of_damage_names_the_file(tmp_path):
    ckpt = make_ckpt(tmp_path, 3)
    with open(ckpt / "dcp/__1_0.distcp", "r+b") as fh:  # truncated shard
        fh.truncate(100)
    flipped = bytearray(FILES["dcp/__0_0.distcp"])
    flipped[1000] ^= 0xFF
    (ckpt / "dcp/__0_0.distcp").write_bytes(bytes(flipped))
    (ckpt / "rng/rank-00001.pt").unlink()
    (ckpt / "model.safetensors").write_bytes(b"exported later")
    result = verify_checkpoint(ckpt)
    assert not result.ok and not result.verified
    assert result.problems == [
        "dcp/__0_0.distcp: sha256 checksum mismatch (contents changed, same size)",
        "dcp/__1_0.distcp: size 100 != 2048 bytes listed (truncated or rewritten)",
        "rng/rank-00001.pt: missing",
    ]
    assert result.warnings == ["model.safetensors: not listed in meta.json (ignored)"]
    assert "BAD" in result.summary() and "dcp/__1_0.distcp: size 100" in result.summary()


def test_subset_checks_only_the_named_files(tmp_path):
    ckpt = make_ckpt(tmp_path, 3)
    (ckpt / "state.json").write_text("{}")
    assert verify_checkpoint(ckpt, files=["dcp/.metadata", "rng/rank-00000.pt"]).ok
    assert not verify_checkpoint(ckpt, files=["state.json"]).ok
    assert verify_checkpoint(ckpt, files=["nope.bin"]).problems == ["nope.bin: not listed in meta.json"]


@pytest.mark.parametrize("text", ["{not json", json.dumps({"files": {"a": {"size": "1"}}})])
def test_unreadable_or_malformed_meta_is_a_problem(tmp_path, text):
    ckpt = make_ckpt(tmp_path, 3)
    (ckpt / META_FILE).write_text(text)
    result = verify_checkpoint(ckpt)
    assert not result.ok and result.problems[0].startswith("meta.json: ")


def test_checkpoint_before_checksums_is_loadable_but_unverified(tmp_path):
    ckpt = make_ckpt(tmp_path, 3, table=False)
    result = verify_checkpoint(ckpt)
    assert result.ok and not result.verified and result.warnings == [LEGACY_WARNING]
    assert result.summary().startswith("UNVERIFIED")
    assert checkpoint_size(ckpt) == sum(map(len, FILES.values())) + (ckpt / META_FILE).stat().st_size


def test_hash_files_matches_hashlib_and_list_skips_meta(tmp_path):
    ckpt = make_ckpt(tmp_path, 3)
    listing = list_files(ckpt)
    assert [name for name, _ in listing] == sorted(FILES)
    table = hash_files(ckpt, [name for name, _ in listing], threads=3)
    assert table == json.loads((ckpt / META_FILE).read_text())["files"]


def test_assign_files_gives_rank_shards_to_their_writer_and_balances_the_rest():
    ds_shard = "deepspeed/engine/zero_pp_rank_2_mp_rank_00_optim_states.pt"  # its writer is not in a 2-rank world
    files = sorted((name, len(data)) for name, data in FILES.items()) + [(ds_shard, 7)]
    shares = assign_files(files, 2)
    assert sorted(sum(shares, [])) == sorted(name for name, _ in files)  # disjoint and complete
    assert {"dcp/__0_0.distcp", "rng/rank-00000.pt"} <= set(shares[0])
    assert {"dcp/__1_0.distcp", "rng/rank-00001.pt"} <= set(shares[1])
    assert assign_files(files, 2) == shares  # deterministic: every rank computes the same split
    assert len(assign_files(files, 1)[0]) == len(files)
    even = [(f"f{i}", 10) for i in range(6)]
    assert [len(share) for share in assign_files(even, 3)] == [2, 2, 2]


def test_free_space_check_names_directory_free_and_needed(tmp_path):
    run = tmp_path / "run"
    check_free_space(run, "step-00000001")  # no previous checkpoint: nothing to compare with
    ckpt = make_ckpt(run, 1)
    check_free_space(run, "step-00000002")  # a few KiB needed
    free = shutil.disk_usage(run / "checkpoints").free
    meta = json.loads((ckpt / META_FILE).read_text())
    meta["files"]["dcp/__0_0.distcp"]["size"] = free + 1  # claims more than the disk has free
    (ckpt / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(OSError) as info:
        check_free_space(run, "step-00000002")
    assert info.value.errno == errno.ENOSPC
    text = str(info.value)
    assert str(run / "checkpoints") in text and "bytes free" in text and f"{checkpoint_size(ckpt):,} bytes needed" in text
    assert "step-00000002" in text and "step-00000001" in text
