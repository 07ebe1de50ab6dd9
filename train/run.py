"""`tuneship train`: LoRA / QLoRA fine-tuning with peft and the transformers Trainer.

Reads: a TrainConfig (data sources, base model, LoRA, optimizer, batching, checkpoints).
Writes: OUTPUT_DIR/NAME/ with adapter/ (PEFT adapter + tokenizer + chat template), run.json,
metrics.jsonl/.csv and loss/learning-rate plots, in one rename when training has finished.
While it runs, OUTPUT_DIR/NAME.work/ holds atomic checkpoints; a restart resumes from the
newest (see checkpoints.py). The same command runs single-process or under torchrun /
accelerate launch (DDP or FSDP, from `distributed`); only rank 0 writes the run.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from tuneship.chat_tokens import IGNORE, ChatTokenizer, Example
from tuneship.chats import Conversation
from tuneship.config import TrainConfig
from tuneship.errors import Preempted, TuneshipError
from tuneship.fsutil import check_output_free, hash_tree, sha256_file, sha256_text, staged_dir
from tuneship.manifest import RUN_FILE, header, versions, write_manifest
from tuneship.template import align_eos

from . import checkpoints as ckpt
from .base import resolve_base
from .best import best_adapter_callback
from .data import PreparedData, prepare
from .distill import distilling_trainer
from .observe import (
    METRICS_JSONL,
    Reporter,
    observer_callback,
    peak_memory_bytes,
    read_rows,
    start_metrics_server,
    write_csv,
    write_plots,
)

LIBRARIES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes")


def rank_and_world() -> tuple[int, int]:
    """From the environment torchrun / accelerate launch set (1 process when absent)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def tokenize(
    cfg: TrainConfig, convs: list[Conversation], tokenizer: Any
) -> tuple[list[Example], dict[str, Any]]:
    """Tokenize with the chat template; drop (or truncate) conversations over max_length."""
    truncate = cfg.overlong == "truncate"
    chat_tokenizer = ChatTokenizer(tokenizer, cfg.max_length if truncate else None)
    examples, dropped = [], 0
    for conv in convs:
        example = chat_tokenizer(conv)
        if len(example.input_ids) > cfg.max_length:
            dropped += 1
        elif example.trained_tokens:
            examples.append(example)
    tokens = sum(len(e.input_ids) for e in examples)
    trained = sum(e.trained_tokens for e in examples)
    return examples, {
        "used": len(examples),
        "dropped_overlong": dropped,
        "truncated": sum(e.truncated for e in examples),
        "tokens": tokens,
        "trained_tokens": trained,
        "trained_share": round(trained / tokens, 4) if tokens else 0,
    }


def describe_datasets(cfg: TrainConfig, data: PreparedData) -> list[dict[str, Any]]:
    files = [(p, "train") for p in cfg.data_paths] + (
        [(cfg.eval_data, "eval")] * bool(cfg.eval_data)
    )
    invalid = {str(p.file) for p in data.problems}
    return [
        {
            "path": str(Path(path)),
            "role": role,
            "sha256": sha256_file(Path(path)),
            "invalid": sum(1 for p in data.problems if p.file == str(path)),
            "skipped": cfg.skip_invalid and str(path) in invalid,
        }
        for path, role in files
    ]


def pad_collate(pad_id: int):
    """Dynamic padding to the longest example of the batch; padded labels are ignored. Rows
    that carry `distill` (a bool) pass it on as one tensor (see distill.py)."""
    import torch

    def collate(batch: list[dict]) -> dict:
        width = max(len(row["input_ids"]) for row in batch)
        ids, labels, mask = [], [], []
        for row in batch:
            gap = width - len(row["input_ids"])
            ids.append(row["input_ids"] + [pad_id] * gap)
            labels.append(row["labels"] + [IGNORE] * gap)
            mask.append([1] * len(row["input_ids"]) + [0] * gap)
        collated = {
            "input_ids": torch.tensor(ids),
            "labels": torch.tensor(labels),
            "attention_mask": torch.tensor(mask),
        }
        if "distill" in batch[0]:
            collated["distill"] = torch.tensor([row["distill"] for row in batch])
        return collated

    return collate


