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
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from transformers import AutoTokenizer

from tuneship.chat import tool_template
from tuneship.chat.labels import ChatTokenizer
from tuneship.chat.mixing import plan
from tuneship.chat.records import RecordProblem
from tuneship.chat.template import align_eos, check_system_turns
from tuneship.chat.tool_template import ToolFormat
from tuneship.config.schema import TrainConfig
from tuneship.handoff.manifest import (
    RUN_FILE,
    BaseInfo,
    DatasetRecord,
    DeviceInfo,
    Distillation,
    EvalSplit,
    ExampleStats,
    RunManifest,
    ToolCalling,
    TrainMetrics,
    header,
    versions,
    write_manifest,
)
from tuneship.infra.errors import Preempted, TuneshipError
from tuneship.infra.fsutil import check_output_free, hash_tree, sha256_file, sha256_text, staged_dir
from tuneship.modelops.precision import Capability, Precision

from . import checkpoints as ckpt
from . import tokenized
from .base import check_architecture, quantized_origin, resolve_base
from .estimate import FitQuestion, report
from .examples import TrainingRows, select_rows
from .model import checkpoint_bytes, load_model, pick_precision, rank_0_loads_alone
from .observe import METRICS_JSONL, Reporter, read_rows, write_csv, write_plots
from .ranks import backend_for, rank_and_world
from .rows import ExampleTable, write_rows
from .targets import LoraTargets, applied
from .teacher import TargetSettings, teacher_targets
from .trainer import TRACKING_DIR, Context, build_training, fit

LIBRARIES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes")


@dataclass
class Prepared:
    """The data a run trains on, tokenized, with what run.json says about it."""

    rows: TrainingRows
    stats: ExampleStats
    datasets: list[DatasetRecord]
    tool_calling: ToolCalling | None = None  # the data has tool calls: how they are rendered
    distillation: Distillation | None = None  # once the teacher targets are computed


# Under torchrun the training objects outlive the process group: freed after it is destroyed,
# DDP's reducer drops the last reference to gloo's group, whose destructor can wait forever for
# a peer that has gone (a rank hung at the end of a finished run, in the frame teardown of
# `run`). They are never freed: the CLI ends a distributed run with os._exit.
HELD_UNTIL_EXIT: list[object] = []


