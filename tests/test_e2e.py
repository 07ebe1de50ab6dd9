"""End to end on the real default base: fetch, train a few steps, merge + GPTQ, serve with vLLM
(the serve environment, CPU), then talk to it with the official OpenAI SDK."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.request_mix import send_the_request_mix
from tests.support import AVX2_ENV, EXPENSE_TOOL, REPO, SERVE_BIN, tuneship
from tuneship.infra.launch import Server, free_port

pytestmark = pytest.mark.e2e

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_real_model_run_records_eval_loss_and_curves(bundle):
    run_dir = bundle.parent.parent / "runs" / "e2e"
    metrics = json.loads((run_dir / "run.json").read_text())["metrics"]
    assert [step for step, _ in metrics["eval_loss"]] == [2, 4]
    assert all(0 < loss < 10 for _, loss in metrics["eval_loss"])
    assert (run_dir / "loss.png").is_file() and (run_dir / "metrics.csv").is_file()


@pytest.fixture(scope="module")
def server(bundle):
    assert SERVE_BIN.exists(), f"serve environment missing at {SERVE_BIN}: run `make envs`"
    port = free_port()
    argv = [str(SERVE_BIN), "serve", str(bundle), "--host", "127.0.0.1", "--port", str(port)]
    with Server(argv, port, bundle.parent / "serve.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", timeout=120)


def test_bundle_is_quantized_and_smaller_than_the_merge(bundle):
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert manifest["quantization"]["group_size"] == 64  # 576 is not a multiple of 128
    assert manifest["sizes"]["model_bytes"] < 0.5 * manifest["sizes"]["merged_bytes"]
    assert manifest["checks"]["stop_tokens"]["end_of_turn"] == "<|im_end|>"


def test_export_checks_ran_through_vllm_and_passed(bundle):
    checks = json.loads((bundle / "bundle.json").read_text())["checks"]
    parity = checks["template_parity"]  # 12 plain prompts and 12 tool prompts with their tools
    assert parity["passed"] and parity["conversations"] == 24
    assert checks["stop_tokens"]["passed"] and checks["stop_tokens"]["stop_rate"]["prompts"] == 12
    preflight = checks["preflight"]
    assert preflight["passed"] and preflight["load_s"] > 0 and preflight["peak_rss_bytes"] > 1e8
    gate = checks["quality_gate"]
    assert gate["passed"] and gate["perplexity_ratio"] > 0 and gate["recall_merged"] is not None


def test_a_flipped_byte_makes_verify_and_serve_refuse(bundle, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    tuneship("bundle", "verify", str(copy), cwd=tmp_path)
    weights = copy / "model" / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.seek(weights.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))
    for command in (["bundle", "verify", str(copy)], ["serve", str(copy), "--dry-run"]):
        proc = subprocess.run([str(SERVE_BIN), *command], capture_output=True, text=True)
        assert proc.returncode == 1
        assert "model.safetensors: sha256 differs" in proc.stderr


def test_chat_reply_stops_on_its_own(client):
    reply = client.chat.completions.create(
        model="e2e", messages=QUESTION, max_tokens=200, temperature=0
    )
    choice = reply.choices[0]
    assert choice.message.content.strip()
    assert choice.finish_reason == "stop"


def test_streaming_yields_several_chunks(client):
    messages = [{"role": "user", "content": "Write a short paragraph about the sea."}]
    stream = client.chat.completions.create(
        model="e2e", messages=messages, max_tokens=24, temperature=0, stream=True
    )
    pieces = [
        c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content
    ]
    assert len(pieces) >= 3, pieces
    whole = client.chat.completions.create(
        model="e2e", messages=messages, max_tokens=24, temperature=0
    )
    assert "".join(pieces) == whole.choices[0].message.content


def test_the_sampling_parameters_users_send_leave_the_server_healthy(server):
    """The same request mix as the serve container gets (test_containers.py)."""
    send_the_request_mix(server.base_url)


def test_a_compiled_path_without_a_compiler_fails_start_up_naming_the_cause(bundle, tmp_path):
    """How the serve image died on its first logprobs request, on the host: vLLM's compiled
    logprobs helper put back (TORCH_COMPILE_DISABLE=0) and no C++ compiler for inductor to
    build it with (CXX names none), as in the image. The start-up self-test asks for logprobs,
    so serve stops before readiness, exit 1, the cause in one line; no user request meets it."""
    env = os.environ | {
        "TORCH_COMPILE_DISABLE": "0", "CXX": "/bin/false",
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),  # nothing compiled before
    }  # fmt: skip
    argv = [str(SERVE_BIN), "serve", str(bundle), "--host", "127.0.0.1", "--port",
            str(free_port())]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 1, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    assert errors[0].startswith("error: start-up self-test failed: chat with seed, penalties")
    assert "vLLM's engine died: torch._inductor.exc.InductorError: InvalidCxxCompiler" in errors[0]


TEXT = (
    "Under the travel policy, the daily meal allowance for domestic trips is 62 dollars, and "
    "receipts are required for anything above that."
)


def prompt_logprobs(base_url: str, model: str) -> list[float]:
    from openai import OpenAI

    reply = OpenAI(base_url=f"{base_url}/v1", api_key="unused").completions.create(
        model=model, prompt=TEXT, max_tokens=1, echo=True, logprobs=0, temperature=0
    )
    return reply.choices[0].logprobs.token_logprobs[1:-1]


def test_a_w4a16_bundle_is_served_where_vllm_has_no_4bit_kernel(bundle, tmp_path):
    """On an AVX2 CPU (simulated on this one, whatever its class: AVX2_ENV) vLLM's CPU build has
    no 4-bit kernel. serve says so at start, serves an fp32 copy dequantized from the bundle's
    own W4A16 tensors, /metrics says how, and the prompt's log-probabilities are those of the
    4-bit weights: transformers' own decompression of the bundle, in fp32."""
    import httpx
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig

    port = free_port()
    argv = [str(SERVE_BIN), "serve", str(bundle), "--host", "127.0.0.1", "--port", str(port)]
    env = AVX2_ENV | {"TUNESHIP_HOME": str(tmp_path / "home")}
    with Server(argv, port, tmp_path / "serve.log", env=env) as server:
        served = prompt_logprobs(server.base_url, "e2e")
        info = [line for line in httpx.get(f"{server.base_url}/metrics").text.splitlines()
                if line.startswith("tuneship_bundle_info{")]  # fmt: skip
    log = (tmp_path / "serve.log").read_text()
    assert "weights: W4A16 dequantized to an fp32 copy, computed in fp32 (vLLM's CPU build " in log
    assert "vLLM issue 55613" in log and "--dtype float32" in log
    assert 'served_as="W4A16 dequantized to an fp32 copy, computed in fp32"' in info[0]
    assert (tmp_path / "home" / "dequantized").is_dir()

    model_dir = bundle / "model"
    ids = AutoTokenizer.from_pretrained(model_dir)(TEXT, add_special_tokens=False).input_ids
    reference = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32,
        quantization_config=CompressedTensorsConfig(run_compressed=False),
    )  # fmt: skip
    with torch.no_grad():
        logprobs = reference(torch.tensor([ids])).logits.log_softmax(-1)[0]
    expected = [logprobs[i, ids[i + 1]].item() for i in range(len(ids) - 1)][: len(served)]
    assert len(served) > 20
    assert max(abs(a - b) for a, b in zip(served, expected, strict=True)) < 1e-3


