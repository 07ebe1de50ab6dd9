"""`tuneship train`: LoRA / QLoRA fine-tuning with peft and the transformers Trainer.

Reads: a TrainConfig (data files, base model, LoRA and optimizer settings).
Writes: OUTPUT_DIR/NAME/adapter/ (PEFT adapter + tokenizer + chat template) and run.json,
atomically: a failed run leaves no run folder behind.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from tuneship.chat_tokens import IGNORE, ChatTokenizer, Example
from tuneship.chats import load_files
from tuneship.config import TrainConfig
from tuneship.errors import DataError, TuneshipError
from tuneship.fsutil import check_output_free, hash_tree, sha256_file, sha256_text, staged_dir
from tuneship.manifest import RUN_FILE, header, versions, write_manifest
from tuneship.template import align_eos

from .base import resolve_base

LIBRARIES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes")


def load_examples(cfg: TrainConfig, tokenizer: Any) -> tuple[list[Example], dict, list[dict]]:
    """Load, validate and tokenize the training data; refuse invalid records unless told."""
    loaded = load_files(cfg.data)
    if loaded.problems and not cfg.skip_invalid:
        raise DataError(
            f"{len(loaded.problems)} invalid record(s) in the training data "
            "(fix them, or set skip_invalid: true to train without them)",
            [str(p) for p in loaded.problems],
        )
    if loaded.problems:
        print(f"skipping {len(loaded.problems)} invalid record(s):")
        for problem in loaded.problems:
            print(f"  - {problem}")
    conversations = loaded.conversations[: cfg.limit] if cfg.limit else loaded.conversations
    truncate = cfg.overlong == "truncate"
    chat_tokenizer = ChatTokenizer(tokenizer, cfg.max_length if truncate else None)
    examples, dropped = [], 0
    for conv in conversations:
        example = chat_tokenizer(conv)
        if len(example.input_ids) > cfg.max_length:
            dropped += 1
            continue
        if example.trained_tokens:
            examples.append(example)
    if not examples:
        raise TuneshipError("no trainable conversations left after validation and length limits")
    tokens = sum(len(e.input_ids) for e in examples)
    trained = sum(e.trained_tokens for e in examples)
    stats = {
        "used": len(examples),
        "dropped_overlong": dropped,
        "truncated": sum(e.truncated for e in examples),
        "tokens": tokens,
        "trained_tokens": trained,
        "trained_share": round(trained / tokens, 4),
    }
    per_file = {p.file for p in loaded.problems}
    datasets = [
        {
            "path": str(Path(path)),
            "sha256": sha256_file(Path(path)),
            "invalid": sum(1 for p in loaded.problems if p.file == str(path)),
            "skipped": cfg.skip_invalid and str(path) in per_file,
        }
        for path in cfg.data
    ]
    return examples, stats, datasets


def pad_collate(pad_id: int):
    """Dynamic padding to the longest example of the batch; padded labels are ignored."""
    import torch

    def collate(batch: list[dict]) -> dict:
        width = max(len(row["input_ids"]) for row in batch)
        ids, labels, mask = [], [], []
        for row in batch:
            gap = width - len(row["input_ids"])
            ids.append(row["input_ids"] + [pad_id] * gap)
            labels.append(row["labels"] + [IGNORE] * gap)
            mask.append([1] * len(row["input_ids"]) + [0] * gap)
        return {
            "input_ids": torch.tensor(ids),
            "labels": torch.tensor(labels),
            "attention_mask": torch.tensor(mask),
        }

    return collate


def pick_precision(requested: str) -> tuple[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    if requested == "auto" and cuda:
        requested = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    elif requested == "auto":
        requested = "fp32"
    if requested in ("fp16",) and not cuda:
        raise TuneshipError("precision fp16 needs CUDA; use fp32 or bf16 on CPU")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[requested]
    return requested, dtype


def load_model(cfg: TrainConfig, base: str, dtype: Any) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": torch.float32 if dtype == torch.float16 else dtype}
    if cfg.qlora:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if dtype != torch.float16 else dtype,
        )
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in cfg.lora.target_modules if m not in present]
    if missing:
        raise TuneshipError(
            f"lora.target_modules {missing} do not exist in {base}; "
            f"linear layers there: {sorted(n for n in present if n.endswith('proj'))}"
        )
    if cfg.qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def train(
    cfg: TrainConfig,
    model: Any,
    examples: list[Example],
    precision: str,
    pad_id: int,
    trainer_dir: str,
) -> dict[str, Any]:
    import torch
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=trainer_dir,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        train_sampling_strategy="group_by_length",
        logging_steps=cfg.logging_steps,
        save_strategy="no",
        report_to="none",
        seed=cfg.seed,
        data_seed=cfg.seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=pad_collate(pad_id))
    started = time.monotonic()
    result = trainer.train()
    wall = time.monotonic() - started
    losses = [[h["step"], round(h["loss"], 4)] for h in trainer.state.log_history if "loss" in h]
    epochs_done = trainer.state.epoch or 0
    tokens_seen = sum(len(e.input_ids) for e in examples) * epochs_done
    return {
        "steps": trainer.state.global_step,
        "epochs": round(epochs_done, 3),
        "loss": losses,
        "final_loss": losses[-1][1] if losses else None,
        "train_loss": round(result.training_loss, 4),
        "wall_s": round(wall, 1),
        "tokens_per_s": round(tokens_seen / wall, 1) if wall else None,
    }


def run(cfg: TrainConfig, force: bool = False) -> Path:
    from transformers import AutoTokenizer

    out_dir = Path(cfg.output_dir) / cfg.name
    check_output_free(out_dir, force)
    base = resolve_base(cfg.base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    eot_id = align_eos(tokenizer)
    examples, stats, datasets = load_examples(cfg, tokenizer)
    precision, dtype = pick_precision(cfg.precision)
    print(
        f"training {cfg.name}: {stats['used']} conversations, {stats['tokens']} tokens "
        f"({stats['trained_share']:.0%} trained), base {base}, {precision}"
    )
    model = load_model(cfg, base, dtype)
    with staged_dir(out_dir) as stage:
        metrics = train(
            cfg, model, examples, precision, tokenizer.pad_token_id, str(stage / ".trainer")
        )
        shutil.rmtree(stage / ".trainer", ignore_errors=True)
        adapter_dir = stage / "adapter"
        model.save_pretrained(adapter_dir)
        tokenizer.save_pretrained(adapter_dir)
        base_path = Path(base)
        manifest = header("tuneship.run", cfg.name) | {
            "base": {
                "ref": cfg.base,
                "path": str(base_path.resolve()) if base_path.is_dir() else base,
                "weights_sha256": {
                    rel: digest
                    for rel, digest in hash_tree(base_path).items()
                    if rel.endswith(".safetensors")
                }
                if base_path.is_dir()
                else {},
                "chat_template_sha256": sha256_text(tokenizer.chat_template),
                "eos_token": tokenizer.eos_token,
                "eos_token_id": eot_id,
            },
            "datasets": datasets,
            "examples": stats,
            "config": cfg.model_dump(),
            "versions": versions(*LIBRARIES),
            "device": {"precision": precision, "qlora": cfg.qlora},
            "metrics": metrics,
            "adapter": hash_tree(adapter_dir),
        }
        write_manifest(stage / RUN_FILE, manifest)
    print(f"run written to {out_dir} (final loss {metrics['final_loss']})")
    return out_dir
