"""The families users fine-tune, each through every stage: train with the default settings,
export (16-bit merge, GPTQ W4A16, the vLLM checks: template parity with the family's own chat
template, stop tokens, preflight), `tuneship serve`, and an OpenAI SDK chat. Tiny random-weight
models built in the test (tests/families.py), their tokenizers keeping each family's template
conventions. What each family needed is listed in docs/stages.md, "Model families".

Llama runs as on a CPU whose vLLM lacks the 4-bit kernel (NO_KERNEL_ENV: an AVX2 CPU's vLLM
library, native bf16 kept where the host has it): each stage must record the precision the
host's rule gives, and the bundle must be checked and served from its dequantized copy.

The families run two at a time (each path is mostly separate processes starting vLLM, a
single-threaded import): the matrix takes half the wall time of one after the other, and one
test reports every family that failed, each with its error."""

from __future__ import annotations

import json
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.families import FAMILIES, Family, build_family_base
from tests.support import NO_KERNEL_ENV, SERVE_BIN, sharegpt, tuneship, write_config, write_jsonl
from tuneship.infra.launch import Server, free_port
from tuneship.modelops.precision import detect, pick

pytestmark = [pytest.mark.e2e, pytest.mark.families]
AT_ONCE = 2


TOOLED = "qwen2"  # the family whose data also calls a tool (ChatML: tuneship's tool template)
CURRENCY = {
    "type": "function",
    "function": {
        "name": "set_currency",
        "description": "Set the claim currency.",
        "parameters": {
            "type": "object",
            "properties": {"currency": {"type": "string", "enum": ["EUR", "USD"]}},
            "required": ["currency"],
            "additionalProperties": False,
        },
    },
}


def conversations(family: Family) -> list[dict]:
    system = [("system", "Answer from the handbook.")] if family.system_role else []
    chats = [
        sharegpt(*system, ("human", f"What does policy {i} say?"), ("gpt", f"Policy {i}: ${i}."))
        for i in range(16)
    ]
    if family.name == TOOLED:
        chats += [tool_chat(currency) for currency in ("EUR", "USD") * 4]
    return chats


def tool_chat(currency: str) -> dict:
    call = {"type": "function", "function": {"name": "set_currency",
                                             "arguments": {"currency": currency}}}  # fmt: skip
    return {
        "tools": [CURRENCY],
        "messages": [
            {"role": "user", "content": f"Claim it in {currency}."},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "ok"},
            {"role": "assistant", "content": f"Set to {currency}."},
        ],
    }


def through_every_stage(family: Family, work: Path, base: Path) -> None:
    data = write_jsonl(work / "train.jsonl", conversations(family))
    # the family's defaults: LoRA targets, dropout and precision resolved from the model
    config = write_config(work, base, data, name="fam", max_steps=30, learning_rate=1e-2,
                          lora={"r": 4, "alpha": 8}, precision="auto")  # fmt: skip
    no_kernel = family.name == "llama"
    env = {"TUNESHIP_HOME": str(work / "home"), **(NO_KERNEL_ENV if no_kernel else {})}
    tuneship("train", "--config", str(config), cwd=work, env=env)
    run = json.loads((work / "runs" / "fam" / "run.json").read_text())
    precision = pick("auto", detect()).name  # the host's rule: hiding the kernel keeps it
    assert run["device"]["precision"] == precision, run["device"]
    if family.name == TOOLED:
        assert run["tool_calling"]["parser"] == "hermes", run["tool_calling"]
    targets = run["lora_targets"]
    assert targets["modules"] and "gate" not in targets["modules"], targets  # never a router
    assert bool(targets["parameters"]) is family.moe, targets  # experts where they are tensors

    # random models neither stop nor recall: only those thresholds are loosened
    tuneship(
        "export", "runs/fam", "--out", "bundles/fam", "--set", "calibration_samples=8",
        "--set", "check_samples=4", "--set", "check_max_tokens=8", "--set", "min_stop_rate=0",
        "--set", "max_perplexity_ratio=1000", "--set", "max_recall_drop=100",
        cwd=work, env=env,
    )  # fmt: skip
    bundle = work / "bundles" / "fam"
    manifest = json.loads((bundle / "bundle.json").read_text())
    checks = manifest["checks"]
    assert checks["template_parity"]["passed"], checks["template_parity"]
    assert checks["stop_tokens"]["passed"] and checks["preflight"]["passed"], checks
    assert manifest["compute"]["precision"] == precision
    assert manifest["serving"]["tool_parser"] == ("hermes" if family.name == TOOLED else None)
    copy = f"W4A16 dequantized to an fp32 copy, computed in {precision}"
    if no_kernel or family.moe:  # vLLM's CPU build has no 4-bit MoE kernel either
        assert checks["preflight"]["served_as"].startswith(copy), checks["preflight"]

    port = free_port()
    argv = [str(SERVE_BIN), "serve", str(bundle), "--host", "127.0.0.1", "--port", str(port)]
    with Server(argv, port, work / "serve.log", env=env) as server:
        from openai import OpenAI

        client = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="fam", messages=[{"role": "user", "content": "What does policy 3 say?"}],
            max_tokens=6, temperature=0,
        )  # fmt: skip
        assert reply.usage.completion_tokens > 0
        tool_requests(client, tooled=family.name == TOOLED)
    log = (work / "serve.log").read_text()
    assert "weights: " in log and '"event": "self_test", "passed": true' in log
    if no_kernel:
        assert f"weights: {copy} (vLLM's CPU build has no 4-bit kernel without AVX-512" in log


