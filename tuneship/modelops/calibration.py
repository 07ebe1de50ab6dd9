"""GPTQ calibration data: a seeded sample of the training conversations, rendered with the chat
template the model was trained on (never generic text: the calibration sees what serving sees)."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from tuneship.chat.records import Conversation
from tuneship.chat.template import render

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def calibration_sample(
    conversations: list[Conversation], samples: int, seed: int
) -> list[Conversation]:
    """The training conversations GPTQ calibrates on: a seeded sample."""
    return random.Random(seed).sample(conversations, min(samples, len(conversations)))


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