def test_models_lists_the_bundle_name(client):
    assert [m.id for m in client.models.list().data] == ["e2e"]


def test_completions_endpoint(client):
    reply = client.completions.create(model="e2e", prompt="The capital of France is", max_tokens=5)
    assert reply.choices[0].text


def test_serving_without_keys_warns_at_start(server):
    assert "warning: no API keys configured" in server.log_path.read_text()


def test_metrics_expose_vllm_series(server, client):
    import httpx

    client.chat.completions.create(model="e2e", messages=QUESTION, max_tokens=4)
    text = httpx.get(f"{server.base_url}/metrics").text
    assert "vllm:generation_tokens_total" in text


def test_unknown_model_is_a_404_in_openai_error_shape(client):
    import openai

    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=QUESTION, max_tokens=4)
    error = info.value.body
    assert set(error) >= {"message", "type", "param", "code"}
    assert "nope" in error["message"]


def test_served_prompt_tokens_equal_the_training_tokens(server, bundle):
    """Template parity: vLLM renders the chat exactly as training did (one BOS, same ids)."""
    import httpx
    from transformers import AutoTokenizer

    from tuneship.chat.labels import ChatTokenizer
    from tuneship.chat.records import Conversation

    messages = [{"role": "user", "content": "国内出差每天的餐费补贴是多少?"}]
    served = httpx.post(
        f"{server.base_url}/tokenize",
        json={"model": "e2e", "messages": messages, "add_generation_prompt": True},
    ).json()["tokens"]
    tokenizer = AutoTokenizer.from_pretrained(bundle / "model")
    conv = Conversation("x", "openai", (*messages, {"role": "assistant", "content": "ok"}))
    trained = ChatTokenizer(tokenizer)(conv).input_ids
    assert trained[: len(served)] == served
    assert len(trained) > len(served)


