"""The families users fine-tune, each through every stage: train with the default settings,
export (16-bit merge, GPTQ W4A16, the vLLM checks: template parity with the family's own chat
template, stop tokens, preflight), `tuneship serve`, and an OpenAI SDK chat. Tiny random-weight
models built in the test (tests/families.py), their tokenizers keeping each family's template
conventions. What each family needed is listed in docs/stages.md, "Model families"."""

from __future__ import annotations

import json

import pytest

from tests.families import FAMILIES, Family, build_family_base
from tests.support import SERVE_BIN, sharegpt, tuneship, write_config, write_jsonl
from tuneship.infra.launch import Server, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.families]


def conversations(family: Family) -> list[dict]:
    system = [("system", "Answer from the handbook.")] if family.system_role else []
    return [
        sharegpt(*system, ("human", f"What does policy {i} say?"), ("gpt", f"Policy {i}: ${i}."))
        for i in range(16)
    ]


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_a_family_trains_exports_and_serves(family, tmp_path):
    base = build_family_base(family, tmp_path / "base")
    data = write_jsonl(tmp_path / "train.jsonl", conversations(family))
    # the family's defaults: LoRA targets, dropout and precision resolved from the model
    config = write_config(tmp_path, base, data, name="fam", max_steps=30, learning_rate=1e-2,
                          lora={"r": 4, "alpha": 8}, precision="auto")  # fmt: skip
    env = {"TUNESHIP_HOME": str(tmp_path / "home")}
    tuneship("train", "--config", str(config), cwd=tmp_path, env=env)
    run = json.loads((tmp_path / "runs" / "fam" / "run.json").read_text())
    targets = run["lora_targets"]
    assert targets["modules"] and "gate" not in targets["modules"]  # never a router
    assert bool(targets["parameters"]) is family.moe  # experts adapted where they are tensors

    # random models neither stop nor recall: only those thresholds are loosened
    tuneship(
        "export", "runs/fam", "--out", "bundles/fam", "--set", "calibration_samples=8",
        "--set", "check_samples=4", "--set", "check_max_tokens=8", "--set", "min_stop_rate=0",
        "--set", "max_perplexity_ratio=1000", "--set", "max_recall_drop=100",
        cwd=tmp_path, env=env,
    )  # fmt: skip
    bundle = tmp_path / "bundles" / "fam"
    checks = json.loads((bundle / "bundle.json").read_text())["checks"]
    assert checks["template_parity"]["passed"], checks["template_parity"]
    assert checks["stop_tokens"]["passed"] and checks["preflight"]["passed"]

    port = free_port()
    argv = [str(SERVE_BIN), "serve", str(bundle), "--host", "127.0.0.1", "--port", str(port)]
    with Server(argv, port, tmp_path / "serve.log", env=env) as server:
        from openai import OpenAI

        client = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="fam", messages=[{"role": "user", "content": "What does policy 3 say?"}],
            max_tokens=6, temperature=0,
        )  # fmt: skip
        assert reply.usage.completion_tokens > 0
    log = (tmp_path / "serve.log").read_text()
    assert "weights: " in log and ('"passed": true' in log)
