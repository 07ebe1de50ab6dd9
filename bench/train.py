"""Training throughput: tuneship's recipe against the article's, same machine, model and data.

    .venv/train/bin/python bench/train.py [--steps 10]      (or: make bench-train)

Each recipe trains the default base (SmolLM2-135M-Instruct) with the demo config's LoRA (r 16,
all linear layers) and precision on the demo data, for the same number of optimizer steps of 8
conversations, in its own child process (so peak memory is its own):

- article: `human: ... gpt: ...` text, padding="max_length" to 512, labels = input_ids,
  batch 2 x accumulation 4 (its published recipe; its faults are listed in shared/seed);
- tuneship: chat template, assistant-only labels, length-grouped dynamic padding, batch 8;
- tuneship-packed: the same, packed without padding.

Measured from the Trainer's own train_runtime: conversations/s, conversation tokens/s (padding
excluded), trained tokens/s (assistant tokens; for every recipe the same conversations' replies,
so the ratio equals the conversations/s ratio), peak RSS. Writes bench/results/train.json and
train.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DEMO = REPO / "train" / "configs" / "demo.yaml"
RECIPES = ("article", "tuneship", "tuneship-packed")
EFFECTIVE_BATCH = 8


def article(steps: int, out: Path) -> dict:
    """The article's preprocessing and Trainer set-up, on CPU (bf16 autocast like the demo)."""
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from tuneship.chat.records import load_files
    from tuneship.config.loading import load_config
    from tuneship.config.schema import TrainConfig
    from tuneship.train.base import resolve_base

    cfg = load_config(TrainConfig, DEMO)
    base = resolve_base(cfg.base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    convs = load_files([str(REPO / p) for p in cfg.data_paths]).conversations
    prompts = [
        "".join(
            f"{'human' if m['role'] == 'user' else 'gpt'}: {m['content']}\n"
            for m in c.messages
            if m["role"] != "system"
        )
        for c in convs
    ]
    enc = tokenizer(prompts, truncation=True, max_length=512, padding="max_length")
    rows = [
        {"input_ids": ids, "attention_mask": mask, "labels": list(ids)}
        for ids, mask in zip(enc["input_ids"], enc["attention_mask"], strict=True)
    ]
    set_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype="bfloat16")
    model = get_peft_model(
        model,
        LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules,
            task_type="CAUSAL_LM",
        ),
    )
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        learning_rate=2e-4,
        max_steps=steps,
        logging_steps=steps,
        save_strategy="no",
        bf16=True,
        use_cpu=True,
        report_to="none",
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
        seed=cfg.seed,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    result = trainer.train()
    return {
        "train_runtime_s": result.metrics["train_runtime"],
        "conversation_tokens": trainer.state.num_input_tokens_seen,
        "padded_tokens": steps * EFFECTIVE_BATCH * 512,
    }


def tuneship(steps: int, out: Path, batching: str) -> dict:
    from tuneship.config.loading import load_config
    from tuneship.config.schema import TrainConfig
    from tuneship.handoff.manifest import read_run
    from tuneship.train.run import run

    overrides = {
        "max_steps": steps,
        "batching": batching,
        "output_dir": str(out),
        "checkpoint_steps": None,
        "logging_steps": steps,
        "log_format": "json",
        "data": [str(REPO / p) for p in load_config(TrainConfig, DEMO).data_paths],
    }
    cfg = load_config(TrainConfig, DEMO, overrides)
    metrics = read_run(run(cfg)).metrics
    tokens = metrics.tokens_per_s * metrics.wall_s
    return {
        "train_runtime_s": metrics.wall_s,
        "conversation_tokens": round(tokens),
        "padded_tokens": None,
    }


