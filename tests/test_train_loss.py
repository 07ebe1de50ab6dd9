"""The loss from hidden states in chunks (train/loss.py): same loss and gradients as the full
logits, without ever holding the whole batch's logits; and with a batch's shared prefix run
once, the same loss and gradients again."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tuneship.chat.labels import IGNORE
from tuneship.train.distill import token_losses
from tuneship.train.loss import (
    SHARED_PREFIX_MIN,
    LossTrainer,
    chunked_token_losses,
    not_chunkable,
    plain_cache,
    shared_prefix,
)

VOCAB, HIDDEN = 37, 8


def batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 9, HIDDEN, generator=gen, dtype=torch.float64)
    teacher = torch.randn(3, 9, HIDDEN, generator=gen, dtype=torch.float64)
    weight = torch.randn(VOCAB, HIDDEN, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, VOCAB, (3, 9), generator=gen)
    labels[:, :3] = IGNORE  # the prompt
    labels[2, -2:] = IGNORE  # padding
    return hidden, teacher, weight, labels


def top_k_targets(teacher_hidden, weight, labels, distill, k: int):
    """The teacher's top-k targets at the distilled rows' trained positions, in loss order."""
    soft = (labels[:, 1:] != IGNORE) & distill[:, None]
    top = (teacher_hidden[:, :-1][soft] @ weight.T).log_softmax(-1).topk(k, dim=-1)
    return top.indices.to(torch.int32), top.values


@pytest.mark.parametrize("k", [1, 5, VOCAB])
@pytest.mark.parametrize("chunk", [1, 4, 1000])
@pytest.mark.parametrize("rows", [[False, False, False], [True, False, True], [True, True, True]])
def test_chunked_loss_and_gradient_equal_the_full_logits(chunk, rows, k):
    hidden, teacher, weight, labels = batch()
    distill = torch.tensor(rows)
    targets = top_k_targets(teacher, weight, labels, distill, k)
    full_h = hidden.clone().requires_grad_(True)
    expected, tokens = token_losses(full_h @ weight.T, targets, labels, distill)
    (expected * 0.7).backward()

    chunk_h = hidden.clone().requires_grad_(True)
    got, got_tokens = chunked_token_losses(chunk_h, targets, labels, distill, weight, chunk)
    (got * 0.7).backward()
    assert got_tokens == tokens
    assert torch.allclose(got, expected, rtol=1e-6)
    assert torch.allclose(chunk_h.grad, full_h.grad, rtol=1e-5, atol=1e-9)
    assert full_h.grad.abs().sum() > 0


class LargestVocabTensor(TorchDispatchMode):
    """Records the most token rows of any tensor created with a vocabulary-wide last axis
    (views of the output layer's own weight aside)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.vocab, self.weight_storage = weight.shape[0], weight.untyped_storage().data_ptr()
        self.rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if not isinstance(tensor, torch.Tensor) or not tensor.dim():
                continue
            if tensor.untyped_storage().data_ptr() == self.weight_storage:
                continue
            if tensor.shape[-1] == self.vocab:
                self.rows = max(self.rows, tensor.numel() // self.vocab)
        return out


def tiny_trainer(tmp_path, tiny_base, loss_chunk: int, share_prefix: bool = False):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, TrainingArguments

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_base),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM"),
    )
    for name, weight in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(weight, std=0.5)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    return LossTrainer(model=model, args=args, loss_chunk=loss_chunk, share_prefix=share_prefix)


def inputs(rows: int = 4, length: int = 24, k: int = 7, vocab: int = 300) -> dict:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (rows, length), generator=gen)
    labels = ids.clone()
    labels[:, :6] = IGNORE
    distill = torch.arange(rows) % 2 == 0
    positions = int(distill.sum()) * (length - 6)
    # a teacher's top k: distinct tokens, log-probabilities that leave some mass to the rest
    teacher_ids = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(positions)])
    teacher_logprobs = (torch.rand(positions, k, generator=gen) / k).log()
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "distill": distill,
        "teacher_ids": teacher_ids,
        "teacher_logprobs": teacher_logprobs,
    }


def test_the_trainer_never_holds_the_whole_batch_logits(tmp_path, tiny_base):
    """4 rows x 24 tokens: the full-logits loss (loss_chunk 0, the old path) creates 96-row
    vocabulary tensors; the chunked one none over its chunk of 8 tokens."""
    seen = {}
    for chunk in (0, 8):
        trainer = tiny_trainer(tmp_path, tiny_base, chunk)
        weight = trainer.model.get_base_model().get_output_embeddings().weight
        with LargestVocabTensor(weight) as probe:
            trainer.compute_loss(trainer.model, inputs(), num_items_in_batch=None).backward()
        seen[chunk] = probe.rows
    assert seen[0] >= 4 * 24
    assert seen[8] <= 8


def test_the_trainer_gets_the_same_loss_and_gradients_chunked(tmp_path, tiny_base):
    results = []
    for chunk in (0, 5):
        trainer = tiny_trainer(tmp_path, tiny_base, chunk)
        loss = trainer.compute_loss(trainer.model, inputs(), num_items_in_batch=torch.tensor(50))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    (full, full_grads), (chunked, chunked_grads) = results
    assert torch.allclose(chunked, full, rtol=1e-5)
    assert full_grads.keys() == chunked_grads.keys() and full_grads
    for name, grad in full_grads.items():
        assert torch.allclose(chunked_grads[name], grad, rtol=1e-4, atol=1e-6), name


