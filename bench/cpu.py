"""Compute precision and 4-bit serving on the CPU at hand: what the rule picks
(tuneship/modelops/precision.py), against the alternatives, in one run.

    .venv/train/bin/python bench/cpu.py [--simulate avx2]      (or: make bench-cpu)

On the default base (SmolLM2-135M-Instruct; `tuneship base fetch`), each in fp32 and bf16:
- a 1024x576 by 576x1536 matmul (the shape of the model's MLP on a batch of 1024 tokens);
- a demo-shaped LoRA train step (r 16 on every linear layer, 8 conversations of 128 tokens,
  AdamW; bf16 as the Trainer runs it: weights in bf16 under autocast);
- GPTQ of one decoder layer (llm-compressor, 32 calibration rows of 256 tokens);
- vLLM decode, 64 tokens per request at 1 and 8 sequences: the 16-bit base in fp32 and bf16,
  and the base GPTQ'd to W4A16 through vLLM's 4-bit kernel (bf16; where it exists) and as the
  fp32 copy dequantized from it (serve/weights.py).
Rows the rule picks on this machine are marked. `--simulate avx2` runs everything as an AVX2-only
CPU would (scripts/avx2; figures marked simulated). Writes bench/results/cpu-CLASS.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
SERVE_PYTHON = REPO / ".venv" / "serve" / "bin" / "python"
AVX2 = {
    "PYTHONPATH": str(REPO / "scripts" / "avx2"),
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}
# vLLM with tuneship's production arguments, the weights and dtype given (argv: model dir,
# dtype, port, max length)
VLLM = (
    "import os, sys; from pathlib import Path; "
    "from tuneship.serve.run import build_command; from tuneship.serve.weights import Weights; "
    "w = Weights(Path(sys.argv[1]), sys.argv[2], 'bench', 'bench'); "
    "argv, env = build_command(w, 'bench', '127.0.0.1', int(sys.argv[3]), 'cpu', "
    "int(sys.argv[4])); os.execvpe(argv[0], argv, os.environ | env)"
)


def class_label(machine) -> str:
    """The CPU class figures are reported under (a modelops.precision.Capability)."""
    return ("amx" if machine.amx else "avx512-bf16" if machine.avx512_bf16 else
            "avx512" if machine.avx512 else "avx2")  # fmt: skip


def matmul(dtype: str) -> dict:
    import torch

    a = torch.randn(1024, 576).to(getattr(torch, dtype))
    b = torch.randn(576, 1536).to(getattr(torch, dtype))
    a @ b
    started = time.perf_counter()
    for _ in range(5):
        a @ b
    return {"ms": round((time.perf_counter() - started) / 5 * 1000, 1)}


def train_step(base: Path, dtype: str, steps: int = 3) -> dict:
    """Seconds per LoRA step at the demo's shape; the first step is not counted."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(100, 40000, (8, 128))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    times = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - started)
    step_s = sum(times[1:]) / steps
    return {"step_s": round(step_s, 2), "tokens_per_s": round(ids.numel() / step_s, 1)}