def run(
    cfg: TrainConfig,
    force: bool = False,
    restart: bool = False,
    dry_run: FitQuestion | None = None,
) -> Path | None:
    """Train and write the run folder. dry_run: print the fit estimate, the resolved config and
    the data report instead, loading no weights."""
    if dry_run is not None:
        estimate = report(cfg, dry_run.gpus, dry_run.gpu_memory, dry_run.gpu)
        print(yaml.safe_dump({"fit": estimate}, sort_keys=False), end="")
    rank, world = rank_and_world()
    reporter = Reporter(cfg.log_format, is_main=rank == 0)
    out_dir = Path(cfg.output_dir) / cfg.name
    check_output_free(out_dir, force or dry_run is not None)
    check_trackers(cfg.report_to)
    base = resolve_base(cfg.base)
    architecture = check_architecture(base)
    if architecture:
        reporter.event("architecture", f"note: {architecture}", notice=architecture)
    tokenizer = AutoTokenizer.from_pretrained(base)
    eot_id = align_eos(tokenizer)
    if dry_run is not None:
        with tempfile.TemporaryDirectory(prefix="tuneship-dry-run-") as scratch:
            stats = prepare_data(cfg, tokenizer, reporter, Path(scratch)).stats
        dump = {"config": cfg.model_dump(), "data": stats.model_dump(mode="json")}
        print(yaml.safe_dump(dump, sort_keys=False))
        return None
    if world == 1:
        prepared = prepare_data(cfg, tokenizer, reporter, ckpt.work_dir(out_dir))
    else:
        prepared = shared_data(cfg, tokenizer, reporter, ckpt.work_dir(out_dir), rank, world)
    if prepared.tool_calling:  # the template tool calls were tokenized with, on every rank
        tool_template.apply(tokenizer, ToolFormat(prepared.tool_calling.template,
                                                  prepared.tool_calling.parser))  # fmt: skip

    chosen, machine, dtype = pick_precision(cfg.precision)
    precision = chosen.name
    alone = rank_0_loads_alone(cfg, base, dtype, world)
    if alone:
        reporter.event(
            "loading",
            "rank 0 loads the base alone; the other ranks get their shards from it when FSDP "
            "wraps the model (distributed.low_memory_loading)",
        )
    ctx = Context(cfg, ckpt.work_dir(out_dir), world, reporter, alone)
    model = load_model(cfg, base, dtype, rank, world, alone)
    ckpt.preflight(ctx.work, checkpoint_bytes(model) * (cfg.keep_checkpoints + 2))
    resume_from = find_resume_point(ctx, prepared, restart, rank)
    prepared.distillation = distill_targets(
        ctx, model, prepared.rows, base, precision, tokenizer, rank
    )
    reporter.event(
        "start",
        f"training {cfg.name}: {prepared.stats.used} conversations, {prepared.stats.tokens} "
        f"tokens ({prepared.stats.trained_share:.0%} trained), base {base}, {chosen.reason}, "
        f"{cfg.batching} batches, {world} process(es)",
        conversations=prepared.stats.used,
        tokens=prepared.stats.tokens,
        world_size=world,
    )
    training = build_training(ctx, model, prepared.rows, precision, tokenizer.pad_token_id)
    try:
        metrics = fit(ctx, training, resume_from)
    except Preempted:
        leave_process_group(world)  # every rank stopped at the same step (SaveOnSigterm)
        raise
    final_adapter = ctx.work / "adapter"
    training.trainer.save_model(str(final_adapter))  # every rank takes part (FSDP gathers)
    # The group closes before rank 0's solo work (hashing a 140 GB base, fsync on network
    # storage): no rank waits for it in a collective, so its length meets no timeout.
    leave_process_group(world)
    if world > 1:
        HELD_UNTIL_EXIT.append((training, model))
    if rank != 0:
        return None
    base_info = describe_base(cfg, base, tokenizer, eot_id)
    setup = Setup(chosen, machine, applied(model))
    write_run(ctx, out_dir, final_adapter, tokenizer, base_info, prepared, setup, metrics)
    shutil.rmtree(ctx.work, ignore_errors=True)
    reporter.event(
        "done",
        f"run written to {out_dir} (step {metrics.steps}, final loss {metrics.final_loss})",
        run=str(out_dir),
        steps=metrics.steps,
        final_loss=metrics.final_loss,
    )
    return out_dir


TRACKER_PACKAGES = {"tensorboard": "tensorboardX", "mlflow": "mlflow", "wandb": "wandb"}


def check_trackers(trackers: Sequence[str]) -> None:
    """Every tracker in report_to has its package here, found before any weights load."""
    import importlib.util

    missing = [t for t in trackers if importlib.util.find_spec(TRACKER_PACKAGES[t]) is None]
    if missing:
        packages = ", ".join(TRACKER_PACKAGES[t] for t in missing)
        raise TuneshipError(
            f"report_to {missing}: install {packages} in the train environment, or leave "
            f"{'it' if len(missing) == 1 else 'them'} out of report_to"
        )


