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

Rows of a batch often begin with the same tokens: a system prompt, the tool list of every tool
conversation (~490 tokens of the demo's ~960). With `share_prefix`, the model runs that prefix
once, for one row, keeps its keys and values, and runs the rest of each row against them: the
same hidden states and gradients (the prefix's are summed over the rows it stands for), for
half the computation on the demo's tool batches.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from transformers import DynamicCache, Trainer
from transformers.cache_utils import DynamicLayer

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


# Below this many shared tokens a second forward call may cost more than it saves. The base's
# own 24-token system prompt on 8 of the demo's short chats saves ~5% of a step on a 2-core
# AVX512-BF16 CPU (bench/prefix.py).
SHARED_PREFIX_MIN = 16


def shared_prefix(input_ids: Any, attention_mask: Any) -> int:
    """How many tokens every row of a right-padded batch begins with, short of each row's last
    token (so every row keeps one of its own); 0 for one row, or a prefix under
    SHARED_PREFIX_MIN."""
    rows = input_ids.shape[0]
    if rows < 2 or attention_mask is None:
        return 0
    shortest = int(attention_mask.sum(-1).min())
    if shortest - 1 < SHARED_PREFIX_MIN or not bool(attention_mask[:, :shortest].all()):
        return 0  # a row too short, or padding on the left
    same = (input_ids[:, : shortest - 1] == input_ids[:1, : shortest - 1]).all(0)
    length = int(same.int().cumprod(0).sum())
    return length if length >= SHARED_PREFIX_MIN else 0


def plain_cache(cache: Any, length: int) -> bool:
    """A cache of full attention's keys and values, every layer `length` tokens: what can stand
    for the prefix of every row (not sliding windows, linear attention or quantized caches)."""
    return type(cache) is DynamicCache and all(
        type(layer) is DynamicLayer and layer.get_seq_length() == length for layer in cache.layers
    )


def forward_with_shared_prefix(model: Any, inputs: dict[str, Any], prefix: int, keep: Any) -> Any:
    """The model's forward on a batch whose rows all begin with the same `prefix` tokens: the
    prefix once, for the first row, then every row's rest against its keys and values. Returns
    the second pass's outputs, or None when the model's cache cannot be shared (nothing of the
    batch computed then)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    head = model(
        input_ids=ids[:1, :prefix],
        attention_mask=mask[:1, :prefix],
        use_cache=True,
        logits_to_keep=keep,
    )
    cache = head.past_key_values
    if not plain_cache(cache, prefix):
        return None
    cache.batch_repeat_interleave(ids.shape[0])  # differentiable: the rows' gradients add up
    return model(
        input_ids=ids[:, prefix:],
        attention_mask=mask,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=keep,
    )


def full_weight(weight: Any) -> Any:
    """The whole output layer (FSDP may hold only this rank's shard of it)."""
    return weight.full_tensor() if isinstance(weight, DTensor) else weight


class LossTrainer(Trainer):
    """A Trainer whose batches may carry `distill` (a bool per row) with the teacher's top-k
    `teacher_ids` and `teacher_logprobs` of those rows: they learn the base model's
    distribution, the others their text. loss_chunk: tokens per chunk of the output layer (0:
    the model's full logits)."""

    def __init__(self, *args: Any, loss_chunk: int = 0, share_prefix: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.loss_chunk = loss_chunk
        # a prefix's keys and values are reused across rows, so only with the chunked loss
        # (which needs the hidden states, not the logits) and a batch without other inputs
        self.share_prefix = share_prefix and bool(loss_chunk)
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
            keep = one_position(labels.device)
            with final_hidden(causal_lm) as seen:
                outputs = self.shared_forward(model, inputs, keep)
                if outputs is None:
                    seen.clear()
                    outputs = model(**inputs, logits_to_keep=keep)
            hidden = (
                seen[-1]
                if len(seen) == 1
                else torch.cat([seen[0].expand(labels.shape[0], -1, -1), seen[1]], dim=1)
            )
            weight = full_weight(causal_lm.get_output_embeddings().weight)
            total, tokens = chunked_token_losses(
                hidden, teacher, labels, distill, weight, self.loss_chunk
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

    def shared_forward(self, model: Any, inputs: dict[str, Any], keep: Any) -> Any:
        """forward_with_shared_prefix where the batch shares a prefix (None where it does not,
        and from then on where the model's cache cannot be shared)."""
        if not self.share_prefix or set(inputs) != {"input_ids", "attention_mask"}:
            return None
        prefix = shared_prefix(inputs["input_ids"], inputs["attention_mask"])
        if not prefix:
            return None
        outputs = forward_with_shared_prefix(model, inputs, prefix, keep)
        if outputs is None:
            self.share_prefix = False
        return outputs