def child(recipe: str, steps: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        if recipe == "article":
            result = article(steps, Path(tmp))
        else:
            batching = "packed" if recipe.endswith("packed") else "group_by_length"
            result = tuneship(steps, Path(tmp), batching)
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("BENCH " + json.dumps(result), flush=True)


def trained_tokens_per_conversation() -> float:
    """Mean assistant (+ end-of-turn) tokens per demo conversation: what training teaches."""
    from transformers import AutoTokenizer

    from tuneship.chat.labels import ChatTokenizer
    from tuneship.chat.records import load_files
    from tuneship.chat.template import align_eos
    from tuneship.config.loading import load_config
    from tuneship.config.schema import TrainConfig
    from tuneship.train.base import resolve_base

    cfg = load_config(TrainConfig, DEMO)
    tokenizer = AutoTokenizer.from_pretrained(resolve_base(cfg.base))
    align_eos(tokenizer)
    convs = load_files([str(REPO / p) for p in cfg.data_paths]).conversations
    examples = [ChatTokenizer(tokenizer)(c) for c in convs]
    return sum(e.trained_tokens for e in examples) / len(examples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per recipe")
    parser.add_argument("--child", choices=RECIPES, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        child(opts.child, opts.steps)
        return

    from rich.console import Console
    from rich.table import Table

    console = Console()
    per_conv = trained_tokens_per_conversation()
    results = {}
    for recipe in RECIPES:
        console.print(f"[bold]{recipe}[/]: {opts.steps} steps x {EFFECTIVE_BATCH} conversations")
        done = subprocess.run(
            [sys.executable, __file__, "--child", recipe, "--steps", str(opts.steps)],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        line = next((x for x in done.stdout.splitlines() if x.startswith("BENCH ")), None)
        if done.returncode or line is None:
            sys.exit(f"{recipe} failed:\n{done.stderr[-3000:]}")
        raw = json.loads(line.removeprefix("BENCH "))
        conversations = opts.steps * EFFECTIVE_BATCH
        seconds = raw["train_runtime_s"]
        results[recipe] = {
            "steps": opts.steps,
            "conversations": conversations,
            "seconds": round(seconds, 1),
            "conversations_per_s": round(conversations / seconds, 3),
            "conversation_tokens_per_s": round(raw["conversation_tokens"] / seconds, 1),
            "trained_tokens_per_s": round(conversations * per_conv / seconds, 1),
            "peak_rss_mib": round(raw["peak_rss_bytes"] / 2**20),
        }
    baseline = results["article"]["trained_tokens_per_s"]
    for row in results.values():
        row["speedup_vs_article"] = round(row["trained_tokens_per_s"] / baseline, 2)

    import platform

    import torch

    report = {
        "command": "make bench-train  (.venv/train/bin/python bench/train.py "
        f"--steps {opts.steps})",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}",
        "model": "SmolLM2-135M-Instruct (default base), LoRA r16 all linear, bf16 autocast",
        "data": "demo data (train.jsonl + general_replay.jsonl)",
        "trained_tokens_per_conversation": round(per_conv, 1),
        "results": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train.json").write_text(json.dumps(report, indent=2) + "\n")
    header = [
        "recipe", "conv/s", "conversation tok/s", "trained tok/s", "peak RSS MiB", "vs article",
    ]  # fmt: skip
    table = Table(*header, title="training throughput (CPU)")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for recipe, row in results.items():
        cells = [
            recipe,
            f"{row['conversations_per_s']:.2f}",
            f"{row['conversation_tokens_per_s']:.0f}",
            f"{row['trained_tokens_per_s']:.0f}",
            str(row["peak_rss_mib"]),
            f"{row['speedup_vs_article']:.2f}x",
        ]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    console.print(table)
    md = [
        f"Training throughput, {report['model']}, {report['data']}, {report['machine']}.",
        f"Command: `{report['command']}`.",
        "",
        *lines,
    ]
    (RESULTS / "train.md").write_text("\n".join(md) + "\n")
    console.print(f"written: {RESULTS / 'train.json'}, {RESULTS / 'train.md'}")


if __name__ == "__main__":
    main()
