"""Distillation to the base model on replay data: keep what the base model knows.

Conversations from `distill: true` sources (typically the base model's own answers to general
prompts) are trained toward the base model's whole next-token distribution, a KL term against
the same network with the adapter switched off, instead of cross-entropy on their text. Hard
labels teach only the token the base picked and sharpen it; the KL term also keeps the
runner-up tokens at the base's odds, the margins that loosely held facts rest on. The other
conversations keep plain cross-entropy, and both sum over tokens into one mean, so a distilled
token weighs as much as a taught one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer

from tuneship.chat_tokens import IGNORE


def token_losses(
    logits: Any, teacher_logits: Any | None, labels: Any, distill: Any
) -> tuple[Any, Any]:
    """Summed loss over the trained tokens of a batch, and how many tokens it covers.

    logits: [batch, seq, vocab], unshifted; teacher_logits: the same for the distilled rows
    only (None when there are none); labels: [batch, seq]; distill: [batch] bool, rows trained
    by KL.
    """
    targets = labels[:, 1:]
    trained = targets != IGNORE
    soft = trained & distill[:, None]
    hard = trained & ~soft
    predicted = logits[:, :-1]
    total = F.cross_entropy(predicted[hard].float(), targets[hard], reduction="sum")
    if soft.any():
        student = F.log_softmax(predicted[soft].float(), dim=-1)
        teacher = F.log_softmax(teacher_logits[:, :-1][soft[distill]].float(), dim=-1)
        total = total + F.kl_div(student, teacher, log_target=True, reduction="sum")
    return total, trained.sum().to(torch.float32)


class DistillingTrainer(Trainer):
    """A Trainer whose batches may carry `distill` (a bool per row): those rows learn the base
    model's distribution (see the module docstring). Batches without it train as usual."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        distill = inputs.pop("distill", None)
        if distill is None or not bool(distill.any()):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        # the teacher only sees the distilled rows: its forward pass is the added cost
        rows = {key: value[distill] for key, value in inputs.items()}
        with torch.no_grad(), self.accelerator.unwrap_model(model).disable_adapter():
            teacher = model(**rows).logits
        total, tokens = token_losses(outputs.logits, teacher, labels, distill)
        if num_items_in_batch is None:
            loss = total / tokens.clamp(min=1)
        else:
            # the Trainer counts tokens over the accumulated batches and, averaging across
            # devices, sums the gradients of all ranks: scale as its own loss does
            loss = total / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss
