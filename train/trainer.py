"""The Trainer a run trains with, and its settings.

TuneshipTrainer is the transformers Trainer with atomic checkpoints (checkpoints.py) and its
own loss (loss.py): chunked over the output layer, with distillation on `distill: true` rows.
A `Training` holds it with the callbacks whose state the run reads back when it ends: the
observer (throughput, metrics rows), the SIGTERM handler and the best adapter.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from transformers import PrinterCallback, TrainingArguments

from tuneship.config.schema import TrainConfig
from tuneship.handoff.manifest import BestEval, TrainMetrics
from tuneship.infra.errors import Preempted

from . import checkpoints as ckpt
from .best import BestAdapter
from .examples import RowDataset, SortedBatches, TrainingRows, packed_collate, pad_collate
from .loss import LossTrainer, not_chunkable
from .observe import (
    METRICS_JSONL,
    Reporter,
    RunObserver,
    peak_memory_bytes,
    read_rows,
    start_metrics_server,
)
from .ranks import backend_for


class TuneshipTrainer(ckpt.CheckpointingTrainer, LossTrainer):
    """Atomic checkpoints and the chunked, distilling loss in one Trainer."""

    sorted_batches = False  # batching: sorted

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.sorted_batches or not isinstance(dataset, RowDataset):
            return super()._get_train_sampler(train_dataset)
        lengths = [len(example.input_ids) for example in dataset.examples]
        return SortedBatches(
            lengths, self.args.train_batch_size * self.args.gradient_accumulation_steps
        )

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        if self.args.fsdp_plugin_args and state.distributed_type == DistributedType.MULTI_CPU:
            # accelerate turns FSDP on for GPU kinds only: CPU processes asked for FSDP would
            # silently train with DDP. FSDP2 runs on CPU with gloo, so CPU runs (and the tests
            # of every FSDP path) shard for real.
            plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            if state.mixed_precision != "no":
                plugin.set_mixed_precision(state.mixed_precision)
            state.distributed_type, state.fsdp_plugin = DistributedType.FSDP, plugin
            self.is_fsdp_enabled = True


@dataclass(frozen=True)
class Context:
    """What every step of a run needs to know about it."""

    cfg: TrainConfig
    work: Path
    world: int
    reporter: Reporter
    rank_0_loads_alone: bool = False  # FSDP's low-memory loading (model.rank_0_loads_alone)

    @property
    def is_main(self) -> bool:
        return self.reporter.is_main


@dataclass
class Training:
    trainer: TuneshipTrainer
    observer: RunObserver
    sigterm: ckpt.SaveOnSigterm
    best: BestAdapter | None
    metrics_server: Any = None


def fsdp_settings(ctx: Context, model: Any) -> dict[str, Any]:
    """The Trainer's FSDP arguments ({} without FSDP). FSDP checkpoints the activations of each
    wrapped block itself, so HF's gradient checkpointing stays off (model.py)."""
    cfg = ctx.cfg
    if ctx.world == 1 or cfg.distributed.strategy != "fsdp":
        return {}
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "cpu_offload": cfg.distributed.fsdp_cpu_offload,
            "transformer_layer_cls_to_wrap": list(model.base_model.model._no_split_modules),
            # rank 0 broadcasts the weights the other ranks did not load (model.load_model)
            "cpu_ram_efficient_loading": ctx.rank_0_loads_alone,
            "activation_checkpointing": cfg.gradient_checkpointing,
        },
    }


TRACKING_DIR = "tensorboard"


def training_arguments(ctx: Context, precision: str, model: Any) -> TrainingArguments:
    cfg, world = ctx.cfg, ctx.world
    # the Trainer's TensorBoard callback reads its folder from here (transformers 5); the run
    # folder takes it over at the end
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(ctx.work / TRACKING_DIR)
    fsdp = fsdp_settings(ctx, model)
    has_eval = cfg.has_eval
    return TrainingArguments(
        output_dir=str(ctx.work / ckpt.INCOMING),
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
        use_cpu=not torch.cuda.is_available(),
        ddp_backend=backend_for(cfg) if world > 1 else None,
        ddp_find_unused_parameters=False if world > 1 else None,
        ddp_timeout=cfg.distributed.timeout_s,  # when the Trainer starts the process group
        train_sampling_strategy="group_by_length"
        if cfg.batching in ("group_by_length", "sorted")
        else "random",
        include_num_input_tokens_seen="non_padding" if cfg.batching != "packed" else "all",
        logging_steps=cfg.logging_steps,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.eval_steps if has_eval else None,
        save_strategy="steps" if cfg.checkpoint_steps else "no",
        save_steps=cfg.checkpoint_steps or 500,
        save_total_limit=None,
        report_to=list(cfg.report_to) or "none",
        run_name=cfg.name,
        seed=cfg.seed,
        data_seed=cfg.seed,
        remove_unused_columns=False,
        prediction_loss_only=True,  # eval needs the loss only: never gather its logits
        dataloader_num_workers=0,
        disable_tqdm=True,
        **fsdp,
    )


