"""The training loss: cross-entropy on taught rows, KL to the base model on distilled rows
(distill.py says why), computed from the final hidden states a chunk of tokens at a time.

A causal LM computes logits for every position of the batch, and its loss upcasts them to fp32:
with a 128k vocabulary, a packed batch of 4 x 2048 tokens is 4.2 GB of fp32 logits, and their
gradient as much again. Here the model runs up to its final hidden states (logits for one
position only), and the loss applies the output layer to the trained tokens only, `loss_chunk`
of them at a time, computing each chunk's loss and its gradient with respect to the hidden
states at once: one chunk's logits exist at any time, and the backward pass only scales the
stored gradient (token x hidden size, not token x vocabulary). `loss_chunk: 0` keeps the model's
own full logits (token_losses in distill.py), for models whose output is more than a linear
layer (logit soft-capping or scaling).

The distilled rows' targets come with the batch (teacher.py computed them before training), so
a step runs the model once on every rank, whatever its rows: no teacher pass for the ranks of a
distributed run to agree on.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from transformers import Trainer

from tuneship.chat.labels import IGNORE

from .distill import token_losses


class OutputLayerLoss(torch.autograd.Function):
    """Summed loss of `hidden @ weight.T` over N tokens: cross-entropy against `targets`, or
    KL(teacher || student) against the teacher's top-k ids and log-probabilities [N, k]. The
    gradient with respect to `hidden` is computed chunk by chunk in the forward pass and kept
    for backward; `weight` (the frozen output layer) gets none."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, teacher_ids, teacher_logprobs, chunk):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            logits = (hidden[rows].to(weight.dtype) @ weight.T).float()
            log_p = logits.sub_(logits.logsumexp(-1, keepdim=True))  # in place: one buffer
            if teacher_ids is None:
                picked = targets[rows, None]
                total += -log_p.gather(-1, picked).sum()
                dlogits = log_p.exp_()  # softmax minus the one-hot target
                dlogits.scatter_add_(-1, picked, torch.full_like(picked, -1, dtype=dlogits.dtype))
            else:
                loss, dlogits = top_k_kl_and_gradient(
                    log_p, teacher_ids[rows], teacher_logprobs[rows]
                )
                total += loss
            grad[rows] = (dlogits.to(weight.dtype) @ weight).to(grad.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None, None, None


def top_k_kl_and_gradient(log_p: Any, ids: Any, logprobs: Any) -> tuple[Any, Any]:
    """distill.top_k_kl and its gradient with respect to the logits, reusing log_p's buffer:
    the student's probabilities minus the teacher's, where the teacher's bucket mass is spread
    over the tokens outside its top k in the student's proportions."""
    logprobs = logprobs.to(log_p.dtype)
    p = logprobs.exp()
    ids = ids.long()
    log_q = log_p.gather(-1, ids)
    loss = (p * (logprobs - log_q)).sum()
    mass = p.sum(-1, keepdim=True)  # what the gradient's student term is scaled by
    if ids.shape[-1] == log_p.shape[-1]:  # every token is in the top k: no bucket
        dlogits = log_p.exp_().mul_(mass)
        return loss, dlogits.scatter_add_(-1, ids, -p)
    p_rest = (1 - p.sum(-1)).clamp(min=0)
    log_p.scatter_(-1, ids, float("-inf"))  # from here on: the tokens outside the top k
    log_q_rest = log_p.logsumexp(-1)
    log_ratio = torch.where(p_rest > 0, p_rest.clamp(min=1e-30).log() - log_q_rest, -torch.inf)
    loss = loss + torch.where(p_rest > 0, p_rest * log_ratio, 0).sum()
    spread = (log_p + log_ratio[:, None]).exp_()
    mass = mass + p_rest[:, None]
    dlogits = log_p.exp_().mul_(mass).sub_(spread)
    dlogits.scatter_(-1, ids, log_q.exp() * mass - p)
    return loss, dlogits


def chunked_token_losses(
    hidden: Any, teacher: tuple[Any, Any] | None, labels: Any, distill: Any, weight: Any, chunk: int
) -> tuple[Any, Any]:
    """token_losses (distill.py) from final hidden states [batch, seq, hidden] and the output
    layer's weight [vocab, hidden], never holding more than `chunk` tokens' logits."""
    targets = labels[:, 1:]
    trained = targets != IGNORE
    soft = trained & distill[:, None]
    hard = trained & ~soft
    predicted = hidden[:, :-1]
    total = OutputLayerLoss.apply(predicted[hard], weight, targets[hard], None, None, chunk)
    if soft.any():
        assert teacher is not None  # distilled rows come with their targets
        total = total + OutputLayerLoss.apply(predicted[soft], weight, None, *teacher, chunk)
    return total, trained.sum().to(torch.float32)


def not_chunkable(causal_lm: Any) -> str | None:
    """Why the chunked loss cannot reproduce this model's logits (None: it can)."""
    head = causal_lm.get_output_embeddings()
    config = causal_lm.config
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return "its output layer is not a plain linear layer without bias"
    if head.weight.requires_grad:
        return "its output layer is trained"
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", 1) != 1:
        return "it soft-caps or scales its logits"
    if "logits_to_keep" not in inspect.signature(causal_lm.forward).parameters:
        return "its forward has no logits_to_keep"
    return None


def one_position(device: Any) -> Any:
    """`logits_to_keep` for one position, as indices: an int keeps a strided slice of the hidden
    states, and the output layer on a non-contiguous 3-d input takes a batched matmul that
    copies its weight once per row (on CPU, about 1 s of a demo step)."""
    return torch.zeros(1, dtype=torch.long, device=device)


@contextmanager
def final_hidden(causal_lm: Any) -> Iterator[list[Any]]:
    """Collects the decoder's output (after the final norm) of each forward pass inside."""
    seen: list[Any] = []

    def keep(module, args, output):
        seen.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = causal_lm.get_decoder().register_forward_hook(keep)
    try:
        yield seen
    finally:
        handle.remove()


def full_weight(weight: Any) -> Any:
    """The whole output layer (FSDP may hold only this rank's shard of it)."""
    return weight.full_tensor() if isinstance(weight, DTensor) else weight


class LossTrainer(Trainer):
    """A Trainer whose batches may carry `distill` (a bool per row) with the teacher's top-k
    `teacher_ids` and `teacher_logprobs` of those rows: they learn the base model's
    distribution, the others their text. loss_chunk: tokens per chunk of the output layer (0:
    the model's full logits)."""

    def __init__(self, *args: Any, loss_chunk: int = 0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.loss_chunk = loss_chunk
        # compute_loss divides by the token count of the whole accumulated batch itself: the
        # Trainer must not divide again by the accumulation steps
        self.model_accepts_loss_kwargs = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        distill = inputs.pop("distill", None)
        if distill is None:
            distill = torch.zeros(labels.shape[0], dtype=torch.bool, device=labels.device)
        teacher = (inputs.pop("teacher_ids", None), inputs.pop("teacher_logprobs", None))
        if bool(distill.any()) and teacher[0] is None:
            raise ValueError("distilled rows need their teacher targets (teacher.py)")
        causal_lm = self.accelerator.unwrap_model(model).get_base_model()
        if self.loss_chunk:
            with final_hidden(causal_lm) as seen:
                outputs = model(**inputs, logits_to_keep=one_position(labels.device))
            weight = full_weight(causal_lm.get_output_embeddings().weight)
            total, tokens = chunked_token_losses(
                seen[-1], teacher, labels, distill, weight, self.loss_chunk
            )
        else:
            outputs = model(**inputs)
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
