"""`tuneship data check FILE...`: validate chat data and report what training would see.

The files stream: one conversation is validated, counted and tokenized at a time and then let
go. What grows with the data is small per conversation: an 8-byte digest for the duplicate
check, a 4-byte token length for the percentiles, and the first MAX_LISTED problems (the count
covers them all). The held-out files for the leakage check are read whole; they are the small
side. docs/benchmarks.md, "Data at scale", has the memory figures (bench/data.py).
"""

from __future__ import annotations

import statistics
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from tuneship.chat import tool_template
from tuneship.chat.labels import ChatTokenizer
from tuneship.chat.mixing import DuplicateFinder, LeakFinder
from tuneship.chat.records import (
    NO_MAPPING,
    Conversation,
    RecordMapping,
    RecordProblem,
    load_files,
    stream_file,
)
from tuneship.chat.tool_template import ToolFormat
from tuneship.chat.tools import calls_off_schema_order
from tuneship.infra.errors import TuneshipError

MAX_LISTED = 200  # problems kept to print; the count is of all


@dataclass
class DataCheck:
    problems: list[RecordProblem] = field(default_factory=list)
    problem_count: int = 0
    valid: int = 0


class TokenTally:
    """Token lengths, trained share and overlong conversations, one conversation at a time,
    tool calls rendered as training would render them."""

    def __init__(self, tokenizer: Any, max_length: int):
        try:  # the template training would use for tool calls (plain chats render the same)
            self.tool_format: ToolFormat | None = tool_template.tool_format(tokenizer)
            tool_template.apply(tokenizer, self.tool_format)
            self.tool_refusal = ""
        except TuneshipError as exc:
            self.tool_format, self.tool_refusal = None, str(exc)
        self.chat_tokenizer = ChatTokenizer(tokenizer)
        self.max_length = max_length
        self.lengths = array("I")
        self.trained = 0
        self.over: list[str] = []
        self.over_count = 0

    def add(self, conv: Conversation) -> None:
        if (conv.tools or conv.calls) and self.tool_format is None:
            return  # training refuses these data: said in the report
        example = self.chat_tokenizer(conv)
        self.lengths.append(len(example.input_ids))
        self.trained += example.trained_tokens
        if len(example.input_ids) > self.max_length:
            self.over_count += 1
            if len(self.over) < 10:
                self.over.append(example.id)

    def report(self) -> dict[str, Any]:
        ordered = sorted(self.lengths)

        def percentile(q: float) -> int:
            return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]

        total = sum(ordered)
        return {
            "max_length": self.max_length,
            "min": ordered[0],
            "p50": percentile(0.5),
            "p95": percentile(0.95),
            "max": ordered[-1],
            "mean": round(statistics.fmean(ordered), 1),
            "tokens": total,
            "trained_share": round(self.trained / total, 4),
            "over_max_length": self.over_count,
            "over_max_length_ids": self.over,
        }


def check(
    paths: list[str],
    tokenizer: Any | None,
    max_length: int,
    eval_paths: list[str] | None = None,
    mapping: RecordMapping = NO_MAPPING,
) -> tuple[DataCheck, dict]:
    result = DataCheck()
    held_out = load_files(eval_paths) if eval_paths else None
    leaks = LeakFinder(held_out.conversations) if held_out else None
    duplicates = DuplicateFinder()
    tally = TokenTally(tokenizer, max_length) if tokenizer is not None else None
    records, formats, turns, multi_turn = 0, Counter[str](), Counter[int](), 0
    repeats, repeat_ids = 0, list[str]()
    tool_conversations, calls, most_calls, tool_problems = 0, 0, 0, 0
    off_order, off_order_ids = 0, list[str]()

    def problem(found: RecordProblem) -> None:
        nonlocal tool_problems
        tool_problems += found.kind == "tool call"
        result.problem_count += 1
        if len(result.problems) < MAX_LISTED:
            result.problems.append(found)

    progress = tqdm(desc="checking", unit=" records", disable=None, mininterval=2)
    for path in paths:
        for item in stream_file(path, mapping):
            progress.update()
            if isinstance(item, RecordProblem):
                records += item.of_record
                problem(item)
                continue
            records += 1
            result.valid += 1
            formats[item.format] += 1
            turns[len(item.messages)] += 1
            multi_turn += sum(m["role"] == "assistant" for m in item.messages) > 1
            if item.tools or item.calls:
                tool_conversations += 1
                calls += item.calls
                most_calls = max(most_calls, item.calls)
                if calls_off_schema_order(item.tools, item.messages):
                    off_order += 1
                    if len(off_order_ids) < 10:
                        off_order_ids.append(item.id)
            if duplicates.is_repeat(item):
                repeats += 1
                if len(repeat_ids) < 10:
                    repeat_ids.append(item.id)
            if leaks:
                leaks.see(item)
            if tally:
                tally.add(item)
    progress.close()

    report: dict[str, Any] = {
        "files": [str(Path(p)) for p in paths],
        "records": records,
        "valid": result.valid,
        "invalid": result.problem_count,
        "formats": dict(formats),
        "turns": dict(sorted(turns.items())),
        "multi_turn": multi_turn,
        "duplicates": {"count": repeats, "ids": repeat_ids},
        "tools": {
            "conversations": tool_conversations,
            "calls": calls,
            "calls_per_conversation": round(calls / tool_conversations, 2)
            if tool_conversations
            else 0,
            "most_calls": most_calls,
            "invalid_calls": tool_problems,
            "off_schema_order": {"count": off_order, "ids": off_order_ids},
        },
    }
    if held_out and leaks and eval_paths:
        for found in held_out.problems:
            problem(found)
        leaked = leaks.found()
        report["eval"] = {
            "files": [str(Path(p)) for p in eval_paths],
            "conversations": len(held_out.conversations),
            "leaks": len(leaked),
            "leak_examples": leaked[:10],
        }
    if tally and tally.lengths:
        report["tokens"] = tally.report()
    if tally and tool_conversations:
        fmt = tally.tool_format
        report["tools"]["format"] = fmt.describe() if fmt else f"refused: {tally.tool_refusal}"
    return result, report


