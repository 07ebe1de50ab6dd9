"""Distillation to the base model on `distill: true` sources (train/distill.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from tests.support import train_config
from tuneship.chat.labels import IGNORE, Example
from tuneship.config.schema import TrainConfig
from tuneship.handoff.manifest import read_run
from tuneship.train.distill import token_losses, top_k_kl
from tuneship.train.examples import pad_collate
from tuneship.train.loss import LossTrainer
from tuneship.train.run import run
from tuneship.train.teacher import CACHE, TargetSettings, compute, teacher_targets

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


def top_k(logits, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    top = logits.log_softmax(-1).topk(k, dim=-1)
    return top.indices, top.values


def soft_positions(logits, labels, distill):
    """The distilled rows' trained positions of logits, in the order the loss takes them."""
    return logits[:, :-1][(labels[:, 1:] != IGNORE) & distill[:, None]]


def test_top_k_kl_with_every_token_is_the_full_kl():
    student = torch.randn(5, VOCAB, dtype=torch.float64).log_softmax(-1)
    teacher = torch.randn(5, VOCAB, dtype=torch.float64).log_softmax(-1)
    full = F.kl_div(student, teacher, log_target=True, reduction="sum")
    assert torch.allclose(top_k_kl(student, *top_k(teacher, VOCAB)), full)


def test_top_k_kl_is_the_kl_with_the_rest_of_the_teacher_in_one_bucket():
    student = torch.randn(5, VOCAB, dtype=torch.float64).log_softmax(-1)
    teacher = torch.randn(5, VOCAB, dtype=torch.float64).log_softmax(-1)
    ids, logprobs = top_k(teacher, 3)
    rest = torch.ones(5, VOCAB, dtype=torch.bool).scatter(-1, ids, False)
    p_rest = (teacher.exp() * rest).sum(-1)
    q_rest = (student.exp() * rest).sum(-1)
    expected = (logprobs.exp() * (logprobs - student.gather(-1, ids))).sum()
    expected = expected + (p_rest * (p_rest.log() - q_rest.log())).sum()
    got = top_k_kl(student, ids, logprobs)
    assert torch.allclose(got, expected)
    # it is a divergence: zero when the student is the teacher, and the bucket never hides
    # more than the full KL does
    assert torch.allclose(top_k_kl(teacher, ids, logprobs), torch.zeros((), dtype=torch.float64))
    assert 0 < got <= F.kl_div(student, teacher, log_target=True, reduction="sum")


def test_a_distilled_row_learns_the_teacher_not_its_text():
    logits, labels = batch()
    distill = torch.tensor([True, False])
    plain, _ = token_losses(logits, None, labels, torch.tensor([False, False]))
    row1_alone, _ = token_losses(logits[1:], None, labels[1:], torch.tensor([False]))
    # the teacher agrees with the student on row 0: only row 1's cross-entropy is left
    agreeing = top_k(soft_positions(logits, labels, distill), VOCAB)
    same, _ = token_losses(logits, agreeing, labels, distill)
    assert torch.allclose(same, row1_alone, atol=1e-5)
    assert same < plain
    # row 0's target tokens do not matter, the teacher does
    relabelled = labels.clone()
    relabelled[0, 2:] = (relabelled[0, 2:] + 1) % VOCAB
    assert torch.allclose(token_losses(logits, agreeing, relabelled, distill)[0], same, atol=1e-5)
    other = soft_positions(batch(seed=1)[0], labels, distill)
    student = logits.clone().requires_grad_(True)
    moved, _ = token_losses(student, top_k(other, VOCAB), labels, distill)
    assert moved > same + 0.1
    moved.backward()
    # the gradient on a distilled position is student minus teacher probabilities
    position = (0, 3)
    expected = student[position].softmax(-1) - other[position[1] - 1].softmax(-1)
    assert torch.allclose(student.grad[position], expected.detach(), atol=1e-5)


def test_collate_passes_the_distill_flags_and_the_targets_of_distilled_rows():
    targets = [torch.tensor([[1, 2]]), torch.tensor([[3, 4], [5, 6]])]
    rows = [
        {"input_ids": [5, 6], "labels": [-100, 6], "distill": True, "teacher_ids": targets[0],
         "teacher_logprobs": -targets[0].float()},
        {"input_ids": [7], "labels": [7], "distill": False},
        {"input_ids": [7, 8, 9], "labels": [-100, 8, 9], "distill": True,
         "teacher_ids": targets[1], "teacher_logprobs": -targets[1].float()},
    ]  # fmt: skip
    collated = pad_collate(pad_id=0)(rows)
    assert collated["distill"].tolist() == [True, False, True]
    assert collated["teacher_ids"].tolist() == [[1, 2], [3, 4], [5, 6]]
    assert collated["teacher_logprobs"].tolist() == [[-1, -2], [-3, -4], [-5, -6]]
    plain = pad_collate(pad_id=0)([{"input_ids": [1], "labels": [1]}])
    assert "distill" not in plain and "teacher_ids" not in plain


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


