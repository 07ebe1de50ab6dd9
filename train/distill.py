"""Distillation to the base model on replay data: keep what the base model knows.

Conversations from `distill: true` sources (typically the base model's own answers to general
prompts) are trained toward the base model's next-token distribution, a KL term, instead of
cross-entropy on their text: its top k tokens with their log-probabilities and the rest as one
bucket, computed once before training (teacher.py). Hard labels teach only the token the base
picked and sharpen it; the KL term also keeps the runner-up tokens at the base's odds, the
margins that loosely held facts rest on. The other
conversations keep plain cross-entropy, and both sum over tokens into one mean, so a distilled
token weighs as much as a taught one. The Trainer that runs it is in loss.py (which also computes
the same sums from hidden states in chunks); this module holds the loss on full logits.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from tuneship.chat.labels import IGNORE


def top_k_kl(log_p: Any, ids: Any, logprobs: Any) -> Any:
    """Summed KL(teacher || student) over N positions, the teacher given by its top k tokens
    (ids, logprobs: [N, k]) and the rest of its probability as one bucket: the exact KL between
    the two distributions with every token outside the top k merged into that bucket.
    log_p: the student's log-probabilities [N, vocab]."""
    logprobs = logprobs.to(log_p.dtype)
    p = logprobs.exp()
    ids = ids.long()
    log_q = log_p.gather(-1, ids)
    kl = (p * (logprobs - log_q)).sum()
    if ids.shape[-1] == log_p.shape[-1]:
        return kl  # every token is in the top k: no bucket
    p_rest = (1 - p.sum(-1)).clamp(min=0)
    log_q_rest = log_p.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return (
        kl + torch.where(p_rest > 0, p_rest * (p_rest.clamp(min=1e-30).log() - log_q_rest), 0).sum()
    )


def token_losses(
    logits: Any, teacher: tuple[Any, Any] | None, labels: Any, distill: Any
) -> tuple[Any, Any]:
    """Summed loss over the trained tokens of a batch, and how many tokens it covers.

    logits: [batch, seq, vocab], unshifted; teacher: the teacher's top-k (ids, logprobs)
    [distilled tokens, k] of the distilled rows' trained positions in order (None when there
    are none); labels: [batch, seq]; distill: [batch] bool, rows trained by KL.
    """
    targets = labels[:, 1:]
    trained = targets != IGNORE
    soft = trained & distill[:, None]
    hard = trained & ~soft
    predicted = logits[:, :-1]
    total = F.cross_entropy(predicted[hard].float(), targets[hard], reduction="sum")
    if soft.any():
        assert teacher is not None  # distilled rows come with their targets
        student = F.log_softmax(predicted[soft].float(), dim=-1)
        total = total + top_k_kl(student, *teacher)
    return total, trained.sum().to(torch.float32)
