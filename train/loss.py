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

Under several processes the ranks take the same collective path: whether a teacher pass runs
(FSDP all-gathers in it, DDP syncs buffers) is agreed by all ranks, and a rank without distilled
rows runs it on one row and ignores the result.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from transformers import Trainer

from tuneship.chat_tokens import IGNORE

from .distill import token_losses
from .ranks import agreed


class OutputLayerLoss(torch.autograd.Function):
    """Summed loss of `hidden @ weight.T` over N tokens: cross-entropy against `targets`, or
    KL(teacher || student) where `teacher` holds the teacher's hidden states. The gradient with
    respect to `hidden` is computed chunk by chunk in the forward pass and kept for backward;
    `weight` (the frozen output layer) gets none."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, teacher, chunk):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            logits = (hidden[rows].to(weight.dtype) @ weight.T).float()
            log_p = logits.sub_(logits.logsumexp(-1, keepdim=True))  # in place: one buffer
            if teacher is None:
                picked = targets[rows, None]
                total += -log_p.gather(-1, picked).sum()
                dlogits = log_p.exp_()  # softmax minus the one-hot target
                dlogits.scatter_add_(-1, picked, torch.full_like(picked, -1, dtype=dlogits.dtype))
            else:
                log_q = (teacher[rows].to(weight.dtype) @ weight.T).float().log_softmax(-1)
                q = log_q.exp()
                total += torch.sub(log_q, log_p).mul_(q).sum()
                dlogits = log_p.exp_().sub_(q)  # student minus teacher probabilities
            grad[rows] = (dlogits.to(weight.dtype) @ weight).to(grad.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None, None


def chunked_token_losses(
    hidden: Any, teacher: Any | None, labels: Any, distill: Any, weight: Any, chunk: int
) -> tuple[Any, Any]:
    """token_losses (distill.py) from final hidden states [batch, seq, hidden] and the output
    layer's weight [vocab, hidden], never holding more than `chunk` tokens' logits."""
    targets = labels[:, 1:]
    trained = targets != IGNORE
    soft = trained & distill[:, None]
    hard = trained & ~soft
    predicted = hidden[:, :-1]
    total = OutputLayerLoss.apply(predicted[hard], weight, targets[hard], None, chunk)
    if soft.any():
        taught = teacher[:, :-1][soft[distill]]
        total = total + OutputLayerLoss.apply(predicted[soft], weight, None, taught, chunk)
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
    """A Trainer whose batches may carry `distill` (a bool per row): those rows learn the base
    model's distribution, the others its text. loss_chunk: tokens per chunk of the output layer
    (0: the model's full logits); distills: the data has distilled rows (else no teacher check)."""

    def __init__(self, *args: Any, loss_chunk: int = 0, distills: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.loss_chunk, self.distills = loss_chunk, distills
        # compute_loss divides by the token count of the whole accumulated batch itself: the
        # Trainer must not divide again by the accumulation steps
        self.model_accepts_loss_kwargs = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        distill = inputs.pop("distill", None)
        if distill is None:
            distill = torch.zeros(labels.shape[0], dtype=torch.bool, device=labels.device)
        causal_lm = self.accelerator.unwrap_model(model).get_base_model()
        teacher = self.teacher_pass(model, inputs, distill, causal_lm)
        if self.loss_chunk:
            with final_hidden(causal_lm) as seen:
                outputs = model(**inputs, logits_to_keep=1)
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

    def teacher_pass(self, model: Any, inputs: dict, distill: Any, causal_lm: Any) -> Any | None:
        """The base model's (adapter off) hidden states or logits for the distilled rows; None
        when no rank has any. Runs on every rank when any rank needs it."""
        if not (self.distills and agreed(bool(distill.any()), distill.device)):
            return None
        # a rank without distilled rows joins in on its first row and drops the result
        rows = distill if distill.any() else torch.arange(len(distill), device=distill.device) < 1
        batch = {key: value[rows] for key, value in inputs.items()}
        adapter_off = self.accelerator.unwrap_model(model).disable_adapter()
        with torch.no_grad(), adapter_off:
            if not self.loss_chunk:
                return model(**batch).logits
            with final_hidden(causal_lm) as seen:
                model(**batch, logits_to_keep=1)
            return seen[-1]
