"""Tool-call prompts and how a served model's replies to them score (shared by the export's tool
check and `tuneship eval`).

A tool prompt (`ToolItem`) is a conversation with the functions it declares and what a right
reply does: call a given function with given arguments, or make no call (a question the handbook
answers, or the final answer after a tool's result) and say a given fact. A reply (the served
model's `tool_calls` as vLLM's parser read them, and its text) scores:

- attempted: the reply calls, or its text holds the call markup the parser should have read;
- parsed: the parser read the calls (what `parse rate` counts among attempted replies);
- valid JSON, schema-valid: each call's arguments are a JSON object fitting the declared schema;
- right function, exact arguments: the first call is the expected one (arguments compared as
  JSON values: 42.5 and 42.50 are the same amount);
- no call where none is needed, and the fact in the final answer after a result (in words:
  a reply that repeats the tool's raw result does not count).

JSONL rows: {"id"?, "style"?, "messages" (or "question"), "tools", "call": {"name",
"arguments"} or null, "fact"?}.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneship.chat.records import Conversation, InvalidRecord, parse_record
from tuneship.chat.tools import ToolProblem, check_call
from tuneship.infra.errors import ProblemsError
from tuneship.quality.facts import contains_fact

# The text around a call in each parser's format: a reply holding it made a call the parser
# did not read.
CALL_MARKUP = {"hermes": "<tool_call>"}
KINDS = ("call", "no call", "answer after result")


@dataclass(frozen=True)
class ToolItem:
    id: str
    messages: tuple[dict[str, Any], ...]  # the prompt: everything before the reply
    tools: tuple[dict[str, Any], ...]
    call: dict[str, Any] | None  # {"name", "arguments"} the reply must call; None: no call
    fact: str | None = None  # what a reply without a call must say, if anything
    style: str | None = None

    @property
    def kind(self) -> str:
        if self.call is not None:
            return "call"
        return "answer after result" if self.messages[-1]["role"] == "tool" else "no call"

    def reply(self) -> dict[str, Any]:
        """The right reply as a training turn (the expected call, or the fact)."""
        if self.call is None:
            return {"role": "assistant", "content": self.fact or "ok"}
        call = {"id": "call_0", "type": "function", "function": dict(self.call)}
        return {"role": "assistant", "content": "", "tool_calls": [call]}

    def wire_messages(self) -> list[dict[str, Any]]:
        """The prompt as an OpenAI request carries it (call arguments as JSON text)."""
        return [_on_the_wire(m) for m in self.messages]


def _on_the_wire(message: dict[str, Any]) -> dict[str, Any]:
    if not message.get("tool_calls"):
        return dict(message)
    calls = [
        {**c, "function": {**c["function"], "arguments": json.dumps(c["function"]["arguments"])}}
        for c in message["tool_calls"]
    ]
    return {**message, "tool_calls": calls}


def load_tool_items(path: Path) -> list[ToolItem]:
    """Tool prompts from JSONL, each checked as training data is (its expected call too)."""
    items, problems = [], []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        try:
            items.append(tool_item(json.loads(line), f"{Path(path).name}:{lineno}"))
        except (json.JSONDecodeError, InvalidRecord, ToolProblem, TypeError, ValueError) as exc:
            problems.append(f"{path}:line {lineno}: {exc}")
    if problems or not items:
        raise ProblemsError(f"{path} is not a tool prompt file:", problems or ["no tool prompts"])
    return items


def tool_item(row: Any, default_id: str) -> ToolItem:
    if not isinstance(row, dict):
        raise ValueError(f"a row is a JSON {type(row).__name__}, expected an object")
    if not row.get("tools"):
        raise ValueError("'tools' is missing: a tool prompt declares the functions it may call")
    if "messages" in row:
        messages = row["messages"]
    elif isinstance(row.get("question"), str):
        messages = [{"role": "user", "content": row["question"]}]
    else:
        raise ValueError("'messages' (or 'question') is missing")
    if "call" not in row:
        raise ValueError("'call' is missing: the expected call, or null where none is needed")
    call, fact = row["call"], row.get("fact")
    if fact is not None and not (isinstance(fact, str) and fact.strip()):
        raise ValueError("'fact' must be a non-empty string")
    if call is not None:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise ValueError('\'call\' must be {"name": ..., "arguments": {...}} or null')
        call = {"name": call["name"], "arguments": call.get("arguments", {})}
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    item_id, style = str(row.get("id", default_id)), row.get("style")
    expected = ToolItem(item_id, tuple(messages), (), call, fact, style).reply()
    # the prompt and its expected reply are checked as a training record is
    _, parsed, tools = parse_record({"tools": row["tools"], "messages": [*messages, expected]})
    if parsed[-2]["role"] == "assistant":
        raise ValueError("the prompt ends with an assistant turn: nothing left to reply to")
    if call is not None:
        call = dict(parsed[-1]["tool_calls"][0]["function"])
    return ToolItem(item_id, parsed[:-1], tools, call, fact, style)


def items_from_tool_training(
    conversations: list[Conversation], count: int, seed: int
) -> list[ToolItem]:
    """Fallback when no tool prompts are given: sampled training conversations, each asked up
    to its first call."""
    with_calls = [c for c in conversations if c.calls]
    items = []
    for conv in random.Random(seed).sample(with_calls, min(count, len(with_calls))):
        turn = next(i for i, m in enumerate(conv.messages) if m.get("tool_calls"))
        function = conv.messages[turn]["tool_calls"][0]["function"]
        items.append(ToolItem(conv.id, conv.messages[:turn], conv.tools, dict(function)))
    return items


@dataclass(frozen=True)
class CallScore:
    """How one reply to a tool prompt scores (None: the figure does not apply to this prompt)."""

    kind: str
    attempted: bool
    parsed: bool
    valid_json: bool | None
    schema_valid: bool | None
    right_function: bool | None
    exact_arguments: bool | None
    no_call: bool | None
    fact_said: bool | None

    @property
    def right(self) -> bool | None:
        """The expected function with the expected arguments (None: no call was expected)."""
        if self.right_function is None:
            return None
        return bool(self.right_function and self.exact_arguments)


def score(item: ToolItem, calls: list[dict[str, str]], text: str | None, parser: str) -> CallScore:
    """One reply: its calls as the parser read them ({"name", "arguments" JSON text}) and its
    text."""
    markup = CALL_MARKUP.get(parser)
    attempted = bool(calls) or bool(markup and markup in (text or ""))
    decoded = [_decode(c.get("arguments")) for c in calls]
    valid_json = all(isinstance(d, dict) for d in decoded) if calls else None
    schema_valid = None
    if calls:
        schema_valid = all(
            isinstance(args, dict) and _fits(item.tools, c.get("name"), args)
            for c, args in zip(calls, decoded, strict=True)
        )
    right_function = exact = no_call = fact_said = None
    if item.call is not None:
        right_function = bool(calls) and calls[0].get("name") == item.call["name"]
        exact = bool(right_function) and decoded[0] == item.call["arguments"]
    else:
        no_call = not attempted
        if item.fact:
            fact_said = not attempted and contains_fact(text or "", item.fact)
        if fact_said and item.kind == "answer after result":
            # repeating the tool's raw result is not an answer (a base model echoes it)
            fact_said = str(item.messages[-1]["content"]).strip() not in (text or "")
    return CallScore(
        item.kind, attempted, bool(calls), valid_json, schema_valid, right_function, exact,
        no_call, fact_said,
    )  # fmt: skip


def _decode(arguments: Any) -> Any:
    if isinstance(arguments, dict):
        return arguments
    try:
        return json.loads(arguments) if isinstance(arguments, str) else None
    except json.JSONDecodeError:
        return None


def _fits(tools: tuple[dict[str, Any], ...], name: Any, arguments: dict[str, Any]) -> bool:
    call = {"function": {"name": name, "arguments": arguments}}
    try:
        check_call(call, tools, "the call")
    except ToolProblem:
        return False
    return True


def parse_rate(scores: list[CallScore]) -> tuple[int, int]:
    """(replies whose calls the parser read, replies that attempted a call)."""
    attempted = [s for s in scores if s.attempted]
    return sum(s.parsed for s in attempted), len(attempted)


def counted(scores: list[CallScore], figure: str) -> tuple[int, int]:
    """(how many replies have the figure true, of how many it applies to)."""
    values = [getattr(s, figure) for s in scores]
    flags = [v for v in values if v is not None]
    return sum(flags), len(flags)
