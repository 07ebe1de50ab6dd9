"""Preemption-safe checkpoints and resume.

A run works in OUTPUT_DIR/NAME.work/ until it finishes:
  plan.json            what the run trains (config + data hashes): a restart must match it
  .incoming/           the Trainer writes a checkpoint here first
  checkpoints/checkpoint-N/   complete checkpoints only: fsynced, then renamed into place
A killed run leaves at worst a partial folder in .incoming/, which the next start deletes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME
from transformers.utils import ADAPTER_SAFE_WEIGHTS_NAME

from tuneship.infra.errors import TuneshipError
from tuneship.infra.fsutil import fsync_tree, write_json_atomic

from . import sharded

if TYPE_CHECKING:
    from peft import PeftModel
from .ranks import agreed

PLAN = "plan.json"
INCOMING = ".incoming"
COMPLETE = "checkpoints"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Keys that change how a run is watched, not what it computes: a resume may change them.
RUNTIME_KEYS = {"log_format", "metrics_port", "output_dir", "keep_checkpoints"}
# The tokenized data of this start (tokenized.py): made before the resume point is looked for,
# so a --restart, which discards checkpoints, keeps it.
DATA_PREFIX = "tokenized-"


def work_dir(out_dir: Path) -> Path:
    return out_dir.with_name(f"{out_dir.name}.work")


def complete_checkpoints(work: Path) -> list[Path]:
    folder = work / COMPLETE
    found = [
        p
        for p in (folder.iterdir() if folder.is_dir() else [])
        if _CHECKPOINT.match(p.name) and (p / "trainer_state.json").is_file()
    ]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    match = _CHECKPOINT.match(path.name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint folder (checkpoint-STEP)")
    return int(match.group(1))


def plan_for(cfg_dump: dict[str, Any], data_sha256: dict[str, str]) -> dict[str, Any]:
    config = {k: v for k, v in cfg_dump.items() if k not in RUNTIME_KEYS}
    return {"config": config, "data_sha256": data_sha256}


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def resume_point(work: Path, plan: dict[str, Any], restart: bool, is_main: bool) -> Path | None:
    """The newest complete checkpoint of the same plan, or None to start from step 0.

    Only the main process changes the folder; the others just read it (after a barrier).
    """
    if is_main:
        if restart and work.exists():
            for child in work.iterdir():
                if child.name.startswith(DATA_PREFIX):
                    continue
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        shutil.rmtree(work / INCOMING, ignore_errors=True)
    saved = work / PLAN
    if saved.is_file():
        previous = json.loads(saved.read_text(encoding="utf-8"))
        if previous != plan:
            changed = _differences(previous, plan)
            raise TuneshipError(
                f"{work} holds checkpoints of a run with different settings or data "
                f"({'; '.join(changed[:5])}); pass --restart to discard them and start over, "
                "or choose another name"
            )
    elif is_main:
        write_json_atomic(saved, plan)
    found = complete_checkpoints(work)
    return found[-1] if found else None


def preflight(work: Path, need_bytes: int) -> None:
    """Fail before training, not at the first checkpoint, when the output cannot be written."""
    try:
        work.mkdir(parents=True, exist_ok=True)
        probe = work / f".write-test-{os.getpid()}"
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
    except OSError as exc:
        raise TuneshipError(
            f"cannot write to the output folder {work.parent}: {exc.strerror or exc}; "
            "check output_dir, its permissions (the container runs as a non-root user) "
            "and the volume mount"
        ) from None
    free = shutil.disk_usage(work).free
    if free < need_bytes:
        raise TuneshipError(
            f"only {free / 2**20:.0f} MiB free under {work.parent}; this run needs about "
            f"{need_bytes / 2**20:.0f} MiB for its checkpoints and adapter; free space, "
            "lower keep_checkpoints, or point output_dir elsewhere"
        )


def publish(incoming: Path, work: Path, keep: int) -> Path:
    """Make a fully written checkpoint visible in one rename, then prune old ones."""
    fsync_tree(incoming)
    target = work / COMPLETE / incoming.name
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        shutil.rmtree(target)
    os.replace(incoming, target)
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    for old in complete_checkpoints(work)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


class CheckpointingTrainer(Trainer):
    """A Trainer whose checkpoints are published atomically (see the module docstring).

    keep_checkpoints: newest complete checkpoints kept; extra_state: an object with
    save(folder) for state the Trainer does not keep (the best adapter so far)."""

    def __init__(self, *args: Any, work: Path, keep_checkpoints: int, extra_state: Any = None,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        self.work, self.keep_checkpoints, self.extra_state = work, keep_checkpoints, extra_state

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        assert self.args.output_dir is not None  # the Trainer is built with the work folder
        written = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        self.accelerator.wait_for_everyone()
        if self.is_world_process_zero():
            if self.extra_state is not None:
                self.extra_state.save(written)
            publish(written, self.work, self.keep_checkpoints)
        self.accelerator.wait_for_everyone()

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not self.is_fsdp_enabled:
            return super().save_model(output_dir, _internal_call)
        model = cast("PeftModel", self.model)
        state = sharded.trainable_state(model)  # the adapter alone (sharded.py says why)
        target = output_dir or self.args.output_dir
        if self.args.should_save and target is not None:
            model.save_pretrained(target, state_dict=state)
        return None

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.is_fsdp_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        assert self.lr_scheduler is not None  # created with the optimizer, before any save
        state = sharded.optimizer_state(self.model, self.optimizer)
        if self.args.should_save:
            torch.save(state, Path(output_dir) / OPTIMIZER_NAME)
            torch.save(self.lr_scheduler.state_dict(), Path(output_dir) / SCHEDULER_NAME)
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if not self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        saved = load_file(Path(resume_from_checkpoint) / ADAPTER_SAFE_WEIGHTS_NAME)
        model = cast("PeftModel", self.model)
        # the adapter file's keys are PEFT's: the parameter names without the adapter's name
        adapter = f".{model.active_adapter}."
        by_param = {
            name: saved[name.replace(adapter, ".")]
            for name, param in model.named_parameters()
            if param.requires_grad
        }
        sharded.load_trainable(model, by_param)
        return None

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return None
        folder = Path(checkpoint)
        assert self.optimizer is not None and self.lr_scheduler is not None  # created first
        if self.is_fsdp_enabled:
            saved = torch.load(folder / OPTIMIZER_NAME, map_location="cpu", weights_only=True)
            sharded.load_optimizer_state(self.model, self.optimizer, saved)
        elif self.args.device.type == "cpu" and self.args.device.index is not None:
            # With several processes the Trainer loads the optimizer state onto args.device; on
            # CPU that is `cpu:0`, which torch.load cannot map to ("don't know how to restore
            # data location ... cpu:0"), so a distributed CPU run could not resume. Loaded on
            # the CPU instead; load_state_dict moves it to each parameter's device.
            saved = torch.load(folder / OPTIMIZER_NAME, map_location="cpu", weights_only=True)
            self.optimizer.load_state_dict(saved)
        else:
            return super()._load_optimizer_and_scheduler(checkpoint)
        self.lr_scheduler.load_state_dict(torch.load(folder / SCHEDULER_NAME, weights_only=True))
        return None


class SaveOnSigterm(TrainerCallback):
    """SIGTERM (Kubernetes eviction, spot reclaim, `docker stop`): finish the current step,
    write a checkpoint, stop.

    The signal may reach only some ranks: torchrun forwards it to its own workers only, and in
    a multi-pod job only the evicted pod is signalled. A rank that stopped alone would leave the
    others waiting in a collective until the timeout, so at every step boundary the ranks
    all-reduce the flag (one scalar) and stop together, at the same step, with one checkpoint.
    `stopped` is that agreed decision; a signal after the last step lets the run finish."""

    def __init__(self) -> None:
        self.received = False  # this process was signalled
        self.stopped = False  # every rank agreed to stop here
        self.decided_at: float | None = None
        self.checkpoint_s: float | None = None
        self.previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = True

    def on_train_begin(self, args, state, control, **kwargs):
        self.previous = signal.signal(signal.SIGTERM, self._handle)

    def on_step_end(self, args, state, control, **kwargs):
        if agreed(self.received, args.device):
            self.stopped, self.decided_at = True, time.monotonic()
            control.should_save = True
            control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        if self.stopped and self.decided_at is not None:
            self.checkpoint_s = round(time.monotonic() - self.decided_at, 2)

    def on_train_end(self, args, state, control, **kwargs):
        # once stopping, a second SIGTERM (torchrun terminating the other workers after one
        # exited) must not kill this rank before it has left the process group and exited 143
        if not self.stopped:
            signal.signal(signal.SIGTERM, self.previous)