def prepare_data(cfg: TrainConfig, tokenizer: Any, reporter: Reporter, work: Path) -> Prepared:
    """Plan the mix (validated, de-duplicated, split, mixed: numbers, not conversations), check
    the system turns against the template, tokenize every conversation used into the rows file
    in work (rows.py); warn about skipped records and leakage."""
    mixed = plan(cfg.data_mix())
    check_system_turns(tokenizer, mixed.kinds.system, mixed.kinds.system_example)
    tool_calling = None
    if mixed.kinds.tool_conversations:
        tool_format = tool_template.tool_format(tokenizer)
        tool_template.apply(tokenizer, tool_format)
        tool_calling = ToolCalling(
            template=tool_format.template,
            parser=tool_format.parser,
            conversations=mixed.kinds.tool_conversations,
            calls=mixed.kinds.calls,
        )
        reporter.event(
            "tool_calling",
            f"{tool_calling.conversations} conversation(s) with tools, {tool_calling.calls} "
            f"call(s): {tool_format.describe()}",
            **tool_calling.model_dump(),
        )
    for problem in mixed.problems:
        reporter.event("invalid_record", f"skipping invalid record: {problem}", record=str(problem))
    chat_tokenizer = ChatTokenizer(
        tokenizer, cfg.max_length if cfg.overlong == "truncate" else None
    )
    key = tokenized.cache_key(cfg, tokenizer)
    path = tokenized.rows_path(work, key)
    ckpt.preflight(work, 0)  # a folder that cannot be written, said as such
    written = write_rows(mixed, chat_tokenizer, path, show_progress=reporter.is_main)
    tokenized.drop_others(work, key)
    train_rows, stats = select_rows(cfg, written.facts, mixed.train)
    eval_rows, eval_stats = select_rows(cfg, written.facts, written.eval_rows)
    if not len(train_rows):
        raise TuneshipError("no trainable conversations left after validation and length limits")
    split = EvalSplit(
        **mixed.report["eval"],
        leaks=len(written.leaks),
        leak_examples=written.leaks[:10],
        **eval_stats.as_dict(),
    )
    if split.leaks:
        leak = split.leak_examples[0]
        reporter.event(
            "leakage",
            f"warning: {split.leaks} eval conversation(s) share a user turn with training "
            f"(e.g. {leak['eval']} and {leak['train']}): the eval loss is optimistic",
            **split.model_dump(include={"source", "conversations", "leaks", "leak_examples"}),
        )
    distill_sources = [i for i, source in enumerate(cfg.data) if source.distill]
    distilled = [mixed.source_of(int(row)) in distill_sources for row in train_rows]
    report = {k: v for k, v in mixed.report.items() if k != "eval"}
    return Prepared(
        rows=TrainingRows(
            ExampleTable(path, train_rows),
            ExampleTable(path, np.asarray(eval_rows)),
            distilled if distill_sources else [],
        ),
        stats=ExampleStats(**stats.as_dict(), **report, eval=split),
        datasets=describe_datasets(cfg, mixed.problems),
        tool_calling=tool_calling,
    )


def distill_targets(
    ctx: Context,
    model: Any,
    rows: TrainingRows,
    base: str,
    precision: str,
    tokenizer: Any,
    rank: int,
) -> Distillation | None:
    """The base model's top-k targets for the distilled rows (teacher.py), on the device the
    model trains on; every rank computes them (no collective), rank 0 caches them."""
    if not rows.distills:
        return None
    if torch.cuda.is_available() and not ctx.cfg.qlora:
        model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    settings = TargetSettings(
        base=f"{ctx.cfg.base} {base}",
        top_k=ctx.cfg.distill_top_k,
        precision=precision,
        pad_id=tokenizer.pad_token_id,
        batch_size=ctx.cfg.batch_size,
    )
    targets = teacher_targets(
        model, rows.train, rows.distilled, settings, cache_dir=ctx.work, write_cache=rank == 0
    )
    rows.teacher = targets
    return Distillation(
        rows=targets.rows,
        positions=targets.positions,
        top_k=targets.top_k,
        targets_sha256=targets.sha256,
        seconds=targets.seconds,
    )


def shared_data(
    cfg: TrainConfig, tokenizer: Any, reporter: Reporter, work: Path, rank: int, world: int
) -> Prepared:
    """Under several processes: rank 0 prepares the data and writes it for the others
    (tokenized.py)."""
    key = tokenized.cache_key(cfg, tokenizer)

    def step() -> Prepared:
        if rank == 0:
            prepared = prepare_data(cfg, tokenizer, reporter, work)
            tokenized.write(work, key, prepared)
            return prepared
        found = tokenized.read(work, key)
        if found is None:
            print(
                f"rank {rank}: no tokenized data from rank 0 at "
                f"{tokenized.cache_path(work, key)} (is the output folder shared by every "
                "node, with the same data?); tokenizing here",
                file=sys.stderr,
            )
            return prepare_data(cfg, tokenizer, reporter, work / f"rank-{rank}")
        return found

    prepared = main_first(step, rank, world, backend_for(cfg), cfg.distributed.timeout_s)
    dist.barrier()  # all have read it before rank 0 may clear the work folder (--restart)
    return prepared


def describe_datasets(cfg: TrainConfig, problems: list[RecordProblem]) -> list[DatasetRecord]:
    files = [(p, "train") for p in cfg.data_paths]
    if cfg.eval_data:
        files.append((cfg.eval_data, "eval"))
    invalid = {str(p.file) for p in problems}
    return [
        DatasetRecord(
            path=str(Path(path)),
            role=role,
            sha256=sha256_file(Path(path)),
            invalid=sum(1 for p in problems if p.file == str(path)),
            skipped=cfg.skip_invalid and str(path) in invalid,
        )
        for path, role in files
    ]


