"""Chat datasets: ShareGPT, OpenAI-messages, question/answer and Alpaca-style records, in any
file format files.py reads (JSON, JSONL, gzip, Parquet, CSV, a datasets folder).

Every record is normalised to OpenAI-style messages (role system/user/assistant/tool, content
str; assistant turns may carry tool_calls, tool turns a tool_call_id) and the functions it
declares (`tools`; validated by tools.py).
Column and role names that differ from these are mapped (RecordMapping: the training config's
messages_field, role_field, content_field, role_map). Every invalid record yields one
RecordProblem naming the file, where in it (line, index or row) and why.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneship.chat.files import LIST_COLUMNS, FileUnreadable, Unreadable, records
from tuneship.chat.tools import (
    CallLedger,
    ToolProblem,
    check_call,
    normalize_call,
    normalize_tools,
    parse_json_text,
)

SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",  # its value is the call: {"name", "arguments"}
    "observation": "tool",
    "tool": "tool",
}
OPENAI_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


@dataclass(frozen=True)
class RecordMapping:
    """Names a dataset uses for what tuneship calls messages, role, content and the roles."""

    messages_field: str | None = None
    role_field: str | None = None
    content_field: str | None = None
    role_map: tuple[tuple[str, str], ...] = ()  # (the dataset's role, system/user/assistant)

    @property
    def list_columns(self) -> tuple[str, ...]:
        return (*LIST_COLUMNS, *([self.messages_field] if self.messages_field else []))


NO_MAPPING = RecordMapping()  # the names tuneship expects


@dataclass(frozen=True)
class Conversation:
    id: str  # "FILE:LINE" or "FILE#INDEX": stable, names the record in reports and manifests
    format: str  # "sharegpt", "openai", "alpaca", "qa" or "mapped"
    messages: tuple[dict[str, Any], ...]  # role, content; tool_calls, tool_call_id (tools.py)
    tools: tuple[dict[str, Any], ...] = ()  # the functions the record declares (OpenAI's form)

    @property
    def has_system(self) -> bool:
        return bool(self.messages) and self.messages[0]["role"] == "system"

    @property
    def calls(self) -> int:
        return sum(len(m.get("tool_calls", ())) for m in self.messages)

    def system_folded(self) -> Conversation:
        """The system turn's text put at the start of the first user turn (for templates
        without a system role)."""
        if not self.has_system:
            return self
        system, first, *rest = self.messages
        merged = {"role": "user", "content": f"{system['content']}\n\n{first['content']}"}
        return Conversation(self.id, self.format, (merged, *rest), self.tools)


@dataclass(frozen=True)
class RecordProblem:
    file: str
    where: str  # "line 12", "index 3", or "" for the whole file
    reason: str
    of_record: bool = True  # False: the whole file is unreadable
    kind: str = "record"  # or "tool call": its tools or calls are at fault

    def __str__(self) -> str:
        place = f"{self.file}:{self.where}" if self.where else self.file
        return f"{place}: {self.reason}"


@dataclass
class LoadResult:
    conversations: list[Conversation] = field(default_factory=list)
    problems: list[RecordProblem] = field(default_factory=list)
    formats: Counter = field(default_factory=Counter)
    records_seen: int = 0

    def extend(self, other: LoadResult) -> None:
        self.conversations.extend(other.conversations)
        self.problems.extend(other.problems)
        self.formats.update(other.formats)
        self.records_seen += other.records_seen


class InvalidRecord(ValueError):
    kind = "record"


class ToolCallInvalid(InvalidRecord):
    """Its tools or calls are at fault (undeclared function, bad JSON, schema, unanswered)."""

    kind = "tool call"


def _turns(
    record: dict[str, Any], mapping: RecordMapping
) -> tuple[str, list[Any], str, str, dict[str, str]]:
    if mapping.messages_field is not None:
        if mapping.messages_field not in record:
            keys = ", ".join(sorted(map(str, record))) or "none"
            raise InvalidRecord(
                f"no '{mapping.messages_field}' (messages_field); keys present: {keys}"
            )
        roles = SHAREGPT_ROLES | dict(mapping.role_map)
        role_key, content_key = mapping.role_field or "role", mapping.content_field or "content"
        return "mapped", record[mapping.messages_field], role_key, content_key, roles
    if "conversations" in record:
        roles = SHAREGPT_ROLES | dict(mapping.role_map)
        return "sharegpt", record["conversations"], "from", "value", roles
    if "messages" in record:
        roles = OPENAI_ROLES | dict(mapping.role_map)
        role_key, content_key = mapping.role_field or "role", mapping.content_field or "content"
        return "openai", record["messages"], role_key, content_key, roles
    if "instruction" in record and "output" in record:
        return "alpaca", _alpaca(record), "role", "content", OPENAI_ROLES
    if "question" in record and "answer" in record:
        turns = [
            {"role": "user", "content": record["question"]},
            {"role": "assistant", "content": record["answer"]},
        ]
        return "qa", turns, "role", "content", OPENAI_ROLES
    keys = ", ".join(sorted(map(str, record))) or "none"
    raise InvalidRecord(
        "no 'conversations' (ShareGPT) or 'messages' (OpenAI) list, nor 'instruction' and "
        f"'output' (Alpaca), nor 'question' and 'answer'; keys present: {keys} (a list under "
        "another name: set messages_field)"
    )


def _alpaca(record: dict[str, Any]) -> list[dict[str, Any]]:
    """instruction (+ input) -> user, output -> assistant; system first and history's
    [question, answer] pairs before them, where present."""
    turns: list[dict[str, Any]] = []
    if record.get("system"):
        turns.append({"role": "system", "content": record["system"]})
    history = record.get("history") or []
    if not isinstance(history, list):
        raise InvalidRecord(f"'history' is a {type(history).__name__}, expected a list of pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, list | tuple) and len(pair) == 2):
            raise InvalidRecord(f"history[{i}] is not a [question, answer] pair")
        turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    instruction, extra = record["instruction"], record.get("input")
    if isinstance(instruction, str) and isinstance(extra, str) and extra.strip():
        instruction = f"{instruction}\n\n{extra}"
    turns += [
        {"role": "user", "content": instruction},
        {"role": "assistant", "content": record["output"]},
    ]
    return turns


def parse_record(
    record: Any, mapping: RecordMapping = NO_MAPPING
) -> tuple[str, tuple[dict[str, Any], ...], tuple[dict[str, Any], ...]]:
    """Validate one record and return (format, messages, tools); raise InvalidRecord with the
    reason (a ToolCallInvalid where its tools or calls are at fault)."""
    if not isinstance(record, dict):
        raise InvalidRecord(f"record is a JSON {type(record).__name__}, expected an object")
    fmt, turns, role_key, content_key, roles = _turns(record, mapping)
    list_key = {
        "sharegpt": "conversations", "openai": "messages", "qa": "question/answer",
        "alpaca": "instruction/output", "mapped": mapping.messages_field,
    }[fmt]  # fmt: skip
    if not isinstance(turns, list):
        raise InvalidRecord(f"'{list_key}' is a {type(turns).__name__}, expected a list")
    if not turns:
        raise InvalidRecord(f"'{list_key}' is empty")
    try:
        tools = normalize_tools(record.get("tools"))
        messages = _messages(turns, str(list_key), role_key, content_key, roles, tools)
    except ToolProblem as exc:
        raise ToolCallInvalid(str(exc)) from None
    if not any(m["role"] == "assistant" for m in messages):
        raise InvalidRecord("no assistant turn: nothing to train on")
    return fmt, tuple(messages), tools


def _messages(
    turns: list[Any],
    list_key: str,
    role_key: str,
    content_key: str,
    roles: dict[str, str],
    tools: tuple[dict[str, Any], ...],
) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    seen_user = False
    ledger = CallLedger()
    for i, turn in enumerate(turns):
        at = f"{list_key}[{i}]"
        if not isinstance(turn, dict):
            raise InvalidRecord(f"{at} is a {type(turn).__name__}, expected an object")
        calls = turn.get("tool_calls") or None
        if role_key not in turn or (content_key not in turn and calls is None):
            missing = [k for k in (role_key, content_key) if k not in turn]
            raise InvalidRecord(f"{at} lacks " + ", ".join(f"'{k}'" for k in missing))
        role, content = turn[role_key], turn.get(content_key)
        if not isinstance(role, str):
            raise InvalidRecord(f"{at}.{role_key} is a {type(role).__name__}, expected a string")
        if role not in roles:
            raise InvalidRecord(
                f"{at}: unknown role '{role}' (expected one of {', '.join(sorted(roles))})"
            )
        norm = roles[role]
        if role == "function_call":  # ShareGPT: the turn's text is the call (or a list of them)
            calls, content = parse_json_text(content, f"{at} (a function_call)"), ""
            calls = calls if isinstance(calls, list) else [calls]
        if calls is not None:
            if norm != "assistant":
                raise InvalidRecord(f"{at}: a {norm} turn with tool_calls (only assistants call)")
            if not isinstance(calls, list):
                raise ToolProblem(f"{at}.tool_calls is a {type(calls).__name__}, expected a list")
            content = "" if content is None else content
        if not isinstance(content, str):
            raise InvalidRecord(
                f"{at}.{content_key} is a {type(content).__name__}, expected a string"
            )
        if not content.strip() and not calls:
            raise InvalidRecord(f"{at}: empty {norm} content")
        if norm == "system" and i != 0:
            raise InvalidRecord(f"{at}: a system turn may only come first")
        if norm == "assistant" and not seen_user:
            raise InvalidRecord(f"{at}: assistant turn before any user turn")
        seen_user = seen_user or norm == "user"
        message: dict[str, Any] = {"role": norm, "content": content}
        if calls:
            made = [
                normalize_call(call, f"{at}.tool_calls[{j}]", ledger.calls + j)
                for j, call in enumerate(calls)
            ]
            for j, call in enumerate(made):
                check_call(call, tools, f"{at}.tool_calls[{j}]")
            ledger.made(made)
            message["tool_calls"] = made
        if norm == "tool":
            message["tool_call_id"] = ledger.answer(turn.get("tool_call_id"), at)
        messages.append(message)
    return messages


def stream_file(
    path: str | Path, mapping: RecordMapping = NO_MAPPING
) -> Iterator[Conversation | RecordProblem]:
    """Every record of path as a Conversation, or a RecordProblem saying why it is not one, in
    file order, one at a time (nothing else is kept: a million-row file streams)."""
    path = Path(path)
    name = str(path)
    try:
        for where, record in records(path, mapping.list_columns):
            if isinstance(record, Unreadable):
                yield RecordProblem(name, where, record.reason)
                continue
            try:
                fmt, messages, tools = parse_record(record, mapping)
            except InvalidRecord as exc:
                yield RecordProblem(name, where, str(exc), kind=exc.kind)
                continue
            yield Conversation(conversation_id(path, where), fmt, messages, tools)
    except FileUnreadable as exc:
        yield RecordProblem(name, exc.where, str(exc), of_record=False)
    except FileNotFoundError:
        yield RecordProblem(name, "", "cannot read: No such file or directory", of_record=False)


def load_file(path: str | Path, mapping: RecordMapping = NO_MAPPING) -> LoadResult:
    result = LoadResult()
    for item in stream_file(path, mapping):
        if isinstance(item, RecordProblem):
            result.problems.append(item)
            result.records_seen += item.of_record
        else:
            result.conversations.append(item)
            result.formats[item.format] += 1
            result.records_seen += 1
    return result


def conversation_id(path: Path, where: str) -> str:
    """FILE:LINE for lines, FILE#N for array indexes and rows (stable across runs)."""
    kind, _, number = where.rpartition(" ")
    if kind == "line":
        return f"{path.name}:{number}"
    shard = kind.removesuffix("row") if kind.endswith(":row") else ""
    return f"{path.name}#{shard}{number}"


def load_files(paths: Sequence[str | Path], mapping: RecordMapping = NO_MAPPING) -> LoadResult:
    result = LoadResult()
    for path in paths:
        result.extend(load_file(path, mapping))
    return result
