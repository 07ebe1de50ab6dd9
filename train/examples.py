"""From conversations to training rows: tokenized with the base model's chat template, assistant
tokens labelled, length limits applied; and the collators that batch them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DataCollatorWithFlattening

from tuneship.chat.labels import IGNORE, ChatTokenizer, Example
from tuneship.chat.records import Conversation
from tuneship.config.schema import TrainConfig


@dataclass
class TokenStats:
    used: int
    dropped_overlong: int
    truncated: int
    tokens: int
    trained_tokens: int
    trained_share: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class TrainingRows:
    """What the Trainer gets: training and eval examples, which conversations distill, and
    (once teacher.py has computed them) the distilled rows' targets."""

    train: list[Example]
    eval: list[Example]
    distill_ids: set[str] = field(default_factory=set)
    teacher: Any = None  # teacher.TeacherTargets

    @property
    def distilled(self) -> list[bool]:
        return [e.id in self.distill_ids for e in self.train]

    def train_dataset(self) -> list[dict[str, Any]]:
        rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in self.train]
        if not self.distill_ids:
            return rows
        if self.teacher is None:
            raise ValueError("distilled rows need their teacher targets (teacher.py)")
        return [
            row
            | {"distill": flag}
            | ({"teacher_ids": ids, "teacher_logprobs": logprobs} if flag else {})
            for row, flag, ids, logprobs in zip(
                rows, self.distilled, self.teacher.ids, self.teacher.logprobs, strict=True
            )
        ]

    def eval_dataset(self) -> list[dict[str, Any]] | None:
        return [{"input_ids": e.input_ids, "labels": e.labels} for e in self.eval] or None


def tokenize(
    cfg: TrainConfig, convs: list[Conversation], tokenizer: Any
) -> tuple[list[Example], TokenStats]:
    """Tokenize with the chat template; drop (or truncate) conversations over max_length."""
    truncate = cfg.overlong == "truncate"
    chat_tokenizer = ChatTokenizer(tokenizer, cfg.max_length if truncate else None)
    examples, dropped = [], 0
    for conv in convs:
        example = chat_tokenizer(conv)
        if len(example.input_ids) > cfg.max_length:
            dropped += 1
        elif example.trained_tokens:
            examples.append(example)
    tokens = sum(len(e.input_ids) for e in examples)
    trained = sum(e.trained_tokens for e in examples)
    return examples, TokenStats(
        used=len(examples),
        dropped_overlong=dropped,
        truncated=sum(e.truncated for e in examples),
        tokens=tokens,
        trained_tokens=trained,
        trained_share=round(trained / tokens, 4) if tokens else 0,
    )


def pad_collate(pad_id: int):
    """Dynamic padding to the longest example of the batch; padded labels are ignored. Rows
    that carry `distill` (a bool) pass it on as one tensor, and the distilled rows' teacher
    targets as one [distilled tokens, k] tensor each, in row order (see distill.py)."""

    def collate(batch: list[dict]) -> dict:
        width = max(len(row["input_ids"]) for row in batch)
        ids, labels, mask = [], [], []
        for row in batch:
            gap = width - len(row["input_ids"])
            ids.append(row["input_ids"] + [pad_id] * gap)
            labels.append(row["labels"] + [IGNORE] * gap)
            mask.append([1] * len(row["input_ids"]) + [0] * gap)
        collated = {
            "input_ids": torch.tensor(ids),
            "labels": torch.tensor(labels),
            "attention_mask": torch.tensor(mask),
        }
        if "distill" in batch[0]:
            collated["distill"] = torch.tensor([row["distill"] for row in batch])
        distilled = [row for row in batch if row.get("distill")]
        if distilled:
            collated["teacher_ids"] = torch.cat([row["teacher_ids"] for row in distilled])
            collated["teacher_logprobs"] = torch.cat([row["teacher_logprobs"] for row in distilled])
        return collated

    return collate


def packed_collate(flash_attention: bool):
    """The batch as one row without padding; position ids restart per conversation, which makes
    transformers mask attention within each conversation (block-diagonal on sdpa/eager, varlen
    kernels with FlashAttention), and the first label of each conversation is ignored so no
    token is predicted across a boundary."""
    return DataCollatorWithFlattening(
        return_position_ids=True, separator_id=IGNORE, return_flash_attn_kwargs=flash_attention
    )
