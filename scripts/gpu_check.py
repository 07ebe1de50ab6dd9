"""GPU check: 10 LoRA and 10 QLoRA steps of a Llama-3-8B-architecture model on one GPU, at the
shipped configs' batch and length, with peak GPU memory and tokens/s beside the fit estimate
(and the step-time estimate's tokens/s, for a GPU its table knows).

    python scripts/gpu_check.py --work /scratch/gpu-check        (one H100/H200, train image)

No model hub: the model is Llama-3-8B's architecture (32 layers, hidden 4096, MLP 14336, 32
query / 8 KV heads, 128256-token vocabulary) with random weights, written once to WORK/base.
The tokenizer is the embedded default base's (or --tokenizer DIR); its ids are all below the
model's 128k vocabulary, so the output layer and the loss are the real model's size. Each check
is `tuneship train` in its own process (its peak memory is its own) on synthetic conversations
longer than max_length (truncated to it, so every packed batch is full):
- lora: train/configs/llama3-8b-lora-8gpu-ddp.yaml on one GPU (its per-GPU batch 8 x 4096);
- qlora: train/configs/llama3-8b-qlora-1gpu.yaml (batch 4 x 2048); skipped, with the reason,
  without CUDA or bitsandbytes.
Evaluation, checkpoints and gradient accumulation are off (peak memory is per micro-batch).
Peak memory is torch's max_memory_allocated (run.json); the estimate is train/estimate.py's.
Writes WORK/gpu-check.json and prints a table. `--tiny` (with --batch-size/--max-length) runs
a 2-layer model: the CPU test.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "train" / "configs"
CHECKS = {"lora": "llama3-8b-lora-8gpu-ddp.yaml", "qlora": "llama3-8b-qlora-1gpu.yaml"}
LLAMA3_8B = {
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "rope_theta": 500000.0, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
}  # fmt: skip
TINY = LLAMA3_8B | {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2,
}  # fmt: skip
GiB = 2**30


def build_base(work: Path, tiny: bool, tokenizer_from: Path | None) -> Path:
    """Random Llama-3-8B-architecture weights in bf16, with a tokenizer; kept across runs."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    base = work / ("base-tiny" if tiny else "base")
    if (base / "config.json").is_file():
        return base
    if tokenizer_from is None:
        from tuneship.train.base import fetch

        tokenizer_from = fetch()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    config = LlamaConfig(**(TINY if tiny else LLAMA3_8B), tie_word_embeddings=False)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    return base


def write_data(path: Path, conversations: int, words: int) -> Path:
    """Conversations with replies of `words` random words (longer than max_length tokens)."""
    rng = random.Random(0)
    vocabulary = [f"{a}{b}" for a in "bcdfghklmnprst" for b in ("a", "e", "i", "o", "u", "y")]
    rows = [
        {
            "conversations": [
                {"from": "human", "value": f"Question {i}?"},
                {"from": "gpt", "value": " ".join(rng.choices(vocabulary, k=words))},
            ]
        }
        for i in range(conversations)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def check_config(name: str, base: Path, work: Path, args: argparse.Namespace, cuda: bool):
    from tuneship.config.loading import load_config
    from tuneship.config.schema import TrainConfig

    shipped = load_config(TrainConfig, CONFIGS / CHECKS[name])
    batch = args.batch_size or shipped.batch_size
    length = args.max_length or shipped.max_length
    data = write_data(work / f"{name}.jsonl", batch * args.steps + batch, length)
    overrides = {
        "name": f"gpu-check-{name}", "base": str(base), "data": [str(data)],
        "eval_data": None, "eval_fraction": 0.0, "early_stopping_patience": None,
        "keep_best": False, "max_steps": args.steps, "grad_accum": 1, "batch_size": batch,
        "max_length": length, "overlong": "truncate", "checkpoint_steps": None,
        "metrics_port": None, "log_format": "json", "output_dir": str(work / "runs"),
        "warmup_steps": 0, "precision": "bf16" if cuda else "fp32",
    }  # fmt: skip
    return load_config(TrainConfig, CONFIGS / CHECKS[name], overrides)


def skip_reason(name: str, cuda: bool) -> str | None:
    if name != "qlora":
        return None
    if not cuda:
        return "QLoRA needs CUDA (bitsandbytes' 4-bit layers); no GPU here"
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        return f"bitsandbytes is not installed ({exc})"
    return None


def run_check(name: str, base: Path, work: Path, args: argparse.Namespace) -> dict:
    import torch

    from tuneship.train.estimate import (
        GPUS,
        detected_gpu,
        detected_gpu_memory,
        estimate,
        model_shape,
        readable,
        step_time,
    )

    cuda = torch.cuda.is_available()
    reason = skip_reason(name, cuda)
    if reason:
        return {"skipped": reason}
    cfg = check_config(name, base, work, args, cuda)
    cfg_path = work / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")), encoding="utf-8")
    argv = [sys.executable, "-m", "tuneship", "train", "--config", str(cfg_path), "--force"]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        return {"failed": done.stderr[-3000:]}
    metrics = json.loads((work / "runs" / cfg.name / "run.json").read_text())["metrics"]
    shape = model_shape(str(base), cfg)
    fit = estimate(shape, cfg, 1, detected_gpu_memory())
    gpu = detected_gpu()
    speed = step_time(shape, cfg, 1, GPUS[gpu]) if gpu else None
    return {
        "config": CHECKS[name],
        "batch_size": cfg.batch_size,
        "max_length": cfg.max_length,
        "steps": metrics["steps"],
        "tokens_per_s": metrics["tokens_per_s"],
        "peak_memory_bytes": metrics["peak_memory_bytes"],
        "estimate_bytes": fit["total"],
        "estimate": readable(fit),
        "gpu": gpu,
        "estimate_tokens_per_s": speed["tokens_per_s"] if speed else None,
        "cuda": metrics["cuda"],
    }


def table(results: dict) -> str:
    lines = [
        "| check | batch x length | tokens/s | estimated tokens/s | peak memory | estimate |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if "peak_memory_bytes" not in r:
            lines.append(f"| {name} | {r.get('skipped') or 'failed'} | | | | |")
            continue
        lines.append(
            f"| {name} | {r['batch_size']} x {r['max_length']} | {r['tokens_per_s']} | "
            f"{r['estimate_tokens_per_s'] or '-'} | {r['peak_memory_bytes'] / GiB:.2f} GiB | "
            f"{r['estimate_bytes'] / GiB:.2f} GiB |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="Scratch folder (~17 GB).")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="A 2-layer model (CPU test).")
    parser.add_argument(
        "--tokenizer", type=Path, help="Tokenizer folder (default: the default base's)."
    )
    parser.add_argument("--batch-size", type=int, help="Instead of the shipped configs' batch.")
    parser.add_argument("--max-length", type=int, help="Instead of the shipped configs' length.")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    base = build_base(args.work, args.tiny, args.tokenizer)
    results = {name: run_check(name, base, args.work, args) for name in CHECKS}
    (args.work / "gpu-check.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    return 1 if any("failed" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
