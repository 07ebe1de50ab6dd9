"""The CLI: instant help, clear errors with non-zero exits and no tracebacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import TUNESHIP


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


def test_serve_options_are_generated_from_the_serve_config():
    import click

    from tuneship.cli import serve
    from tuneship.config.schema import ServeConfig

    options = {p.name for p in serve.params if isinstance(p, click.Option)}
    options -= {"config_path", "overrides", "dry_run", "help"}
    secret = {"api_keys", "key_id_secret"}  # never on a command line: environment or file
    assert options == set(ServeConfig.model_fields) - secret
    level = next(p for p in serve.params if p.name == "tool_strict_level")
    assert isinstance(level.type, click.Choice)  # a wrong value is named before anything starts
    assert list(level.type.choices) == ["auto", "function", "parameter"]


def test_serve_settings_layer_file_environment_set_and_options(tmp_path):
    from tuneship.config.loading import load_serve_config
    from tuneship.infra.errors import ConfigError

    path = tmp_path / "serve.yaml"
    path.write_text("max_running: 8\nmax_waiting: 4\ndrain_timeout: 10\nport: 9000\n")
    environ = {"TUNESHIP_MAX_WAITING": "16", "TUNESHIP_PORT": "9100", "TUNESHIP_HOME": "/x",
               "TUNESHIP_API_KEYS": "sk-1,sk-2", "TUNESHIP_METRICS_AUTH": "true"}  # fmt: skip
    cfg = load_serve_config(path, ["port=9200"], {"drain_timeout": 5.0, "host": None}, environ)
    assert (cfg.max_running, cfg.max_waiting, cfg.port, cfg.drain_timeout) == (8, 16, 9200, 5.0)
    assert cfg.metrics_auth and cfg.key_list() == ["sk-1", "sk-2"] and cfg.host == "0.0.0.0"
    digits = "0" * 64  # a sha256 pin of digits only stays text, not the number 0
    assert (
        load_serve_config(None, [], {}, {"TUNESHIP_BUNDLE_SHA256": digits}).bundle_sha256 == digits
    )
    with pytest.raises(ConfigError) as info:
        load_serve_config(None, [], {}, {"TUNESHIP_MAX_RUNNING": "lots"})
    assert "environment TUNESHIP_MAX_RUNNING: 'max_running'" in str(info.value)
    with pytest.raises(ConfigError, match="unknown key 'max_runing'; did you mean 'max_running'"):
        load_serve_config(None, ["max_runing=3"])
