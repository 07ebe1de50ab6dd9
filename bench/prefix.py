"""Shared prefixes in training (train/loss.py, `share_prefix`): one step's time with the batch's
common prefix run once, against every row run whole, same process, model and batches.

    .venv/train/bin/python bench/prefix.py [--repeats 3]

The demo config's model (SmolLM2-135M-Instruct with its LoRA adapter, the run's precision) takes
full training steps (forward, chunked loss, backward) on batches of 8 demo conversations: tool
sessions (the three tools listed in each system turn), handbook chats (the base's own short
system prompt) and both mixed. Writes bench/results/prefix-<CPU class>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DEMO = REPO / "train" / "configs" / "demo.yaml"
ROWS = 8


def batches(tokenizer) -> dict[str, list]:
    from tuneship.chat.labels import ChatTokenizer
    from tuneship.chat.records import load_files

    to_example = ChatTokenizer(tokenizer)
    tools = load_files([REPO / "data/demo/tool_train.jsonl"]).conversations
    chats = load_files([REPO / "data/demo/train.jsonl"]).conversations
    tool_rows = [to_example(c) for c in tools[:ROWS]]
    chat_rows = [to_example(c) for c in chats[:ROWS]]
    return {
        "tool sessions": tool_rows,
        "handbook chats": chat_rows,
        "mixed (4 + 4)": tool_rows[:4] + chat_rows[:4],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per batch and mode")
    opts = parser.parse_args()

    import torch
    from cpu import class_label  # bench/cpu.py, beside this script
    from rich.console import Console
    from rich.table import Table
    from transformers import AutoTokenizer, TrainingArguments

    from tuneship.chat import tool_template
    from tuneship.chat.template import align_eos
    from tuneship.config.loading import load_config
    from tuneship.config.schema import TrainConfig
    from tuneship.modelops.precision import compute_precision
    from tuneship.train.base import resolve_base
    from tuneship.train.examples import pad_collate
    from tuneship.train.loss import LossTrainer, shared_prefix
    from tuneship.train.model import load_model

    console = Console()
    cfg = load_config(TrainConfig, DEMO)
    base = resolve_base(cfg.base)
    precision, machine = compute_precision(cfg.precision)
    tokenizer = AutoTokenizer.from_pretrained(base)
    align_eos(tokenizer)
    tool_template.apply(tokenizer, tool_template.tool_format(tokenizer))
    model = load_model(cfg, base, precision.torch_dtype, rank=0, world=1)
    collate = pad_collate(tokenizer.pad_token_id or 0)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, use_cpu=True, report_to="none", bf16=precision.name == "bf16"
        )
        trainers = {
            share: LossTrainer(
                model=model, args=args, loss_chunk=cfg.loss_chunk, share_prefix=share
            )
            for share in (False, True)
        }
        for trainer in trainers.values():
            trainer.current_gradient_accumulation_steps = 1  # set by train() otherwise
        for name, rows in batches(tokenizer).items():
            batch = collate([{"input_ids": r.input_ids, "labels": r.labels} for r in rows])
            tokens = int(batch["attention_mask"].sum())
            prefix = shared_prefix(batch["input_ids"], batch["attention_mask"])
            seconds = {}
            for share, trainer in trainers.items():
                trainer.training_step(model, dict(batch))  # warm-up
                start = time.perf_counter()
                for _ in range(opts.repeats):
                    trainer.training_step(model, dict(batch))
                seconds[share] = (time.perf_counter() - start) / opts.repeats
                model.zero_grad()
            results[name] = {
                "rows": len(rows),
                "tokens": tokens,
                "padded_to": int(batch["input_ids"].shape[1]),
                "shared_prefix": prefix,
                "step_s_whole": round(seconds[False], 2),
                "step_s_shared": round(seconds[True], 2),
                "speedup": round(seconds[False] / seconds[True], 2),
            }
            console.print(name, results[name])
    cpu = machine.describe()
    report = {
        "command": f".venv/train/bin/python bench/prefix.py --repeats {opts.repeats}",
        "machine": f"{cpu}, {torch.get_num_threads()} threads, {platform.machine()}",
        "precision": precision.name,
        "model": "SmolLM2-135M-Instruct (default base), the demo config's LoRA",
        "results": results,
    }
    slug = class_label(machine)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"prefix-{slug}.json").write_text(json.dumps(report, indent=2) + "\n")
    header = ["batch of 8", "tokens", "padded to", "shared prefix", "step whole s",
              "step shared s", "speed-up"]  # fmt: skip
    table = Table(*header, title=f"shared prefixes in training ({cpu})")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in results.items():
        cells = [name, str(row["tokens"]), str(row["padded_to"]), str(row["shared_prefix"]),
                 f"{row['step_s_whole']:.2f}", f"{row['step_s_shared']:.2f}",
                 f"{row['speedup']:.2f}x"]  # fmt: skip
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    console.print(table)
    md = [
        f"Shared prefixes in training: {report['model']}, {report['precision']}, "
        f"{report['machine']}.",
        f"Command: `{report['command']}`.",
        "",
        *lines,
    ]
    (RESULTS / f"prefix-{slug}.md").write_text("\n".join(md) + "\n")
    console.print(f"written: {RESULTS / f'prefix-{slug}.md'}")


if __name__ == "__main__":
    main()
