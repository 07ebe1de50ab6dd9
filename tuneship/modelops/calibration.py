"""GPTQ calibration data: a seeded sample of the training conversations, rendered with the chat
template the model was trained on (never generic text: the calibration sees what serving sees)."""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING

from tuneship.chat.labels import tokenize_conversation
from tuneship.chat.records import Conversation
from tuneship.chat.template import end_of_turn, render
from tuneship.config.schema import CalibrationMix, ExportConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def dataset_of(conversation_id: str) -> str:
    """The training file or folder a conversation came from (its id is "FILE:LINE",
    "FILE#INDEX" or "FOLDER#SHARD:ROW")."""
    return re.sub(r"(:\d+|#.*)$", "", conversation_id)


def calibration_sample(
    conversations: list[Conversation],
    samples: int,
    seed: int,
    mix: CalibrationMix = "datasets",
    length: Callable[[Conversation], int] = lambda conv: 1,
) -> list[Conversation]:
    """The training conversations GPTQ calibrates on, seeded. `rows`: a plain sample, so each
    dataset weighs as many rows as it has. `datasets`: each training dataset an equal share of
    the rows (one with fewer rows gives all it has, the others share the rest), because a small
    dataset often carries a behaviour of its own (tool calls, a format) that a plain sample of a
    few hundred rows would calibrate on two or three conversations, and 4-bit weights then lose
    it first. `tokens`: each dataset an equal share of the tokens (`length` of each
    conversation), so a dataset of long conversations (whole tool sessions) is not most of what
    GPTQ sees when its rows are few but long."""
    rng = random.Random(seed)
    if mix == "rows" or samples >= len(conversations):
        return rng.sample(conversations, min(samples, len(conversations)))
    by_dataset: dict[str, list[Conversation]] = defaultdict(list)
    for conv in conversations:
        by_dataset[dataset_of(conv.id)].append(conv)
    pools = [rng.sample(rows, len(rows)) for _, rows in sorted(by_dataset.items())]
    share = [0] * len(pools)  # rows or tokens drawn from each dataset so far
    picked: list[Conversation] = []
    while len(picked) < samples:  # the dataset furthest behind draws next; empty ones drop out
        behind = min((i for i, pool in enumerate(pools) if pool), key=lambda i: share[i])
        conv = pools[behind].pop()
        share[behind] += length(conv) if mix == "tokens" else 1
        picked.append(conv)
    return picked


def recipe_sample(
    conversations: list[Conversation], tokenizer: PreTrainedTokenizerBase, cfg: ExportConfig
) -> list[Conversation]:
    """The calibration sample an export config asks for (the export's, and the eval's base
    model quantized with the same recipe)."""
    return calibration_sample(
        conversations,
        cfg.calibration_samples,
        cfg.seed,
        cfg.calibration_mix,
        lambda conv: len(calibration_ids(tokenizer, conv, cfg.calibration_max_length)),
    )


def calibration_ids(
    tokenizer: PreTrainedTokenizerBase, conversation: Conversation, max_length: int
) -> list[int]:
    """The conversation rendered with the chat template (and its tools) and tokenized (the
    template writes any BOS itself), cut to max_length tokens."""
    text = render(tokenizer, list(conversation.messages), tools=list(conversation.tools))
    return tokenizer(text, add_special_tokens=False).input_ids[:max_length]


def calibration_rows(
    tokenizer: PreTrainedTokenizerBase, sample: list[Conversation], max_length: int
) -> list[dict[str, list[int]]]:
    """The sample as GPTQ's calibration dataset rows."""
    rows = []
    for conv in sample:
        ids = calibration_ids(tokenizer, conv, max_length)
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    return rows


def tuning_examples(
    tokenizer: PreTrainedTokenizerBase, sample: list[Conversation], max_length: int
) -> list[tuple[list[int], list[int]]]:
    """The sample as scale tuning's (input ids, labels): the labels mark the assistant turns, as
    training's do, and the ids are the calibration's (the same rendering, cut alike)."""
    eot_text, _ = end_of_turn(tokenizer)
    examples = []
    for conv in sample:
        example = tokenize_conversation(tokenizer, conv, eot_text, max_length)
        examples.append((example.input_ids, example.labels))
    return examples
