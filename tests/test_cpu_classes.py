"""The whole path on a CPU whose vLLM has no 4-bit kernel, on any machine: NO_KERNEL_ENV hides
AVX-512 from vLLM's choice of library (as on an AVX2 CPU) and leaves the rest as it is, so
training computes in whatever the host's rule gives (bf16 where native). Each stage must record
the precision it computed in, and the W4A16 bundle must be checked and served all the same."""

from __future__ import annotations

import json

import pytest

from tests.support import NO_KERNEL_ENV, SERVE_BIN, sharegpt, tuneship, write_config, write_jsonl
from tuneship.infra.launch import Server, free_port
from tuneship.modelops.precision import detect, pick

pytestmark = pytest.mark.e2e


def test_the_tiny_path_without_vllms_4bit_kernel(tmp_path, servable_tiny_base):
    expected = pick("auto", detect()).name  # the host's rule: hiding the kernel keeps it
    env = NO_KERNEL_ENV | {"TUNESHIP_HOME": str(tmp_path / "home")}
    data = write_jsonl(
        tmp_path / "d.jsonl",
        [sharegpt(("human", f"Policy {i}?"), ("gpt", f"Policy {i} says ${i}.")) for i in range(16)],
    )
    config = write_config(
        tmp_path,
        servable_tiny_base,
        data,
        name="tiny",
        precision="auto",
        max_steps=30,
        learning_rate=1e-2,
    )
    tuneship("train", "--config", str(config), cwd=tmp_path, env=env)
    run = json.loads((tmp_path / "runs" / "tiny" / "run.json").read_text())
    assert run["device"]["precision"] == expected, run["device"]

    # a random 2-layer model neither stops nor recalls: only the thresholds are loosened
    export = tuneship(
        "export", "runs/tiny", "--out", "bundles/tiny", "--set", "calibration_samples=4",
        "--set", "check_samples=4", "--set", "check_max_tokens=8", "--set", "min_stop_rate=0",
        "--set", "max_perplexity_ratio=1000", "--set", "max_recall_drop=100",
        cwd=tmp_path, env=env,
    )  # fmt: skip
    bundle = json.loads((tmp_path / "bundles" / "tiny" / "bundle.json").read_text())
    assert bundle["compute"]["precision"] == expected
    preflight = bundle["checks"]["preflight"]
    assert preflight["passed"], preflight
    served_as = f"W4A16 dequantized to an fp32 copy, computed in {expected}"
    assert preflight["served_as"].startswith(served_as), preflight
    assert "vLLM issue 55613" in export.stdout

    port = free_port()
    argv = [str(SERVE_BIN), "serve", str(tmp_path / "bundles" / "tiny"), "--host", "127.0.0.1",
            "--port", str(port)]  # fmt: skip
    with Server(argv, port, tmp_path / "serve.log", env=env) as server:
        from openai import OpenAI

        client = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
        reply = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Policy 3?"}], max_tokens=4
        )
        assert reply.usage.completion_tokens > 0
    log = (tmp_path / "serve.log").read_text()
    assert f"weights: {served_as} (vLLM's CPU build has no 4-bit kernel" in log