def examples_of(ids, labels) -> list[Example]:
    return [
        Example(f"r{n}", row.tolist(), label.tolist())
        for n, (row, label) in enumerate(zip(ids, labels, strict=True))
    ]


@pytest.mark.parametrize("loss_chunk", [0, 3])
def test_the_trainer_distills_toward_the_base_with_the_adapter_off(tmp_path, tiny_base, loss_chunk):
    from transformers import TrainingArguments

    model = adapted_model(tiny_base)
    vocab = model.config.vocab_size
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = LossTrainer(model=model, args=args, loss_chunk=loss_chunk)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :3] = IGNORE
    # the teacher targets as a run computes them before training, every token kept
    settings = TargetSettings("tiny", top_k=vocab, precision="fp32", pad_id=0, batch_size=2)
    teacher_ids, teacher_logprobs = compute(model, examples_of(ids, labels), settings)
    assert model.training is False  # left as found (adapted_model is in eval mode)

    def distilled(*rows: bool) -> dict:
        flags = torch.tensor(rows)
        picked = [n for n, flag in enumerate(rows) if flag]
        return {
            "distill": flags,
            "teacher_ids": torch.cat([teacher_ids[n] for n in picked]),
            "teacher_logprobs": torch.cat([teacher_logprobs[n] for n in picked]),
        }

    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with torch.no_grad():
        student = model(input_ids=ids).logits
        with model.disable_adapter():
            teacher = model(input_ids=ids).logits
        loss = trainer.compute_loss(model, inputs | distilled(True, True))
        plain = trainer.compute_loss(model, inputs | {"distill": torch.tensor([False, False])})
        mixed = trainer.compute_loss(model, inputs | distilled(True, False))
    # row-mean KL(base || adapted) over the trained positions, computed here from scratch
    position = labels[:, 1:] != IGNORE
    p_base = teacher[:, :-1][position].softmax(-1)
    expected = (p_base * (p_base.log() - student[:, :-1][position].log_softmax(-1))).sum(-1)
    assert loss > 0.01
    assert torch.allclose(loss, expected.mean(), atol=1e-5)
    assert torch.allclose(plain, model(**inputs).loss, atol=1e-5)
    # row 0 by KL, row 1 by cross-entropy, one token mean
    kl_row0 = expected[: int(position[0].sum())].sum()
    targets = labels[1, 1:][position[1]]
    ce_row1 = F.cross_entropy(student[1, :-1][position[1]], targets, reduction="sum")
    assert torch.allclose(mixed, (kl_row0 + ce_row1) / position.sum(), atol=1e-5)
    with pytest.raises(ValueError, match="teacher targets"):
        trainer.compute_loss(model, inputs | {"distill": torch.tensor([True, False])})


def test_teacher_targets_are_cached_and_recomputed_when_anything_they_depend_on_changes(
    tmp_path, tiny_base
):
    model = adapted_model(tiny_base)
    ids = torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :4] = IGNORE
    examples = examples_of(ids, labels)

    def targets(top_k: int = 4, distilled=(True, False, True), precision: str = "fp32"):
        settings = TargetSettings("tiny", top_k, precision, pad_id=0, batch_size=2)
        return teacher_targets(
            model, examples, list(distilled), settings, tmp_path / "work", write_cache=True
        )

    first = targets()
    assert first.seconds is not None and (tmp_path / "work" / CACHE).is_file()
    assert first.ids[1] is None and first.rows == 2 and first.positions == 2 * 5
    assert first.ids[0].shape == (5, 4) and first.logprobs[0].shape == (5, 4)
    again = targets()
    assert again.seconds is None  # read from the cache
    assert again.sha256 == first.sha256
    assert all(
        torch.equal(a, b) for a, b in zip(first.logprobs[::2], again.logprobs[::2], strict=True)
    )
    assert targets(top_k=5).seconds is not None
    assert targets(distilled=(True, True, True)).rows == 3
    in_bf16 = targets(precision="bf16")
    assert in_bf16.seconds is not None
    # a cache cut short is recomputed, never trusted
    cache = tmp_path / "work" / CACHE
    cache.write_bytes(cache.read_bytes()[:100])
    recomputed = targets(precision="bf16")
    assert recomputed.seconds is not None and recomputed.sha256 == in_bf16.sha256


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
    with pytest.raises(
        ValidationError, match="distill sources need batching: group_by_length or sorted"
    ):
        distill_config(tmp_path, tiny_base, small_dataset, batching="packed")