def gptq_layer(base: Path, dtype: str, work: Path) -> dict:
    """GPTQ of the first decoder layer (the model cut to one layer), calibrated on 32 rows."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneship.chat.records import Conversation
    from tuneship.config.schema import ExportConfig
    from tuneship.modelops.gptq import quantize

    one_layer = work / f"one-layer-{dtype}"
    model = AutoModelForCausalLM.from_pretrained(base, num_hidden_layers=1)
    model.save_pretrained(one_layer)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.save_pretrained(one_layer)
    words = "travel policy meal allowance receipt manager approval hotel flight budget " * 30
    sample = [
        Conversation(f"c{n}", "openai", ({"role": "user", "content": f"{n} {words}"},
                                         {"role": "assistant", "content": words}))
        for n in range(32)
    ]  # fmt: skip
    cfg = ExportConfig(calibration_samples=32, calibration_max_length=256)
    started = time.perf_counter()
    quantize(one_layer, tokenizer, sample, cfg, work / f"one-layer-w4a16-{dtype}",
             getattr(torch, dtype))  # fmt: skip
    return {"s": round(time.perf_counter() - started, 1)}


def missing_op(base: Path) -> dict:
    """The alternative to a dequantized copy where vLLM has no 4-bit CPU kernel: a torch
    implementation of the op (a vLLM plugin) that unpacks the 4-bit weights at every call, as
    compressed-tensors does. Measured here without vLLM around it: one decode step at batch 1
    through every linear layer of the model, against the fp32 copy's plain matmuls. This is
    the op's own cost, a lower bound for the plugin."""
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import (
        pack_to_int32,
        unpack_from_int32,
    )
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base)
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * h // config.num_attention_heads
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)] * config.num_hidden_layers
    layers = []
    for out_f, in_f in shapes:
        q = torch.randint(-8, 8, (out_f, in_f), dtype=torch.int8)
        scale = torch.rand(out_f, in_f // 64, dtype=torch.bfloat16) / 100
        layers.append((pack_to_int32(q, 4), scale, (out_f, in_f)))
    dense = [torch.randn(o, n) for o, n in shapes]

    def op_step() -> None:
        for packed, scale, shape in layers:
            x = torch.randn(1, shape[1])
            q = unpack_from_int32(packed, 4, torch.Size(shape)).float()
            w = (q.view(shape[0], -1, 64) * scale.float().unsqueeze(-1)).view(shape)
            x @ w.T

    def dense_step() -> None:
        for w in dense:
            torch.randn(1, w.shape[1]) @ w.T

    timed = {}
    for name, step in (("op", op_step), ("copy", dense_step)):
        step()
        started = time.perf_counter()
        for _ in range(3):
            step()
        timed[name] = (time.perf_counter() - started) / 3 * 1000
    params = sum(o * n for o, n in shapes)
    return {
        "op_ms_per_step": round(timed["op"], 1),
        "fp32_copy_ms_per_step": round(timed["copy"], 1),
        "op_weights_gb": round(params * (0.5 + 2 / 64) / 1e9, 3),
        "fp32_copy_weights_gb": round(params * 4 / 1e9, 3),
    }


def quantized_base(base: Path, work: Path, dtype: str) -> Path:
    """The whole base GPTQ'd to W4A16 (the bundle's recipe), for the vLLM rows."""
    import torch
    from transformers import AutoTokenizer

    from tuneship.chat.records import load_file
    from tuneship.config.schema import ExportConfig
    from tuneship.modelops.gptq import quantize

    out = work / "base-w4a16"
    tokenizer = AutoTokenizer.from_pretrained(base)
    sample = load_file(REPO / "data" / "demo" / "train.jsonl").conversations[:64]
    quantize(base, tokenizer, sample, ExportConfig(), out, getattr(torch, dtype))
    return out


def decode(model_dir: Path, dtype: str, env: dict) -> dict:
    from loadgen import prompts, sweep
    from transformers import AutoTokenizer

    from tuneship.infra.launch import Server, free_port

    port = free_port()
    argv = [str(SERVE_PYTHON), "-c", VLLM, str(model_dir), dtype, str(port), "1024"]
    texts = prompts(AutoTokenizer.from_pretrained(model_dir), 8, 128)
    log = Path(tempfile.gettempdir()) / f"tuneship-bench-cpu-{port}.log"
    with Server(argv, port, log, timeout_s=900, env=env) as server:
        rows = sweep("openai", server.base_url, "bench", texts, [1, 8], 64, lambda level: 8)
        peak = server.peak_rss_bytes()
    log.unlink(missing_ok=True)
    return {f"seq{r['concurrency']}_tok_s": r["output_tokens_per_s"] for r in rows} | {
        "peak_rss_gb": round(peak / 1e9, 2),
        "errors": sum(r["errors"] for r in rows),
    }


def child(task: str, args: list[str]) -> None:
    """One measurement in this process (run under the machine's environment), as JSON."""
    if task == "matmul":
        result = matmul(args[0])
    elif task == "train":
        result = train_step(Path(args[0]), args[1])
    elif task == "gptq":
        result = gptq_layer(Path(args[0]), args[1], Path(args[2]))
    elif task == "op":
        result = missing_op(Path(args[0]))
    else:
        quantized_base(Path(args[0]), Path(args[1]), args[2])
        result = {}
    print("RESULT " + json.dumps(result), flush=True)


def measure(env: dict, task: str, *args: str) -> dict:
    argv = [sys.executable, __file__, "--child", task, *args]
    done = subprocess.run(argv, capture_output=True, text=True, env=os.environ | env)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{task} {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--simulate", choices=["avx2"], help="Run as an AVX2-only CPU would.")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], args.child[1:])

    from tuneship.infra.paths import default_base_dir
    from tuneship.modelops.precision import Capability, pick
    from tuneship.serve.weights import dequantize

    env = AVX2 if args.simulate else {}
    cap = json.loads(subprocess.run(
        [sys.executable, "-c", "import json; from tuneship.modelops.precision import detect; "
         "print(json.dumps(detect().as_dict()))"],
        capture_output=True, text=True, env=os.environ | env, check=True,
    ).stdout)  # fmt: skip
    machine = Capability(**{k: v for k, v in cap.items() if k in Capability.__annotations__})
    picked = pick("auto", machine).name
    label = "avx2-simulated" if args.simulate else class_label(machine)
    base = default_base_dir()
    rows = []

    def row(what: str, precision: str, rule: bool, **figures) -> None:
        rows.append({"what": what, "precision": precision, "rule": rule, **figures})
        print(rows[-1], flush=True)

    with tempfile.TemporaryDirectory(prefix="tuneship-bench-cpu-") as tmp:
        work = Path(tmp)
        for name, dtype in (("fp32", "float32"), ("bf16", "bfloat16")):
            row("matmul 1024x576 @ 576x1536", name, name == picked, **measure(env, "matmul", dtype))
        for name, dtype in (("fp32", "float32"), ("bf16", "bfloat16")):
            row("LoRA train step, 8 x 128 tokens", name, name == picked,
                **measure(env, "train", str(base), dtype))  # fmt: skip
        for name, dtype in (("fp32", "float32"), ("bf16", "bfloat16")):
            row("GPTQ, one decoder layer", name, name == picked,
                **measure(env, "gptq", str(base), dtype, str(work)))  # fmt: skip
        row(
            "linear layers of one decode step, batch 1: a torch op unpacking W4A16 at every "
            "call vs the fp32 copy",
            "fp32",
            True,
            **measure(env, "op", str(base)),
        )
        picked_dtype = {"fp32": "float32", "bf16": "bfloat16"}[picked]
        measure(env, "quantize", str(base), str(work), picked_dtype)
        copy = work / "base-w4a16-dequantized"
        copy.mkdir()
        dequantize(work / "base-w4a16", copy)
        serving = [
            ("vLLM decode, 16-bit base", "fp32", base, "float32", picked == "fp32"),
            ("vLLM decode, 16-bit base", "bf16", base, "bfloat16", picked == "bf16"),
            ("vLLM decode, W4A16, fp32 copy dequantized", "fp32", copy, "float32",
             not (machine.wna16_kernel and picked == "bf16")),
        ]  # fmt: skip
        if machine.wna16_kernel:
            serving.append(("vLLM decode, W4A16 through vLLM's 4-bit kernel", "bf16",
                            work / "base-w4a16", "bfloat16", picked == "bf16"))  # fmt: skip
        for what, name, model_dir, dtype, rule in serving:
            row(what, name, rule, **decode(model_dir, dtype, env))
    result = {
        "class": label,
        "machine": machine.describe(),
        "cores": len(os.sched_getaffinity(0)),
        "simulated": bool(args.simulate),
        "rule_picks": picked,
        "command": "make bench-cpu" + (" ARGS='--simulate avx2'" if args.simulate else ""),
        "rows": rows,
    }
    write(result)


def write(result: dict) -> None:
    out = REPO / "bench" / "results"
    name = f"cpu-{result['class']}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"### {result['machine']}, {result['cores']} cores"
        + (" (simulated on an AVX512-BF16 CPU)" if result["simulated"] else ""),
        "",
        f"The rule picks {result['rule_picks']}; its rows are marked ✓.",
        "",
        "| what | precision | rule | figures |",
        "| --- | --- | :---: | --- |",
    ]
    for r in result["rows"]:
        figures = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("what", "precision",
                                                                          "rule"))  # fmt: skip
        lines.append(f"| {r['what']} | {r['precision']} | {'✓' if r['rule'] else ''} | {figures} |")
    lines += ["", f"Command: `{result['command']}`", ""]
    (out / f"{name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
