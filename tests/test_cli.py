"""The CLI: instant help, clear errors with non-zero exits and no tracebacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import TRAIN_BIN

TUNESHIP = str(TRAIN_BIN)


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([TUNESHIP, *args], capture_output=True, text=True, cwd=cwd)


def test_help_imports_no_heavy_library():
    heavy = "{'torch', 'transformers', 'vllm'}"
    code = f"import sys, tuneship.cli; print(sorted({heavy} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert cli("--help").returncode == 0


def test_data_check_lists_invalid_records_and_exits_3(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{oops\n', encoding="utf-8")
    proc = cli("data", "check", str(path), "--no-tokens")
    assert proc.returncode == 3
    assert f"{path}:line 1: no assistant turn" in proc.stdout
    assert f"{path}:line 2: invalid JSON" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_bad_train_config_exits_2_naming_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ndata: [a.jsonl]\nlearning_rat: 1\n")
    proc = cli("train", "--config", str(path))
    assert proc.returncode == 2
    assert "unknown key 'learning_rat'; did you mean 'learning_rate'?" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_export_of_a_missing_run_and_serve_of_a_missing_bundle(tmp_path):
    proc = cli("export", str(tmp_path / "nope"), "--out", str(tmp_path / "b"))
    assert proc.returncode == 1 and "run.json not found" in proc.stderr
    proc = cli("serve", str(tmp_path / "nope"))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
