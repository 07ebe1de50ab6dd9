"""Chat datasets: ShareGPT, OpenAI-messages and question/answer records in .json or .jsonl files.

Every record is normalised to OpenAI-style messages (role system/user/assistant, content str).
Every invalid record yields one RecordProblem naming the file, the line (or array index) and why.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}
OPENAI_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
SUFFIXES = (".json", ".jsonl")


@dataclass(frozen=True)
class Conversation:
    id: str  # "FILE:LINE" or "FILE#INDEX": stable, names the record in reports and manifests
    format: str  # "sharegpt" or "openai"
    messages: tuple[dict[str, str], ...]


@dataclass(frozen=True)
class RecordProblem:
    file: str
    where: str  # "line 12", "index 3", or "" for the whole file
    reason: str

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
    pass


def _turns(record: dict[str, Any]) -> tuple[str, list[Any], str, str, dict[str, str]]:
    if "conversations" in record:
        return "sharegpt", record["conversations"], "from", "value", SHAREGPT_ROLES
    if "messages" in record:
        return "openai", record["messages"], "role", "content", OPENAI_ROLES
    if "question" in record and "answer" in record:
        turns = [
            {"role": "user", "content": record["question"]},
            {"role": "assistant", "content": record["answer"]},
        ]
        return "qa", turns, "role", "content", OPENAI_ROLES
    keys = ", ".join(sorted(map(str, record))) or "none"
    raise InvalidRecord(
        "no 'conversations' (ShareGPT) or 'messages' (OpenAI) list, nor 'question' and "
        f"'answer' strings; keys present: {keys}"
    )


def parse_record(record: Any) -> tuple[str, tuple[dict[str, str], ...]]:
    """Validate one record and return (format, messages); raise InvalidRecord with the reason."""
    if not isinstance(record, dict):
        raise InvalidRecord(f"record is a JSON {type(record).__name__}, expected an object")
    fmt, turns, role_key, content_key, roles = _turns(record)
    list_key = {"sharegpt": "conversations", "openai": "messages", "qa": "question/answer"}[fmt]
    if not isinstance(turns, list):
        raise InvalidRecord(f"'{list_key}' is a {type(turns).__name__}, expected a list")
    if not turns:
        raise InvalidRecord(f"'{list_key}' is empty")
    messages: list[dict[str, str]] = []
    seen_user = False
    for i, turn in enumerate(turns):
        at = f"{list_key}[{i}]"
        if not isinstance(turn, dict):
            raise InvalidRecord(f"{at} is a {type(turn).__name__}, expected an object")
        if role_key not in turn or content_key not in turn:
            missing = [k for k in (role_key, content_key) if k not in turn]
            raise InvalidRecord(f"{at} lacks " + ", ".join(f"'{k}'" for k in missing))
        role, content = turn[role_key], turn[content_key]
        if not isinstance(role, str):
            raise InvalidRecord(f"{at}.{role_key} is a {type(role).__name__}, expected a string")
        if not isinstance(content, str):
            raise InvalidRecord(
                f"{at}.{content_key} is a {type(content).__name__}, expected a string"
            )
        if role not in roles:
            raise InvalidRecord(
                f"{at}: unknown role '{role}' (expected one of {', '.join(sorted(roles))})"
            )
        norm = roles[role]
        if not content.strip():
            raise InvalidRecord(f"{at}: empty {norm} content")
        if norm == "system" and i != 0:
            raise InvalidRecord(f"{at}: a system turn may only come first")
        if norm == "assistant" and not seen_user:
            raise InvalidRecord(f"{at}: assistant turn before any user turn")
        seen_user = seen_user or norm == "user"
        messages.append({"role": norm, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise InvalidRecord("no assistant turn: nothing to train on")
    return fmt, tuple(messages)


def _add(result: LoadResult, name: str, where: str, conv_id: str, record: Any) -> None:
    result.records_seen += 1
    try:
        fmt, messages = parse_record(record)
    except InvalidRecord as exc:
        result.problems.append(RecordProblem(name, where, str(exc)))
        return
    result.formats[fmt] += 1
    result.conversations.append(Conversation(conv_id, fmt, messages))


def load_file(path: str | Path) -> LoadResult:
    path = Path(path)
    name = str(path)
    result = LoadResult()
    if path.suffix not in SUFFIXES:
        reason = f"unsupported file type '{path.suffix}' (use .json or .jsonl)"
        result.problems.append(RecordProblem(name, "", reason))
        return result
    try:
        raw = path.read_bytes()
    except OSError as exc:
        result.problems.append(RecordProblem(name, "", f"cannot read: {exc.strerror}"))
        return result
    raw = raw.removeprefix(b"\xef\xbb\xbf")
    if path.suffix == ".jsonl":
        for lineno, line in enumerate(raw.split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as exc:
                reason = f"not UTF-8 (byte {exc.start} of the line)"
                result.problems.append(RecordProblem(name, f"line {lineno}", reason))
                result.records_seen += 1
                continue
            except json.JSONDecodeError as exc:
                reason = f"invalid JSON: {exc.msg} (column {exc.colno})"
                result.problems.append(RecordProblem(name, f"line {lineno}", reason))
                result.records_seen += 1
                continue
            _add(result, name, f"line {lineno}", f"{path.name}:{lineno}", record)
        return result
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        result.problems.append(RecordProblem(name, "", f"not UTF-8 (byte {exc.start})"))
        return result
    except json.JSONDecodeError as exc:
        reason = f"invalid JSON: {exc.msg} (column {exc.colno})"
        result.problems.append(RecordProblem(name, f"line {exc.lineno}", reason))
        return result
    if not isinstance(data, list):
        reason = f"top level is a JSON {type(data).__name__}; a .json dataset is an array"
        result.problems.append(RecordProblem(name, "", reason))
        return result
    for index, record in enumerate(data):
        _add(result, name, f"index {index}", f"{path.name}#{index}", record)
    return result


def load_files(paths: Sequence[str | Path]) -> LoadResult:
    result = LoadResult()
    for path in paths:
        result.extend(load_file(path))
    return result
