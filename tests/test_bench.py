"""The serving benchmarks run end to end at a toy scale: the numbers are not judged here (they
live in bench/results with their commands), only that each server was measured, every request
produced exactly the asked number of tokens, and the result files are complete."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support import REPO

pytestmark = pytest.mark.e2e
SERVE_PYTHON = REPO / ".venv" / "serve" / "bin" / "python"


def check_result(out, name: str, servers: set[str], levels: list[int], tokens: int) -> dict:
    result = json.loads((out / f"{name}.json").read_text())
    assert set(result["servers"]) == servers
    for server, data in result["servers"].items():
        rows = data["levels"]
        assert [r["concurrency"] for r in rows] == levels, server
        for row in rows:
            assert row["errors"] == 0, (server, row["first_error"])
            assert row["short_replies"] == 0 and row["output_tokens"] == row["requests"] * tokens
            assert row["output_tokens_per_s"] > 0 and row["ttft_p50_s"] > 0
    table = (out / f"{name}.md").read_text()
    # header, separator, one row per server and level
    assert table.count("\n| ") == 2 + len(servers) * len(levels) and "Command: `" in table
    assert (out / f"{name}.png").stat().st_size > 10_000
    return result


def test_serving_bench_measures_the_article_server_and_the_bundle(bundle, tmp_path):
    argv = [sys.executable, "bench/serve.py", "--bundle", str(bundle), "--levels", "1,3"]
    argv += ["--input-tokens", "24", "--output-tokens", "6", "--out", str(tmp_path)]
    argv += ["--name", "smoke", "--servers", "article,vllm-w4a16"]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = check_result(tmp_path, "smoke", {"article", "vllm-w4a16"}, [1, 3], 6)
    assert result["target"]["ratio"] is None  # concurrency 32 was not part of this sweep
    assert "vs article" in proc.stdout


def test_gpu_script_runs_at_toy_scale_on_cpu(tmp_path):
    """bench/serve_gpu.py with --tiny: the same two steps (train environment prepares the random
    Llama-3-shaped model and its RTN W4A16 quantization, serve environment sweeps vLLM)."""
    work = tmp_path / "work"
    prepare = [sys.executable, "bench/serve_gpu.py", "prepare", "--tiny", "--work", str(work)]
    proc = subprocess.run(prepare, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    quantization = json.loads((work / "w4a16" / "config.json").read_text())["quantization_config"]
    weights = quantization["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["actorder"]) == (4, 128, None)
    sweep = [str(SERVE_PYTHON), "bench/serve_gpu.py", "sweep", "--work", str(work)]
    sweep += ["--levels", "1,2", "--input-tokens", "16", "--output-tokens", "4"]
    sweep += ["--out", str(tmp_path), "--name", "gpu-smoke"]
    proc = subprocess.run(sweep, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu-smoke.json").read_text())
    assert set(result["servers"]) == {"vllm-bf16", "vllm-w4a16"}
    sizes = [result["servers"][s]["weights_bytes"] for s in ("vllm-bf16", "vllm-w4a16")]
    assert sizes[1] < sizes[0]
    for data in result["servers"].values():
        assert [r["errors"] for r in data["levels"]] == [0, 0]
        assert [r["output_tokens"] for r in data["levels"]] == [8 * 4, 8 * 4]
