"""Render conversations with the base model's own chat template and label assistant tokens only.

The text is the one the serving endpoint renders for the same messages and tools (the model's
template, no `human:`/`gpt:` prompt format). Labels are the token ids on each assistant turn
(a reply, or its tool calls as the template writes them) and its end-of-turn token; every other
position (system, user, tool results, template markup, padding) is -100.
Tokenized with add_special_tokens=False: the template writes any BOS itself, so there is one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tuneship.chat.records import Conversation
from tuneship.chat.template import end_of_turn, render
from tuneship.infra.errors import TuneshipError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE = -100


@dataclass(frozen=True)
class Example:
    id: str
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


def assistant_spans(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    eot_text: str,
    tools: list[dict[Any, Any]] | None = None,
) -> tuple[str, list[tuple[int, int]]]:
    """Render messages; return the text and the (start, end) character span of every assistant
    turn (a reply, or tool calls as the template writes them), each span ending just after the
    turn's end-of-turn token. Tool results are the tool's, not the model's: never in a span."""
    text = render(tokenizer, messages, tools=tools)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:i], add_generation_prompt=True, tools=tools)
        if not text.startswith(prompt):
            raise TuneshipError(
                "the chat template renders a conversation's prefix differently from the whole "
                "conversation, so assistant turns cannot be located; use a prefix-stable template"
            )
        start = len(prompt)
        if message.get("tool_calls"):  # the calls are the template's text: up to its end of turn
            eot_at = text.find(eot_text, start)
            if eot_at < 0:
                raise TuneshipError(
                    f"the chat template does not end tool-call turn {i} with {eot_text!r}"
                )
            spans.append((start, eot_at + len(eot_text)))
            continue
        content_at = text.find(message["content"], start)
        eot_at = text.find(eot_text, content_at + len(message["content"]))
        if content_at != start or eot_at < 0:
            raise TuneshipError(
                f"the chat template does not write assistant turn {i} verbatim followed by "
                f"{eot_text!r}; cannot build labels"
            )
        spans.append((start, eot_at + len(eot_text)))
    return text, spans


class ChatTokenizer:
    """Turns conversations into training examples with one tokenizer and its end-of-turn token."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int | None = None):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.eot_text, self.eot_id = end_of_turn(tokenizer)

    def __call__(self, conv: Conversation) -> Example:
        return tokenize_conversation(self.tokenizer, conv, self.eot_text, self.max_length)


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase,
    conv: Conversation,
    eot_text: str,
    max_length: int | None = None,
) -> Example:
    text, spans = assistant_spans(tokenizer, list(conv.messages), eot_text, list(conv.tools))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(enc["input_ids"])
    labels = []
    for token_id, (start, end) in zip(input_ids, enc["offset_mapping"], strict=True):
        inside = any(s <= start and end <= e for s, e in spans)
        labels.append(token_id if inside and end > start else IGNORE)
    truncated = max_length is not None and len(input_ids) > max_length
    if truncated:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return Example(conv.id, input_ids, labels, truncated)