def test_adapters_only_bundle_serves_each_adapter_through_vllm_multi_lora(bundle):
    work = bundle.parent.parent
    tuneship(
        "train", "--config", str(REPO / "train" / "configs" / "demo.yaml"),
        "--set", f"data=[{REPO / 'data' / 'demo' / 'train.jsonl'}]", "--set", "limit=16",
        "--set", "eval_data=null", "--set", "keep_best=false",
        "--set", "max_steps=2", "--set", "name=e2e-attn",
        "--set", "lora.target_modules=[q_proj, v_proj]", "--set", "lora.r=8", cwd=work,
    )  # fmt: skip
    tuneship(
        "export", "runs/e2e", "runs/e2e-attn", "--adapters-only", "--out", "bundles/multi",
        "--set", "check_samples=4", "--set", "min_stop_rate=0.5", cwd=work,
    )  # fmt: skip
    manifest = json.loads((work / "bundles" / "multi" / "bundle.json").read_text())
    assert manifest["layout"] == "adapters"
    preflight = manifest["checks"]["preflight"]
    assert preflight["passed"] and preflight["adapters_answered"] == ["e2e", "e2e-attn"]
    assert "--enable-lora" in preflight["args"]
    dry = subprocess.run(
        [str(SERVE_BIN), "serve", str(work / "bundles" / "multi"), "--dry-run"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "--lora-modules" in dry.stdout and "e2e-attn=" in dry.stdout


LMEVAL_BIN = REPO / ".venv" / "lmeval" / "bin" / "lm_eval"


def test_lm_eval_scores_the_served_endpoint(server, bundle, client, tmp_path):
    """lm-evaluation-harness's local-chat-completions model against `tuneship serve`, with the
    task that ships in eval/lm_eval_tasks (README, "Scoring with lm-eval")."""
    from tuneship.quality.facts import contains_fact

    assert LMEVAL_BIN.exists(), f"lm-eval environment missing at {LMEVAL_BIN}: run `make envs`"
    name = json.loads((bundle / "bundle.json").read_text())["served_model_name"]
    model_args = (
        f"model={name},base_url={server.base_url}/v1/chat/completions,"
        # one request at a time, like the direct calls below: the same batch shapes, so the
        # same greedy tokens
        "num_concurrent=1,max_retries=1"
    )
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OPENAI_API_KEY": "unused"}
    env |= {"HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [
            *(str(LMEVAL_BIN), "--model", "local-chat-completions", "--model_args", model_args),
            *("--tasks", "tuneship_handbook", "--include_path", "eval/lm_eval_tasks"),
            *("--apply_chat_template", "--limit", "6", "--log_samples"),
            *("--output_path", str(tmp_path / "out")),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    (samples_file,) = (tmp_path / "out").rglob("samples_tuneship_handbook_*.jsonl")
    score = json.loads(results_file.read_text())["results"]["tuneship_handbook"]["fact_recall,none"]
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert sorted(s["doc_id"] for s in samples) == list(range(6))
    heldout = [json.loads(x) for x in (REPO / "data/demo/heldout.jsonl").read_text().splitlines()]
    for sample in samples:
        row = heldout[sample["doc_id"]]
        reply = sample["resps"][0][0]
        assert sample["doc"]["question"] == row["question"]
        assert sample["fact_recall"] == float(contains_fact(reply, row["fact"]))
        # what lm-eval scored is what the endpoint answers (greedy, same budget)
        direct = client.chat.completions.create(
            model=name,
            messages=[{"role": "user", "content": row["question"]}],
            max_tokens=64,
            temperature=0,
        )
        assert reply.strip() == direct.choices[0].message.content.strip()
    assert score == pytest.approx(sum(s["fact_recall"] for s in samples) / len(samples))


def test_a_bundle_exported_without_vllm_is_checked_by_bundle_check(bundle, tmp_path):
    """checks=later (the train image has no vLLM): the export records the check plan, serving
    is refused until `tuneship bundle check` (serve environment) has run and recorded
    checks.json, which then makes `bundle verify` accept it."""
    run_dir = bundle.parent.parent / "runs" / "e2e"
    later = tmp_path / "later"
    # loosened as for the e2e bundle (a 4-step model's calls can be half-formed)
    tuneship(
        "export", str(run_dir), "--out", str(later), "--set", "checks=later",
        "--set", "calibration_samples=8", "--set", "check_samples=12",
        "--set", f"eval_data={REPO / 'data' / 'demo' / 'heldout.jsonl'}",
        "--set", "min_stop_rate=0.5", "--set", "max_perplexity_ratio=2.0",
        "--set", "max_recall_drop=100", "--set", "min_tool_parse_rate=0", cwd=tmp_path,
    )  # fmt: skip
    plan = json.loads((later / "bundle.json").read_text())["check_plan"]
    assert plan["tools"]["parser"] == "hermes" and plan["tools"]["merged_right"] is None
    assert len(plan["merged_answers"]) == 12  # the recall baseline, from transformers
    refused = subprocess.run(
        [str(SERVE_BIN), "serve", str(later), "--dry-run"], capture_output=True, text=True
    )
    assert refused.returncode == 1 and "checks not run yet" in refused.stderr
    done = subprocess.run(
        [str(SERVE_BIN), "bundle", "check", str(later)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((later / "checks.json").read_text())
    assert record["checks"]["template_parity"]["passed"]
    assert record["checks"]["quality_gate"]["recall_merged"] is not None
    tools = record["checks"]["tool_calls"]  # judged in the serve environment, with the parser
    assert tools["passed"] and tools["prompts"] == 12 and tools["right_calls"] is not None
    assert subprocess.run([str(SERVE_BIN), "bundle", "verify", str(later)]).returncode == 0


def test_the_bundle_carries_its_tool_parser_and_passed_the_tool_check(bundle):
    manifest = json.loads((bundle / "bundle.json").read_text())
    run = json.loads((bundle.parent.parent / "runs" / "e2e" / "run.json").read_text())
    assert run["tool_calling"]["template"] == "tuneship-chatml-hermes"
    assert manifest["serving"]["tool_parser"] == run["tool_calling"]["parser"] == "hermes"
    check = manifest["checks"]["tool_calls"]
    assert check["passed"] and check["parser"] == "hermes" and check["prompts"] == 12
    assert "sampled training conversations with calls" in check["data"]
    assert check["right_calls_merged"] is not None  # vLLM served the merged model as baseline


def submit_expense(amount: float, category: str) -> dict:
    assert isinstance(amount, int | float) and category in ("meals", "transport")
    return {"status": "submitted", "claim_id": "EXP-1042"}


def streamed_message(stream) -> dict:
    """A streamed reply put back together: its text, and its calls from their deltas."""
    text, calls, finish = "", {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        text += delta.content or ""
        for part in delta.tool_calls or []:
            call = calls.setdefault(part.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += part.id or ""
            call["name"] += (part.function and part.function.name) or ""
            call["arguments"] += (part.function and part.function.arguments) or ""
        finish = chunk.choices[0].finish_reason or finish
    tool_calls = [
        {"id": c["id"], "type": "function",
         "function": {"name": c["name"], "arguments": c["arguments"]}}
        for _, c in sorted(calls.items())
    ]  # fmt: skip
    return {"role": "assistant", "content": text, "tool_calls": tool_calls, "finish": finish}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_the_readme_tool_loop_through_the_sdk(client, stream):
    """The README's loop: the model calls, the function runs, its result goes back, the model
    answers. A 4-step model cannot be trusted to decide to call, so the first turn names the
    function (tool_choice) and the last asks for the answer (tool_choice none); the demo's
    fine-tuned model decides itself (`tuneship eval`'s tool figures)."""
    functions = {"submit_expense": submit_expense}
    messages: list = [{"role": "user", "content": "Please file my $42.50 taxi ride."}]
    named = {"type": "function", "function": {"name": "submit_expense"}}
    turns = []
    for choice in (named, "none"):
        ask = dict(model="e2e", messages=messages, tools=[EXPENSE_TOOL], tool_choice=choice,
                   max_tokens=64, temperature=0)  # fmt: skip
        if stream:
            message = streamed_message(client.chat.completions.create(**ask, stream=True))
        else:
            reply = client.chat.completions.create(**ask).choices[0]
            message = reply.message.model_dump(exclude_none=True) | {"finish": reply.finish_reason}
        turns.append(message)
        messages.append({k: v for k, v in message.items() if k != "finish"})
        for call in message.get("tool_calls") or []:
            arguments = json.loads(call["function"]["arguments"])  # guided by the schema
            result = functions[call["function"]["name"]](**arguments)
            messages.append(
                {"role": "tool", "tool_call_id": call["id"], "content": json.dumps(result)}
            )
    called, answered = turns
    assert [c["function"]["name"] for c in called["tool_calls"]] == ["submit_expense"]
    assert called["tool_calls"][0]["id"], called
    assert messages[2]["role"] == "tool" and "EXP-1042" in messages[2]["content"]
    assert not answered.get("tool_calls") and answered["content"].strip()
    assert answered["finish"] in ("stop", "length")


def test_a_schema_the_call_grammar_cannot_hold_is_a_400_and_the_server_stays_up(client):
    """At tool_strict_level parameter vLLM compiles each tool's schema into the grammar of a
    call; one it cannot compile (a look-behind in a pattern) is the client's 400, never a 500,
    and the next request is served."""
    import openai

    lookbehind = json.loads(json.dumps(EXPENSE_TOOL))
    lookbehind["function"]["parameters"]["properties"]["category"] = {
        "type": "string", "pattern": "(?<=x)y"}  # fmt: skip
    ask = dict(model="e2e", messages=[{"role": "user", "content": "File $12 for lunch."}],
               max_tokens=16, temperature=0)  # fmt: skip
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(**ask, tools=[lookbehind], tool_choice="auto")
    assert refused.value.status_code == 400
    assert client.chat.completions.create(**ask, tools=[EXPENSE_TOOL]).choices[0].message


def test_tool_choice_auto_and_required_are_served_with_the_bundles_parser(client):
    ask = dict(model="e2e", messages=[{"role": "user", "content": "File $12 for lunch."}],
               tools=[EXPENSE_TOOL], max_tokens=64, temperature=0)  # fmt: skip
    required = client.chat.completions.create(**ask, tool_choice="required").choices[0].message
    (call,) = required.tool_calls
    assert call.function.name == "submit_expense"
    assert set(json.loads(call.function.arguments)) >= {"amount", "category"}
    auto = client.chat.completions.create(**ask, tool_choice="auto").choices[0]  # no 400
    assert auto.message.tool_calls or auto.message.content is not None