def packed_collate(flash_attention: bool):
    """The batch as one row without padding; position ids restart per conversation, which makes
    transformers mask attention within each conversation (block-diagonal on sdpa/eager, varlen
    kernels with FlashAttention), and the first label of each conversation is ignored so no
    token is predicted across a boundary."""
    from transformers import DataCollatorWithFlattening

    return DataCollatorWithFlattening(
        return_position_ids=True, separator_id=IGNORE, return_flash_attn_kwargs=flash_attention
    )


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


def load_model(cfg: TrainConfig, base: str, dtype: Any, world: int) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, set_seed

    set_seed(cfg.seed)  # the LoRA A matrices are drawn from the global RNG

    fsdp = world > 1 and cfg.distributed.strategy == "fsdp"
    kwargs: dict[str, Any] = {
        "dtype": torch.float32 if dtype == torch.float16 else dtype,
        "attn_implementation": cfg.attention,
    }
    if cfg.qlora:
        compute = torch.bfloat16 if dtype != torch.float16 else dtype
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
            # FSDP shards parameters of one dtype: store the 4-bit weights as the compute dtype
            bnb_4bit_quant_storage=compute if fsdp else torch.uint8,
        )
    if world > 1 and not fsdp and torch.cuda.is_available():
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    # no KV cache in training: it also disables transformers' packed-sequence masking
    model.config.use_cache = False
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in cfg.lora.target_modules if m not in present]
    if missing:
        raise TuneshipError(
            f"lora.target_modules {missing} do not exist in {base}; "
            f"linear layers there: {sorted(n for n in present if n.endswith('proj'))}"
        )
    if cfg.qlora:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing
        )
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def backend_for(cfg: TrainConfig) -> str:
    import torch

    if cfg.distributed.backend != "auto":
        return cfg.distributed.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def checkpoint_bytes(model: Any) -> int:
    """Disk one checkpoint needs: trainable weights + two AdamW moments, all fp32."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable * 4 * 3


def training_arguments(cfg: TrainConfig, precision: str, incoming: Path, world: int, model: Any):
    import torch
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    fsdp: dict[str, Any] = {}
    if world > 1 and cfg.distributed.strategy == "fsdp":
        fsdp = {
            "fsdp": True,
            "fsdp_config": {
                "version": 2,
                "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                "cpu_offload": cfg.distributed.fsdp_cpu_offload,
                "transformer_layer_cls_to_wrap": list(model.base_model.model._no_split_modules),
                "cpu_ram_efficient_loading": False,
                "activation_checkpointing": cfg.gradient_checkpointing,
            },
        }
    has_eval = cfg.has_eval
    return TrainingArguments(
        output_dir=str(incoming),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        gradient_checkpointing=cfg.gradient_checkpointing and not fsdp,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not cuda,
        ddp_backend=backend_for(cfg) if world > 1 else None,
        ddp_find_unused_parameters=False if world > 1 else None,
        train_sampling_strategy="group_by_length"
        if cfg.batching == "group_by_length"
        else "random",
        include_num_input_tokens_seen="non_padding" if cfg.batching != "packed" else "all",
        logging_steps=cfg.logging_steps,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.eval_steps if has_eval else None,
        save_strategy="steps" if cfg.checkpoint_steps else "no",
        save_steps=cfg.checkpoint_steps or 500,
        save_total_limit=None,
        report_to="none",
        seed=cfg.seed,
        data_seed=cfg.seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **fsdp,
    )


def train(
    cfg: TrainConfig,
    model: Any,
    examples: list[Example],
    eval_examples: list[Example],
    distill_ids: set[str],
    precision: str,
    pad_id: int,
    work: Path,
    resume_from: Path | None,
    reporter: Reporter,
    world: int,
) -> tuple[dict[str, Any], Any]:
    import torch
    from transformers import PrinterCallback, Trainer

    is_main = reporter.is_main
    server, gauges = (None, None)
    if cfg.metrics_port and is_main:
        server, gauges = start_metrics_server(cfg.metrics_port)
    args = training_arguments(cfg, precision, work / ckpt.INCOMING, world, model)
    flash = getattr(model.config, "_attn_implementation", "") == "flash_attention_2"
    collate = packed_collate(flash) if cfg.batching == "packed" else pad_collate(pad_id)
    best = best_adapter_callback(model, cfg.early_stopping_patience) if cfg.has_eval else None
    sigterm = ckpt.sigterm_callback()
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    if distill_ids:
        rows = [
            row | {"distill": e.id in distill_ids} for row, e in zip(rows, examples, strict=True)
        ]
    trainer = distilling_trainer(ckpt.checkpointing_trainer(Trainer))(
        model=model,
        args=args,
        train_dataset=rows,
        eval_dataset=[{"input_ids": e.input_ids, "labels": e.labels} for e in eval_examples]
        or None,
        data_collator=collate,
        callbacks=[
            observer_callback(reporter, work / METRICS_JSONL, gauges, is_main),
            *([best] if best else []),
            sigterm,
        ],
    )
    trainer.remove_callback(PrinterCallback)  # RunObserver reports instead
    trainer.work, trainer.keep, trainer.extra_state = work, cfg.keep_checkpoints, best
    if best is not None and resume_from is not None:
        best.load(resume_from)
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        if server is not None:
            server.shutdown()
    if sigterm.received:
        step = trainer.state.global_step
        reporter.event(
            "preempted",
            f"SIGTERM: checkpoint written at step {step}; run the same command to resume",
            step=step,
        )
        raise Preempted(
            f"stopped by SIGTERM at step {step} (checkpoint in {work}); "
            "run the same command to resume"
        )
    keep_best = best is not None and (cfg.keep_best or cfg.early_stopping_patience)
    restored = best.restore_best() if keep_best else False
    rows = read_rows(work / METRICS_JSONL)
    losses = [[r["step"], r["loss"]] for r in rows if "loss" in r]
    session_s = result.metrics.get("train_runtime") or 0
    session_tokens = trainer.state.num_input_tokens_seen - trainer._initial_num_input_tokens_seen
    metrics = {
        "steps": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "epochs": round(trainer.state.epoch or 0, 3),
        "resumed_from_step": ckpt.checkpoint_step(resume_from) if resume_from else None,
        "loss": losses,
        "final_loss": losses[-1][1] if losses else None,
        "train_loss": round(result.training_loss, 4),
        "eval_loss": [[r["step"], r["eval_loss"]] for r in rows if "eval_loss" in r],
        "best": (best.summary() | {"restored": restored}) if best else None,
        "wall_s": round(session_s, 1),
        "tokens_per_s": round(session_tokens / session_s, 1) if session_s else None,
        "peak_memory_bytes": peak_memory_bytes(),
        "world_size": world,
        "distributed": cfg.distributed.strategy if world > 1 else None,
        "cuda": torch.cuda.is_available(),
    }
    return metrics, trainer


def run(
    cfg: TrainConfig, force: bool = False, restart: bool = False, dry_run: bool = False
) -> Path | None:
    from transformers import AutoTokenizer

    rank, world = rank_and_world()
    reporter = Reporter(cfg.log_format, is_main=rank == 0)
    out_dir = Path(cfg.output_dir) / cfg.name
    check_output_free(out_dir, force or dry_run)
    base = resolve_base(cfg.base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    eot_id = align_eos(tokenizer)
    data = prepare(cfg)
    for problem in data.problems:
        reporter.event("invalid_record", f"skipping invalid record: {problem}", record=str(problem))
    examples, stats = tokenize(cfg, data.train, tokenizer)
    eval_examples, eval_stats = tokenize(cfg, data.eval, tokenizer)
    stats |= data.report | {"eval": data.report["eval"] | eval_stats}
    if not examples:
        raise TuneshipError("no trainable conversations left after validation and length limits")
    if data.report["eval"]["leaks"]:
        leak = data.report["eval"]["leak_examples"][0]
        reporter.event(
            "leakage",
            f"warning: {data.report['eval']['leaks']} eval conversation(s) share a user turn with "
            f"training (e.g. {leak['eval']} and {leak['train']}): the eval loss is optimistic",
            **data.report["eval"],
        )
    if dry_run:
        print(yaml.safe_dump({"config": cfg.model_dump(), "data": stats}, sort_keys=False))
        return None

    precision, dtype = pick_precision(cfg.precision)
    datasets = describe_datasets(cfg, data)
    work = ckpt.work_dir(out_dir)
    plan = ckpt.plan_for(cfg.model_dump(), {d["path"]: d["sha256"] for d in datasets})
    model = load_model(cfg, base, dtype, world)
    ckpt.preflight(work, checkpoint_bytes(model) * (cfg.keep_checkpoints + 2))
    resume_from = _main_first(
        lambda: ckpt.resume_point(work, plan, restart, rank == 0), rank, world, backend_for(cfg)
    )
    if resume_from is not None:
        reporter.event(
            "resume",
            f"resuming {cfg.name} from {resume_from} (step {ckpt.checkpoint_step(resume_from)})",
            checkpoint=str(resume_from),
            step=ckpt.checkpoint_step(resume_from),
        )
    reporter.event(
        "start",
        f"training {cfg.name}: {stats['used']} conversations, {stats['tokens']} tokens "
        f"({stats['trained_share']:.0%} trained), base {base}, {precision}, "
        f"{cfg.batching} batches, {world} process(es)",
        conversations=stats["used"],
        tokens=stats["tokens"],
        world_size=world,
    )
    metrics, trainer = train(
        cfg,
        model,
        examples,
        eval_examples,
        data.distill_ids,
        precision,
        tokenizer.pad_token_id,
        work,
        resume_from,
        reporter,
        world,
    )
    final_adapter = work / "adapter"
    trainer.save_model(str(final_adapter))  # every rank takes part (FSDP gathers the shards)
    if rank != 0:
        _leave_process_group(world)
        return None
    with staged_dir(out_dir) as stage:
        adapter_dir = stage / "adapter"
        shutil.move(final_adapter, adapter_dir)
        for stray in ("training_args.bin",):
            (adapter_dir / stray).unlink(missing_ok=True)
        tokenizer.save_pretrained(adapter_dir)
        rows = read_rows(work / METRICS_JSONL)
        if rows:
            shutil.copy(work / METRICS_JSONL, stage / METRICS_JSONL)
        write_csv(rows, stage / "metrics.csv")
        metrics["plots"] = write_plots(rows, stage, cfg.name)
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
            "device": {"precision": precision, "qlora": cfg.qlora, "world_size": world},
            "metrics": metrics,
            "adapter": hash_tree(adapter_dir),
        }
        write_manifest(stage / RUN_FILE, manifest)
    shutil.rmtree(work, ignore_errors=True)
    _leave_process_group(world)
    reporter.event(
        "done",
        f"run written to {out_dir} (step {metrics['steps']}, final loss {metrics['final_loss']})",
        run=str(out_dir),
        steps=metrics["steps"],
        final_loss=metrics["final_loss"],
    )
    return out_dir


def _main_first(step, rank: int, world: int, backend: str):
    """Run `step` on rank 0, then, after a barrier, on the others (which only read what rank 0
    wrote). Joins the process group torchrun prepared; the Trainer reuses it."""
    if world == 1:
        return step()
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    result = step() if rank == 0 else None
    dist.barrier()
    return result if rank == 0 else step()


def _leave_process_group(world: int) -> None:
    """Wait until rank 0 has written the run, then close the group: a rank that exits while
    the group is alive can abort in gloo's threads ('terminate called without an active
    exception')."""
    if world == 1:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
