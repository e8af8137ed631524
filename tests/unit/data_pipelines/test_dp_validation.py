"""Every class of bad input fails before anything is written: exit code 2, a precise message, atlas unchanged."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp

from data_pipelines.ingest import IngestError, ingest_anndata, main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _set_value(adata, row: int, col: int, value) -> None:
    x = adata.X.toarray() if sp.issparse(adata.X) else np.array(adata.X)
    x = x.astype(np.result_type(x.dtype, np.asarray(value).dtype))
    x[row, col] = value
    adata.X = sp.csr_matrix(x)


def _bad_log_normalised(a):
    x = a.X.toarray()
    a.X = sp.csr_matrix(np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4).astype(np.float32))
    return a


def _bad_dup_gene(a):
    a.var["feature_id"] = ["ID_G0"] + list(a.var["feature_id"][1:-1]) + ["ID_G0"]
    return a


def _bad_empty_gene(a):
    a.var["feature_id"] = list(a.var["feature_id"][:3]) + [""] + list(a.var["feature_id"][4:])
    return a


def _bad_dup_cell(a):
    a.obs_names = ["cell0"] + list(a.obs_names[1:-1]) + ["cell5"]
    return a


def _bad_missing_label(a):
    a.obs["cell_type"] = a.obs["cell_type"].cat.add_categories([]).astype(object)
    a.obs.loc["cell7", "cell_type"] = np.nan
    return a


# (id, how to break a good AnnData, substrings the message must contain)
CASES = [
    ("log_normalised", _bad_log_normalised, ["non-integer", "log-normalised", "cell0", "gene"]),
    (
        "negative",
        lambda a: (_set_value(a, 4, 2, -3.0), a)[1],
        ["negative", "'cell4'", "gene 'ID_G2' (G2)", "value -3.0"],
    ),
    (
        "nan",
        lambda a: (_set_value(a, 5, 1, np.nan), a)[1],
        ["NaN or Inf", "'cell5'", "gene 'ID_G1' (G1)", "value nan"],
    ),
    (
        "inf",
        lambda a: (_set_value(a, 6, 3, np.inf), a)[1],
        ["NaN or Inf", "'cell6'", "gene 'ID_G3' (G3)", "value inf"],
    ),
    (
        "beyond_int32_float",
        lambda a: (_set_value(a, 2, 0, 3e9), a)[1],
        ["beyond int32", "'cell2'", "'ID_G0' (G0)", "3000000000.0"],
    ),
    (
        "beyond_int32_int64",
        lambda a: (_set_value(a, 3, 4, np.int64(2**33)), a)[1],
        ["beyond int32", "'cell3'"],
    ),
    ("duplicated_gene", _bad_dup_gene, ["duplicated gene id", "'ID_G0'", "feature_id"]),
    ("empty_gene", _bad_empty_gene, ["empty gene id", "var row 3"]),
    ("duplicated_cell", _bad_dup_cell, ["duplicated cell id", "'cell5'"]),
    ("zero_cells", lambda a: a[:0].copy(), ["zero cells"]),
    ("missing_label", _bad_missing_label, ["label column 'cell_type'", "missing value", "'cell7'", "--fill"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_main_exit_code_message_atlas_unchanged(
    case, base_atlas, make_adata, write_h5ad, tree_hash, capsys
):
    _, corrupt, expected = case
    path = write_h5ad(corrupt(make_adata(seed=3, cell_prefix="cell")), "bad")
    before = tree_hash(base_atlas)
    rc = main(["--atlas", base_atlas, path])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip().splitlines()[-1].startswith(f"error: {path}: ")
    for text in expected:
        assert text in err, f"{text!r} not in {err!r}"
    assert tree_hash(base_atlas) == before
    assert not [e for e in os.listdir(os.path.dirname(base_atlas)) if ".staging-" in e]


def _cli(*args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "data_pipelines.ingest", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def test_cli_subprocess_representative_failures(base_atlas, make_adata, write_h5ad, tree_hash, tmp_path):
    """Through a real `python -m data_pipelines.ingest` process: non-HDF5, log-normalised, duplicated cells."""
    not_hdf5 = tmp_path / "notes.h5ad"
    not_hdf5.write_text("cell,gene,count\n")
    files = {
        "not an HDF5 file": str(not_hdf5),
        "non-integer values (log-normalised": write_h5ad(_bad_log_normalised(make_adata(seed=3)), "log"),
        "duplicated cell id(s), first 'cell5'": write_h5ad(_bad_dup_cell(make_adata(seed=3)), "dupcell"),
    }
    before = tree_hash(base_atlas)
    # Started together: the interpreter start-ups overlap, the atlas lock serializes the rest.
    procs = {message: _cli("--atlas", base_atlas, path) for message, path in files.items()}
    for message, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err
        assert f"error: {files[message]}: " in err and message in err, err
    assert tree_hash(base_atlas) == before


def test_unreadable_and_missing_files(base_atlas, tmp_path, tree_hash, capsys):
    truncated = tmp_path / "trunc.h5ad"
    truncated.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)  # HDF5 signature, then garbage
    before = tree_hash(base_atlas)
    for path, message in [
        (str(tmp_path / "absent.h5ad"), "file not found"),
        (str(truncated), "cannot read"),
    ]:
        assert main(["--atlas", base_atlas, path]) == 2
        err = capsys.readouterr().err
        assert path in err and message in err, err
    assert tree_hash(base_atlas) == before


def test_one_bad_file_among_good_ones_writes_nothing(base_atlas, make_adata, write_h5ad, tree_hash, capsys):
    good = write_h5ad(make_adata(seed=4), "good")
    bad = write_h5ad(_bad_dup_gene(make_adata(seed=5)), "bad")
    before = tree_hash(base_atlas)
    assert main(["--atlas", base_atlas, good, bad]) == 2
    assert "bad.h5ad" in capsys.readouterr().err
    assert tree_hash(base_atlas) == before


def test_bad_input_on_new_atlas_creates_nothing(tmp_path, make_adata, write_h5ad):
    bad = write_h5ad(_bad_dup_cell(make_adata()), "bad")
    atlas = tmp_path / "new_atlas"
    assert main(["--atlas", str(atlas), bad]) == 2
    assert not atlas.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".new_atlas.staging")] == []


def test_missing_label_column_needs_fill_and_fill_fixes_it(base_atlas, make_adata, write_h5ad, capsys):
    path = write_h5ad(make_adata(seed=6, labels=False), "nolabels")
    assert main(["--atlas", base_atlas, path]) == 2
    err = capsys.readouterr().err
    assert "label column 'cell_type' is missing from obs" in err and path in err
    assert main(["--atlas", base_atlas, path, "--fill", "cell_type=unknown", "--fill", "batch=unknown"]) == 0


def test_missing_label_values_filled(tmp_path, make_adata):
    summary = ingest_anndata(
        str(tmp_path / "a"), [_bad_missing_label(make_adata())], fill_values={"cell_type": "unknown"}
    )
    assert summary["label_columns"] == ["cell_type", "batch"]


def test_duplicate_dataset_id_rejected(base_atlas, make_adata, tree_hash):
    before = tree_hash(base_atlas)
    with pytest.raises(IngestError, match="dataset_id 'base' is already in the atlas"):
        ingest_anndata(base_atlas, [make_adata(seed=7)], dataset_ids=["base"])
    assert tree_hash(base_atlas) == before


def test_new_label_column_on_existing_atlas_rejected(base_atlas, make_adata):
    with pytest.raises(IngestError, match="not in the existing atlas"):
        ingest_anndata(base_atlas, [make_adata(seed=8)], label_columns=["donor"])


def test_bad_split_values_rejected(tmp_path, make_adata):
    a = make_adata()
    a.obs["split"] = "training"
    with pytest.raises(IngestError, match="obs\\['split'\\] must be one of"):
        ingest_anndata(str(tmp_path / "a"), [a])


def test_atlas_path_that_is_not_an_experiment(tmp_path, make_adata, write_h5ad, tree_hash, capsys):
    atlas = tmp_path / "not_an_atlas"
    atlas.mkdir()
    (atlas / "notes.txt").write_text("keep me")
    before = tree_hash(str(atlas))
    assert main(["--atlas", str(atlas), write_h5ad(make_adata())]) == 2
    assert "exists but is not a SOMA Experiment" in capsys.readouterr().err
    assert tree_hash(str(atlas)) == before
