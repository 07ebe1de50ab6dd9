"""The training rows as the Trainer sees them: the tokenized file's rows (rows.py) that fit the
length limits, with their counts; and the collators that batch them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import Sampler
from transformers import DataCollatorWithFlattening

from tuneship.chat.labels import IGNORE, Example
from tuneship.config.schema import TrainConfig

from .rows import RowFacts


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
    """What the Trainer gets: training and eval examples (rows.ExampleTable: read from the
    tokenized file as needed), which training rows distill, and (once teacher.py has computed
    them) the distilled rows' targets."""

    train: Sequence[Example]
    eval: Sequence[Example]
    distilled: list[bool] = field(default_factory=list)  # per training row; empty: none
    teacher: Any = None  # teacher.TeacherTargets

    @property
    def distills(self) -> bool:
        return any(self.distilled)

    def train_dataset(self) -> RowDataset:
        if self.distills and self.teacher is None:
            raise ValueError("distilled rows need their teacher targets (teacher.py)")
        return RowDataset(self.train, self.distilled if self.distills else None, self.teacher)

    def eval_dataset(self) -> RowDataset | None:
        return RowDataset(self.eval) if len(self.eval) else None


class RowDataset(TorchDataset):
    """The rows as the collators take them: input_ids and labels lists, and for distillation
    the row's flag and, on distilled rows, its teacher targets."""

    def __init__(
        self,
        examples: Sequence[Example],
        distilled: list[bool] | None = None,
        teacher: Any = None,  # teacher.TeacherTargets, where rows distill
    ):
        self.examples, self.distilled, self.teacher = examples, distilled, teacher

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.examples[index]
        row: dict[str, Any] = {"input_ids": example.input_ids, "labels": example.labels}
        if self.distilled is None:
            return row
        row["distill"] = self.distilled[index]
        if row["distill"]:
            row["teacher_ids"] = self.teacher.ids[index]
            row["teacher_logprobs"] = self.teacher.logprobs[index]
        return row


def select_rows(
    cfg: TrainConfig, facts: RowFacts, rows: Sequence[int]
) -> tuple[np.ndarray, TokenStats]:
    """The rows (of the tokenized file, in order) that train: those over max_length dropped
    (with overlong: truncate they were cut to it), and those with nothing to train."""
    order = np.asarray(rows, dtype=np.int64)
    lengths, trained = facts.lengths[order], facts.trained[order]
    overlong = lengths > cfg.max_length
    keep = ~overlong & (trained > 0)
    tokens, trained_tokens = int(lengths[keep].sum()), int(trained[keep].sum())
    return order[keep], TokenStats(
        used=int(keep.sum()),
        dropped_overlong=int(overlong.sum()),
        truncated=int(facts.truncated[order][keep].sum()),
        tokens=tokens,
        trained_tokens=trained_tokens,
        trained_share=round(trained_tokens / tokens, 4) if tokens else 0,
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


class SortedBatches(Sampler[int]):
    """Batches of rows of similar length: all rows sorted by length (ties in random order), cut
    into batches, the batches in random order, the longest first (memory runs out at the first
    step if at all) and a last one short of `batch_size` last (anywhere else it would shift
    every later batch's rows across two). transformers' own length grouping sorts within random
    groups (of 208 rows for the demo's 852), so rows of a rare length (the demo's 40 tool
    sessions of ~960 tokens among 812 chats of ~70) fall into mixed batches, each chat padded to
    960 and no prefix shared (loss.py): 11 such batches in the demo's 3 epochs, each as slow as a
    full batch of tool sessions. Draws from torch's global generator, as transformers' sampler
    does, so a resumed run (which restores it) takes the same batches."""

    def __init__(self, lengths: Sequence[int], batch_size: int):
        self.lengths, self.batch_size = list(lengths), batch_size

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        shuffled = torch.randperm(len(self.lengths)).tolist()
        ordered = sorted(shuffled, key=lambda i: self.lengths[i], reverse=True)  # stable
        batches = [
            ordered[i : i + self.batch_size] for i in range(0, len(ordered), self.batch_size)
        ]
        short = [batches.pop()] if len(batches) > 1 and len(batches[-1]) < self.batch_size else []
        if not batches:
            return
        rest = [batches[1 + int(i)] for i in torch.randperm(len(batches) - 1)]
        for batch in batches[:1] + rest + short:
            yield from batch


def packed_collate(flash_attention: bool):
    """The batch as one row without padding; position ids restart per conversation, which makes
    transformers mask attention within each conversation (block-diagonal on sdpa/eager, varlen
    kernels with FlashAttention), and the first label of each conversation is ignored so no
    token is predicted across a boundary."""
    return DataCollatorWithFlattening(
        return_position_ids=True, separator_id=IGNORE, return_flash_attn_kwargs=flash_attention
    )