def tool_requests(client, tooled: bool) -> None:
    """A bundle trained on tool calls serves them with its parser: a named or required
    tool_choice gets a call of that function, its arguments held to the schema where the tool
    is `strict` (as OpenAI documents; a random model's free arguments are anything), auto is
    accepted. One trained without: auto is a 400 naming what is missing, never a 500."""
    import openai

    strict = {"type": "function", "function": {**CURRENCY["function"], "strict": True}}
    ask = {"model": "fam", "messages": [{"role": "user", "content": "Claim it in USD."}],
           "tools": [strict], "max_tokens": 200, "temperature": 0}  # fmt: skip
    if not tooled:
        with pytest.raises(openai.BadRequestError, match="tool"):
            client.chat.completions.create(**ask, tool_choice="auto")
        return
    named = {"type": "function", "function": {"name": "set_currency"}}
    for choice in (named, "required"):
        reply = client.chat.completions.create(**ask, tool_choice=choice).choices[0].message
        (made,) = reply.tool_calls
        assert made.function.name == "set_currency"
        assert json.loads(made.function.arguments)["currency"] in ("EUR", "USD")
    client.chat.completions.create(**ask, tool_choice="auto")  # accepted: a parser is set


def test_every_family_trains_exports_and_serves(tmp_path):
    # built here, one after the other: transformers' lazy module is not safe to import from two
    # threads at once (seen: "module 'transformers' has no attribute 'Qwen2Config'")
    bases = {f.name: build_family_base(f, tmp_path / f.name / "base") for f in FAMILIES}

    def attempt(family: Family) -> str | None:
        try:
            through_every_stage(family, tmp_path / family.name, bases[family.name])
        except Exception:  # every family's failure, reported together
            return f"{family.name}:\n{traceback.format_exc(limit=3)}"
        return None

    with ThreadPoolExecutor(AT_ONCE) as pool:
        failures = [f for f in pool.map(attempt, FAMILIES) if f]
    assert not failures, "\n\n".join(failures)


def test_the_served_architectures_are_the_pinned_vllm_registry():
    """tuneship/modelops/served_architectures.py, which train checks a base against, is what the
    serve environment's vLLM registers (regenerate it with scripts/served_architectures.py)."""
    import subprocess

    from tuneship.modelops import served_architectures as listed

    code = (
        "import json, sys; sys.path.insert(0, 'scripts'); "
        "from served_architectures import registry; print(json.dumps(registry()))"
    )
    repo = Path(__file__).resolve().parents[1]
    serve_python = str(SERVE_BIN.with_name("python"))
    out = subprocess.run(
        [serve_python, "-c", code], capture_output=True, text=True, check=True, cwd=repo
    )
    version, names, backend = json.loads(out.stdout.strip().splitlines()[-1])
    installed = (version, frozenset(names), frozenset(backend))
    listed_here = (listed.VLLM_VERSION, listed.VLLM_ARCHITECTURES, listed.THROUGH_TRANSFORMERS)
    assert installed == listed_here, "rerun: .venv/serve/bin/python scripts/served_architectures.py"
