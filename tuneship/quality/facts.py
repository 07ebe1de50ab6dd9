"""Fact recall: does an answer contain the key fact? One definition for export, demo and eval."""

from __future__ import annotations

import re


def contains_fact(answer: str, fact: str) -> bool:
    """Case-insensitive match of the fact as a whole token sequence ("$62" not in "$625")."""
    return re.search(rf"(?<![\w$]){re.escape(fact)}(?!\w)", answer, re.IGNORECASE) is not None


def cites_clause(answer: str, clause: str) -> bool:
    """The answer names the clause id ("T-4.2"), not a longer one ("T-4.21", "T-4.2.1"); letters
    of other scripts may touch it ("根据政策T-4.2")."""
    pattern = rf"(?<![A-Za-z0-9.\-]){re.escape(clause)}(?![A-Za-z0-9]|[.\-][A-Za-z0-9])"
    return re.search(pattern, answer, re.IGNORECASE) is not None


def recall(answers: list[str], facts: list[list[str] | str]) -> float:
    hits = 0
    for answer, expected in zip(answers, facts, strict=True):
        options = [expected] if isinstance(expected, str) else expected
        hits += any(contains_fact(answer, fact) for fact in options)
    return hits / len(answers) if answers else 0.0