def test_models_whose_logits_are_more_than_a_linear_layer_keep_full_logits(tiny_base):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base).requires_grad_(False)  # as under LoRA
    assert not_chunkable(model) is None
    model.config.final_logit_softcapping = 30.0
    assert "soft-caps" in not_chunkable(model)


def prefixed_inputs(prefix: int = SHARED_PREFIX_MIN + 8) -> dict:
    """inputs() whose 4 rows begin with the same `prefix` tokens, the last two right-padded (as
    pad_collate pads), the first row's labels reaching into the prefix."""
    batch = inputs(length=prefix + 20)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    ids[:, :prefix] = ids[0, :prefix]
    labels[:, :prefix] = IGNORE
    labels[0, prefix - 5 : prefix] = ids[0, prefix - 5 : prefix]
    for row, pad in ((2, 7), (3, 13)):
        ids[row, -pad:], labels[row, -pad:], mask[row, -pad:] = 0, IGNORE, 0
    distilled_positions = (labels[:, 1:] != IGNORE) & batch["distill"][:, None]
    batch["teacher_ids"] = batch["teacher_ids"][: int(distilled_positions.sum())]
    batch["teacher_logprobs"] = batch["teacher_logprobs"][: int(distilled_positions.sum())]
    return batch


def embedded_shapes(trainer) -> list[tuple[int, ...]]:
    """The input_ids shape of each forward pass the trainer's model makes, by a hook."""
    shapes: list[tuple[int, ...]] = []
    embedding = trainer.model.get_base_model().get_input_embeddings()
    embedding.register_forward_hook(lambda module, args, out: shapes.append(tuple(args[0].shape)))
    return shapes


def test_a_shared_prefix_runs_once_with_the_same_loss_and_gradients(tmp_path, tiny_base):
    results, shapes = [], []
    prefix = SHARED_PREFIX_MIN + 8
    for share in (False, True):
        trainer = tiny_trainer(tmp_path, tiny_base, 5, share_prefix=share)
        shapes.append(embedded_shapes(trainer))
        batch = prefixed_inputs(prefix)
        loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=torch.tensor(40))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    length = prefix + 20
    assert shapes == [[(4, length)], [(1, prefix), (4, length - prefix)]]
    (whole, whole_grads), (shared, shared_grads) = results
    assert torch.allclose(shared, whole, rtol=1e-5)
    assert whole_grads.keys() == shared_grads.keys() and whole_grads
    for name, grad in whole_grads.items():
        assert torch.allclose(shared_grads[name], grad, rtol=1e-4, atol=1e-6), name


def test_the_shared_prefix_is_what_every_row_begins_with_short_of_its_last_token():
    ids = torch.arange(4 * 50).reshape(4, 50) % 7 + 10
    ids[:] = ids[0]
    mask = torch.ones_like(ids)
    ids[1, 45] = 99
    assert shared_prefix(ids, mask) == 45
    mask[2, 40:] = 0  # row 2 has 40 tokens: one of its own stays out of the prefix
    assert shared_prefix(ids, mask) == 39
    assert shared_prefix(ids[:1], mask[:1]) == 0  # one row: nothing to share
    ids[3, SHARED_PREFIX_MIN - 1] = 98
    assert shared_prefix(ids, mask) == 0  # too short to pay for a second forward call
    left = torch.ones_like(ids)
    left[1, :3] = 0  # left padding: the rows' tokens do not line up
    assert shared_prefix(torch.full_like(ids, 5), left) == 0


def test_a_cache_that_cannot_stand_for_every_row_is_not_shared(tmp_path, tiny_base):
    """A sliding-window model's cache drops old keys: the trainer computes the batch whole and
    stops trying to share (same loss as without sharing)."""
    from transformers import DynamicCache, MistralConfig
    from transformers.cache_utils import DynamicSlidingWindowLayer

    plain = DynamicCache()
    plain.update(torch.zeros(1, 2, 40, 4), torch.zeros(1, 2, 40, 4), 0)
    assert plain_cache(plain, 40) and not plain_cache(plain, 39)
    sliding = DynamicCache(config=MistralConfig(num_hidden_layers=1, sliding_window=16))
    assert isinstance(sliding.layers[0], DynamicSlidingWindowLayer)
    sliding.update(torch.zeros(1, 2, 40, 4), torch.zeros(1, 2, 40, 4), 0)
    assert not plain_cache(sliding, 40)

    losses = []
    for share in (False, True):
        trainer = tiny_trainer(tmp_path, tiny_base, 5, share_prefix=share)
        if share:
            trainer.model.get_base_model().config.sliding_window = 16
            trainer.model.get_base_model().config.layer_types = ["sliding_attention"] * 2
        losses.append(trainer.compute_loss(trainer.model, prefixed_inputs()).detach())
    assert not trainer.share_prefix
    assert torch.allclose(losses[0], losses[1], rtol=1e-5)
