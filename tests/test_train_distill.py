"""Distillation to the base model on `distill: true` sources (train/distill.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from tests.support import train_config
from tuneship.chat_tokens import IGNORE
from tuneship.config import TrainConfig
from tuneship.manifest import read_run
from tuneship.train.distill import token_losses
from tuneship.train.examples import pad_collate
from tuneship.train.loss import LossTrainer
from tuneship.train.run import run

VOCAB = 11


def batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 6, VOCAB, generator=gen)
    labels = torch.randint(0, VOCAB, (2, 6), generator=gen)
    labels[:, :2] = IGNORE  # the prompt
    labels[1, -1] = IGNORE  # padding
    return logits, labels


def test_rows_without_distill_get_the_usual_cross_entropy():
    logits, labels = batch()
    total, tokens = token_losses(logits, None, labels, torch.tensor([False, False]))
    expected = F.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=IGNORE
    )
    assert tokens == (labels[:, 1:] != IGNORE).sum()
    assert torch.allclose(total / tokens, expected)


def test_a_distilled_row_learns_the_teacher_not_its_text():
    logits, labels = batch()
    distill = torch.tensor([True, False])
    plain, _ = token_losses(logits, None, labels, torch.tensor([False, False]))
    row1_alone, _ = token_losses(logits[1:], None, labels[1:], torch.tensor([False]))
    # the teacher agrees with the student on row 0: only row 1's cross-entropy is left
    same, _ = token_losses(logits, logits[distill].clone(), labels, distill)
    assert torch.allclose(same, row1_alone, atol=1e-5)
    assert same < plain
    # row 0's target tokens do not matter, the teacher does
    relabelled = labels.clone()
    relabelled[0, 2:] = (relabelled[0, 2:] + 1) % VOCAB
    assert torch.allclose(
        token_losses(logits, logits[distill], relabelled, distill)[0], same, atol=1e-5
    )
    other_teacher = batch(seed=1)[0]
    student = logits.clone().requires_grad_(True)
    moved, _ = token_losses(student, other_teacher[distill], labels, distill)
    assert moved > same + 0.1
    moved.backward()
    # the gradient on a distilled position is student minus teacher probabilities
    position = (0, 3)
    expected = student[position].softmax(-1) - other_teacher[position].softmax(-1)
    assert torch.allclose(student.grad[position], expected.detach(), atol=1e-5)


def test_collate_passes_the_distill_flags_as_one_tensor():
    rows = [
        {"input_ids": [5, 6], "labels": [-100, 6], "distill": True},
        {"input_ids": [7], "labels": [7], "distill": False},
    ]
    assert pad_collate(pad_id=0)(rows)["distill"].tolist() == [True, False]
    assert "distill" not in pad_collate(pad_id=0)([{"input_ids": [1], "labels": [1]}])


def distill_config(tmp_path, tiny_base, data, **overrides) -> TrainConfig:
    values = train_config(tmp_path, tiny_base, data).model_dump() | overrides
    return TrainConfig(**values | {"data": [{"path": str(data), "distill": True}]})


def adapted_model(tiny_base):
    """The tiny base with a LoRA adapter moved away from its no-op start."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_base),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    for name, weight in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(weight, std=0.5)
    return model.eval()


@pytest.mark.parametrize("loss_chunk", [0, 3])
def test_the_trainer_distills_toward_the_base_with_the_adapter_off(tmp_path, tiny_base, loss_chunk):
    from transformers import TrainingArguments

    model = adapted_model(tiny_base)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = LossTrainer(model=model, args=args, loss_chunk=loss_chunk, distills=True)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :3] = IGNORE
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with torch.no_grad():
        student = model(input_ids=ids).logits
        with model.disable_adapter():
            teacher = model(input_ids=ids).logits
        loss = trainer.compute_loss(model, inputs | {"distill": torch.tensor([True, True])})
        plain = trainer.compute_loss(model, inputs | {"distill": torch.tensor([False, False])})
        mixed = trainer.compute_loss(model, inputs | {"distill": torch.tensor([True, False])})
    # row-mean KL(base || adapted) over the trained positions, computed here from scratch
    position = labels[:, 1:] != IGNORE
    p_base = teacher[:, :-1][position].softmax(-1)
    expected = (p_base * (p_base.log() - student[:, :-1][position].log_softmax(-1))).sum(-1)
    assert loss > 0.01
    assert torch.allclose(loss, expected.mean(), atol=1e-5)
    assert torch.allclose(plain, model(**inputs).loss, atol=1e-5)
    # row 0 by KL (the teacher run on that row alone), row 1 by cross-entropy, one token mean
    kl_row0 = expected[: int(position[0].sum())].sum()
    targets = labels[1, 1:][position[1]]
    ce_row1 = F.cross_entropy(student[1, :-1][position[1]], targets, reduction="sum")
    assert torch.allclose(mixed, (kl_row0 + ce_row1) / position.sum(), atol=1e-5)


def test_distill_data_alone_keeps_the_model_at_the_base(tmp_path, tiny_base, small_dataset):
    """The adapter starts as a no-op, so a distill-only run starts with student = teacher and
    must stay there (a loss near zero throughout), where the same data as text moves it."""
    distilled = read_run(run(distill_config(tmp_path, tiny_base, small_dataset, name="kl")))
    taught = read_run(run(train_config(tmp_path, tiny_base, small_dataset, name="ce")))
    assert [s.distill for s in distilled.examples.sources] == [True]
    assert [s.distill for s in taught.examples.sources] == [False]
    assert max(loss for _, loss in distilled.metrics.loss) < 0.01
    assert min(loss for _, loss in taught.metrics.loss) > 1


def test_distill_sources_refuse_packed_batches(tmp_path, tiny_base, small_dataset):
    with pytest.raises(ValidationError, match="distill sources need batching: group_by_length"):
        distill_config(tmp_path, tiny_base, small_dataset, batching="packed")
