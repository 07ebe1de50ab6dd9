"""`tuneship data check FILE...`: validate chat data and report what training would see."""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from tuneship.chat.labels import ChatTokenizer
from tuneship.chat.mixing import drop_duplicates, leaks
from tuneship.chat.records import NO_MAPPING, LoadResult, RecordMapping, load_files


def _percentile(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


def token_report(result: LoadResult, tokenizer: Any, max_length: int) -> dict[str, Any]:
    chat_tokenizer = ChatTokenizer(tokenizer)
    examples = [chat_tokenizer(conv) for conv in result.conversations]
    lengths = [len(e.input_ids) for e in examples]
    trained = sum(e.trained_tokens for e in examples)
    over = [e for e in examples if len(e.input_ids) > max_length]
    return {
        "max_length": max_length,
        "min": min(lengths),
        "p50": _percentile(lengths, 0.5),
        "p95": _percentile(lengths, 0.95),
        "max": max(lengths),
        "mean": round(statistics.fmean(lengths), 1),
        "tokens": sum(lengths),
        "trained_share": round(trained / sum(lengths), 4),
        "over_max_length": len(over),
        "over_max_length_ids": [e.id for e in over[:10]],
    }


def check(
    paths: list[str],
    tokenizer: Any | None,
    max_length: int,
    eval_paths: list[str] | None = None,
    mapping: RecordMapping = NO_MAPPING,
) -> tuple[LoadResult, dict]:
    result = load_files(paths, mapping)
    _, duplicates = drop_duplicates(result.conversations)
    report: dict[str, Any] = {
        "files": [str(Path(p)) for p in paths],
        "records": result.records_seen,
        "valid": len(result.conversations),
        "invalid": len(result.problems),
        "formats": dict(result.formats),
        "turns": dict(sorted(Counter(len(c.messages) for c in result.conversations).items())),
        "multi_turn": sum(
            1 for c in result.conversations if sum(m["role"] == "assistant" for m in c.messages) > 1
        ),
        "duplicates": {"count": len(duplicates), "ids": duplicates[:10]},
    }
    if eval_paths:
        held_out = load_files(eval_paths)
        result.problems += held_out.problems
        found = leaks(result.conversations, held_out.conversations)
        report["eval"] = {
            "files": [str(Path(p)) for p in eval_paths],
            "conversations": len(held_out.conversations),
            "leaks": len(found),
            "leak_examples": found[:10],
        }
    if tokenizer is not None and result.conversations:
        report["tokens"] = token_report(result, tokenizer, max_length)
    return result, report


def render(result: LoadResult, report: dict[str, Any]) -> str:
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
    if result.problems:
        lines.append(f"invalid records ({len(result.problems)}):")
        lines += [f"  {p}" for p in result.problems]
    return "\n".join(lines)