def render(result: DataCheck, report: dict[str, Any]) -> str:
    lines = [
        f"files: {', '.join(report['files'])}",
        f"records: {report['records']} ({report['valid']} valid, {report['invalid']} invalid)",
        "formats: " + (", ".join(f"{k} {v}" for k, v in report["formats"].items()) or "none"),
        "turns per conversation: "
        + ", ".join(f"{k} turns: {v}" for k, v in report["turns"].items()),
        f"multi-turn (several assistant replies): {report['multi_turn']}",
    ]
    dup = report["duplicates"]
    lines.append(
        f"exact duplicates (dropped by training with dedup: true): {dup['count']}"
        + (f" e.g. {', '.join(dup['ids'][:3])}" if dup["count"] else "")
    )
    tools = report["tools"]
    if tools["conversations"] or tools["invalid_calls"]:
        lines.append(
            f"tool calling: {tools['conversations']} conversations with tools, {tools['calls']} "
            f"calls ({tools['calls_per_conversation']} per conversation, at most "
            f"{tools['most_calls']}); {tools['invalid_calls']} records with invalid tools or "
            "calls (undeclared function, bad JSON, arguments off the schema, unanswered results)"
            + (f"\n  {tools['format']}" if "format" in tools else "")
        )
        off = tools["off_schema_order"]
        if off["count"]:
            lines.append(
                f"  {off['count']} conversations write a call's arguments in another order than "
                f"its schema's properties (e.g. {', '.join(off['ids'][:3])}): served at "
                "tool_strict_level parameter, vLLM writes them in the schema's order, off what "
                "training taught; reorder the schema's properties (or the arguments) to match"
            )
    if "eval" in report:
        ev = report["eval"]
        lines.append(
            f"eval data {', '.join(ev['files'])}: {ev['conversations']} conversations, "
            f"{ev['leaks']} share a user turn with training"
            + "".join(f"\n  leak: {x['eval']} = {x['train']}" for x in ev["leak_examples"])
        )
    tokens = report.get("tokens")
    if tokens:
        lines += [
            f"tokens per conversation: min {tokens['min']}, median {tokens['p50']}, "
            f"p95 {tokens['p95']}, max {tokens['max']} (max_length {tokens['max_length']})",
            f"over max_length (dropped, or truncated with overlong: truncate): "
            f"{tokens['over_max_length']}"
            + (
                f" e.g. {', '.join(tokens['over_max_length_ids'])}"
                if tokens["over_max_length"]
                else ""
            ),
            f"trained tokens (assistant replies + end-of-turn): {tokens['trained_share']:.1%} "
            f"of {tokens['tokens']}",
        ]
    if result.problem_count:
        lines.append(f"invalid records ({result.problem_count}):")
        lines += [f"  {p}" for p in result.problems]
        if result.problem_count > len(result.problems):
            lines.append(f"  ... and {result.problem_count - len(result.problems)} more")
    return "\n".join(lines)
