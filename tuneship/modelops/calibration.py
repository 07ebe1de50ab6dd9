"""GPTQ calibration data: a seeded sample of the training conversations, rendered with the chat
template the model was trained on (never generic text: the calibration sees what serving sees)."""

from __future__ import annotations

import random
import re
from collections import defaultdict
from typing import TYPE_CHECKING

from tuneship.chat.records import Conversation
from tuneship.chat.template import render
from tuneship.config.schema import CalibrationMix

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def dataset_of(conversation_id: str) -> str:
    """The training file or folder a conversation came from (its id is "FILE:LINE",
    "FILE#INDEX" or "FOLDER#SHARD:ROW")."""
    return re.sub(r"(:\d+|#.*)$", "", conversation_id)


def calibration_sample(
    conversations: list[Conversation], samples: int, seed: int, mix: CalibrationMix = "datasets"
) -> list[Conversation]:
    """The training conversations GPTQ calibrates on, seeded. `rows`: a plain sample, so each
    dataset weighs as many rows as it has. `datasets`: each training dataset an equal share (one
    with fewer rows gives all it has, the others share the rest), because a small dataset
    often carries a behaviour of its own (tool calls, a format) that a plain sample of a few
    hundred rows would calibrate on two or three conversations, and 4-bit weights then lose it
    first."""
    rng = random.Random(seed)
    if mix == "rows" or samples >= len(conversations):
        return rng.sample(conversations, min(samples, len(conversations)))
    by_dataset: dict[str, list[Conversation]] = defaultdict(list)
    for conv in conversations:
        by_dataset[dataset_of(conv.id)].append(conv)
    pools = [rng.sample(rows, len(rows)) for _, rows in sorted(by_dataset.items())]
    picked: list[Conversation] = []
    while len(picked) < samples:  # round robin: equal shares, the small ones run out first
        for pool in pools:
            if pool and len(picked) < samples:
                picked.append(pool.pop())
    return picked


def calibration_rows(
    tokenizer: PreTrainedTokenizerBase, sample: list[Conversation], max_length: int
) -> list[dict[str, list[int]]]:
    """Each conversation rendered with the chat template (and its tools) and tokenized (the
    template writes any BOS itself), cut to max_length tokens."""
    rows = []
    for conv in sample:
        text = render(tokenizer, list(conv.messages), tools=list(conv.tools))
        ids = tokenizer(text, add_special_tokens=False).input_ids[:max_length]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    return rows