def describe_base(cfg: TrainConfig, base: str, tokenizer: Any, eot_id: int) -> BaseInfo:
    base_path = Path(base)
    local = base_path.is_dir()
    return BaseInfo(
        ref=cfg.base,
        path=str(base_path.resolve()) if local else base,
        weights_sha256={
            rel: digest
            for rel, digest in (hash_tree(base_path) if local else {}).items()
            if rel.endswith(".safetensors")
        },
        chat_template_sha256=sha256_text(tokenizer.chat_template),
        eos_token=tokenizer.eos_token,
        eos_token_id=eot_id,
        quantized_origin=quantized_origin(base_path) if local else None,
    )


def find_resume_point(ctx: Context, prepared: Prepared, restart: bool, rank: int) -> Path | None:
    """The newest complete checkpoint of this very run (same settings and data), if any."""
    plan = ckpt.plan_for(ctx.cfg.model_dump(), {d.path: d.sha256 for d in prepared.datasets})
    resume_from = main_first(
        lambda: ckpt.resume_point(ctx.work, plan, restart, rank == 0),
        rank,
        ctx.world,
        backend_for(ctx.cfg),
        ctx.cfg.distributed.timeout_s,
    )
    if resume_from is not None:
        step = ckpt.checkpoint_step(resume_from)
        ctx.reporter.event(
            "resume",
            f"resuming {ctx.cfg.name} from {resume_from} (step {step})",
            checkpoint=str(resume_from),
            step=step,
        )
    return resume_from


@dataclass(frozen=True)
class Setup:
    """How the run computed and what it adapted, for run.json."""

    precision: Precision
    machine: Capability
    targets: LoraTargets


def write_run(
    ctx: Context,
    out_dir: Path,
    final_adapter: Path,
    tokenizer: Any,
    base: BaseInfo,
    prepared: Prepared,
    setup: Setup,
    metrics: TrainMetrics,
) -> None:
    """The run folder, in one rename: adapter/, metrics, plots and run.json."""
    cfg = ctx.cfg
    precision, machine = setup.precision, setup.machine
    with staged_dir(out_dir) as stage:
        adapter_dir = stage / "adapter"
        shutil.move(final_adapter, adapter_dir)
        (adapter_dir / "training_args.bin").unlink(missing_ok=True)
        tokenizer.save_pretrained(adapter_dir)
        rows = read_rows(ctx.work / METRICS_JSONL)
        if rows:
            shutil.copy(ctx.work / METRICS_JSONL, stage / METRICS_JSONL)
        if (ctx.work / TRACKING_DIR).is_dir():  # report_to: tensorboard
            shutil.copytree(ctx.work / TRACKING_DIR, stage / TRACKING_DIR)
        write_csv(rows, stage / "metrics.csv")
        metrics.plots = write_plots(rows, stage, cfg.name)
        manifest = RunManifest(
            **header("tuneship.run", cfg.name),
            base=base,
            datasets=prepared.datasets,
            examples=prepared.stats,
            distillation=prepared.distillation,
            config=cfg.model_dump(),
            versions=versions(*LIBRARIES),
            device=DeviceInfo(
                precision=precision.name,
                precision_reason=precision.reason,
                machine=machine.describe(),
                qlora=cfg.qlora,
                world_size=ctx.world,
            ),
            lora_targets=setup.targets.record(),
            tool_calling=prepared.tool_calling,
            metrics=metrics,
            adapter=hash_tree(adapter_dir),
        )
        write_manifest(stage / RUN_FILE, manifest)


def main_first(step, rank: int, world: int, backend: str, timeout_s: float):
    """Run `step` on rank 0, then, after a barrier, on the others (which only read what rank 0
    wrote). Joins the process group torchrun prepared; the Trainer reuses it, with its timeout:
    how long a rank waits in a collective (this barrier while rank 0 tokenizes, the barriers
    around rank 0's checkpoint writes) before the run fails."""
    if world == 1:
        return step()
    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    result = step() if rank == 0 else None
    dist.barrier()
    return result if rank == 0 else step()


def leave_process_group(world: int) -> None:
    """Close the group once every rank is done with it: a rank that exits while the group is
    alive can abort in gloo's threads ('terminate called without an active exception')."""
    if world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
