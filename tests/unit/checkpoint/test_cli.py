"""`python -m scldm_scale.checkpoint verify`: verdict lines, exit codes, --json, --digest, torch-free import."""

from __future__ import annotations

import json
import subprocess
import sys

from scldm_scale.checkpoint import manifest_digest
from scldm_scale.checkpoint.__main__ import main
from tests.unit.checkpoint.conftest import make_ckpt


def test_run_dir_with_one_bad_checkpoint_exits_1_naming_the_file(tmp_path, capsys):
    run = tmp_path / "run"
    make_ckpt(run, 1, table=False)
    make_ckpt(run, 2)
    bad = make_ckpt(run, 3)
    (bad / "rng/rank-00001.pt").write_bytes(b"x")
    assert main(["verify", str(run)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("UNVERIFIED") and "step-00000001" in lines[0]
    assert lines[1].startswith("  warning: unverified")
    assert lines[2].startswith("OK") and "step-00000002" in lines[2] and "6 files" in lines[2]
    assert lines[3].startswith("BAD") and "rng/rank-00001.pt: size 1 != 100" in lines[3]
    assert main(["verify", "--quiet", str(run / "checkpoints")]) == 1
    assert capsys.readouterr().out.splitlines() == [lines[3]]


def test_json_digest_and_usage_errors(tmp_path, capsys):
    ckpt = make_ckpt(tmp_path / "run", 1)
    assert main(["verify", "--json", "--digest", manifest_digest(ckpt), str(ckpt)]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["ok"] and result["verified"] and result["digest"] == manifest_digest(ckpt) and result["files"] == 6
    assert main(["verify", "--digest", "f" * 64, str(ckpt)]) == 1
    assert "digest" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "empty")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    make_ckpt(tmp_path / "run", 2)
    assert main(["verify", "--digest", "f" * 64, str(tmp_path / "run")]) == 2


def test_module_entry_point_does_not_import_torch(tmp_path):
    ckpt = make_ckpt(tmp_path / "run", 1)
    code = (
        "import sys, runpy; sys.argv = ['x', 'verify', sys.argv[1]]\n"
        "try:\n    runpy.run_module('scldm_scale.checkpoint', run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code == 0, e.code\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(ckpt)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("OK ")
