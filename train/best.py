"""Early stopping on the eval loss, keeping the best adapter (LoRA weights are small).

Under FSDP each rank holds a shard of the adapter: the snapshot gathers it whole on every rank
(every rank evaluates, so every rank takes part), rank 0 writes it into checkpoints, and putting
it back hands each rank its shard again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from .sharded import load_trainable, trainable_state

BEST_WEIGHTS = "best_adapter.safetensors"
BEST_STATE = "best.json"


class BestAdapter(TrainerCallback):
    """Remembers the adapter with the lowest eval loss; stops after `patience` evals without
    improvement. Its state travels in checkpoints (save/load)."""

    def __init__(self, model: Any, patience: int | None) -> None:
        self.model, self.patience = model, patience
        self.best_loss: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0
        self.stopped_early = False
        self.weights: dict[str, Any] | None = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        loss = (metrics or {}).get("eval_loss")
        if loss is None:
            return
        if self.best_loss is None or loss < self.best_loss:
            self.best_loss, self.best_step, self.bad_evals = loss, state.global_step, 0
            self.weights = trainable_state(self.model)
        else:
            self.bad_evals += 1
            if self.patience and self.bad_evals >= self.patience:
                self.stopped_early = True
                control.should_training_stop = True

    def save(self, folder: Path) -> None:
        if self.weights is None:
            return
        save_file({k: v.contiguous() for k, v in self.weights.items()}, folder / BEST_WEIGHTS)
        (folder / BEST_STATE).write_text(json.dumps(self.summary()), encoding="utf-8")

    def load(self, folder: Path) -> None:
        if (folder / BEST_STATE).is_file():
            state = json.loads((folder / BEST_STATE).read_text(encoding="utf-8"))
            self.best_loss, self.best_step = state["best_eval_loss"], state["best_step"]
            self.bad_evals = state["bad_evals"]
            self.weights = load_file(folder / BEST_WEIGHTS)

    def restore_best(self) -> bool:
        """Put the best adapter back into the model if it is not the current one."""
        if self.weights is None:
            return False
        load_trainable(self.model, self.weights)
        return True

    def summary(self) -> dict[str, Any]:
        return {
            "best_eval_loss": self.best_loss,
            "best_step": self.best_step,
            "bad_evals": self.bad_evals,
            "stopped_early": self.stopped_early,
        }
