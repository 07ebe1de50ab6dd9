"""Distillation to the base model on replay data: keep what the base model knows.

Conversations from `distill: true` sources (typically the base model's own answers to general
prompts) are trained toward the base model's whole next-token distribution, a KL term against
the same network with the adapter switched off, instead of cross-entropy on their text. Hard
labels teach only the token the base picked and sharpen it; the KL term also keeps the
runner-up tokens at the base's odds, the margins that loosely held facts rest on. The other
conversations keep plain cross-entropy, and both sum over tokens into one mean, so a distilled
token weighs as much as a taught one. The Trainer that runs it is in loss.py (which also computes
the same sums from hidden states in chunks); this module holds the loss on full logits.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

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