def build_training(
    ctx: Context, model: Any, rows: TrainingRows, precision: str, pad_id: int
) -> Training:
    cfg = ctx.cfg
    server, gauges = None, None
    if cfg.metrics_port and ctx.is_main:
        server, gauges = start_metrics_server(cfg.metrics_port)
    flash = getattr(model.config, "_attn_implementation", "") == "flash_attention_2"
    collate = packed_collate(flash) if cfg.batching == "packed" else pad_collate(pad_id)
    best = BestAdapter(model, cfg.early_stopping_patience) if cfg.has_eval else None
    observer = RunObserver(ctx.reporter, ctx.work / METRICS_JSONL, gauges, ctx.is_main)
    sigterm = ckpt.SaveOnSigterm()
    loss_chunk = cfg.loss_chunk
    reason = not_chunkable(model.get_base_model()) if loss_chunk else None
    if reason:
        ctx.reporter.event(
            "loss", f"loss_chunk: off for this model ({reason}); the loss uses full logits"
        )
        loss_chunk = 0
    share_prefix = prefix_sharing(ctx, loss_chunk)
    trainer = TuneshipTrainer(
        model=model,
        args=training_arguments(ctx, precision, model),
        train_dataset=rows.train_dataset(),
        eval_dataset=rows.eval_dataset(),
        data_collator=collate,
        callbacks=[observer, *([best] if best else []), sigterm],
        work=ctx.work,
        keep_checkpoints=cfg.keep_checkpoints,
        extra_state=best,
        loss_chunk=loss_chunk,
        share_prefix=share_prefix,
    )
    trainer.sorted_batches = cfg.batching == "sorted"
    trainer.remove_callback(PrinterCallback)  # RunObserver reports instead
    return Training(trainer, observer, sigterm, best, server)


def prefix_sharing(ctx: Context, loss_chunk: int) -> bool:
    """Whether batches run their shared prefix once (loss.forward_with_shared_prefix): two
    forward calls a step, which DDP and FSDP expect one of, and which gradient checkpointing
    would recompute into the same cache twice."""
    cfg = ctx.cfg
    off = {
        "several processes": ctx.world > 1,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "packed batches": cfg.batching == "packed",
        "loss_chunk: 0": not loss_chunk,
    }
    reasons = [why for why, applies in off.items() if applies]
    if cfg.share_prefix and reasons:
        ctx.reporter.event("loss", f"share_prefix: off ({', '.join(reasons)})")
    return cfg.share_prefix and not reasons


def fit(ctx: Context, training: Training, resume_from: Path | None) -> TrainMetrics:
    """Train to the end (or until SIGTERM: checkpoint, then Preempted); the run's figures."""
    trainer, best = training.trainer, training.best
    if best is not None and resume_from is not None:
        best.load(resume_from)
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        if training.metrics_server is not None:
            training.metrics_server.shutdown()
    if training.sigterm.stopped:
        step, took = trainer.state.global_step, training.sigterm.checkpoint_s
        ctx.reporter.event(
            "preempted",
            f"SIGTERM: checkpoint written at step {step} in {took} s; run the same command "
            "to resume",
            step=step,
            checkpoint_s=took,
        )
        raise Preempted(
            f"stopped by SIGTERM at step {step} (checkpoint in {ctx.work}); "
            "run the same command to resume"
        )
    cfg = ctx.cfg
    restored = (
        best.restore_best() if best and (cfg.keep_best or cfg.early_stopping_patience) else False
    )
    rows = read_rows(ctx.work / METRICS_JSONL)
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    session_s = result.metrics.get("train_runtime") or 0
    return TrainMetrics(
        steps=trainer.state.global_step,
        max_steps=trainer.state.max_steps,
        epochs=round(trainer.state.epoch or 0, 3),
        resumed_from_step=ckpt.checkpoint_step(resume_from) if resume_from else None,
        loss=losses,
        final_loss=losses[-1][1] if losses else None,
        train_loss=round(result.training_loss, 4),
        eval_loss=[(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r],
        best=BestEval(**best.summary(), restored=restored) if best else None,
        wall_s=round(session_s, 1),
        tokens_per_s=round(training.observer.session_tokens / session_s, 1) if session_s else None,
        peak_memory_bytes=peak_memory_bytes(),
        world_size=ctx.world,
        # what ran, not what was asked: accelerate once fell back to DDP without a word
        distributed=("fsdp" if trainer.is_fsdp_enabled else "ddp") if ctx.world > 1 else None,
        cuda=torch.cuda.is_available(),
    )
