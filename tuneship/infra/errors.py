"""Errors meant for the user: the CLI prints them without a traceback and exits non-zero."""

from __future__ import annotations


class TuneshipError(Exception):
    """A problem the user can fix; the message names what is wrong, where, and the fix."""

    exit_code = 1


class ProblemsError(TuneshipError):
    """Several problems found together (validation collects them all before giving up)."""

    def __init__(self, headline: str, problems: list[str]):
        self.headline = headline
        self.problems = list(problems)
        lines = [headline, *(f"  - {p}" for p in self.problems)]
        super().__init__("\n".join(lines))


class ConfigError(ProblemsError):
    exit_code = 2


class DataError(ProblemsError):
    exit_code = 3


class Preempted(TuneshipError):
    """Stopped by SIGTERM after saving a checkpoint: run the same command again to resume."""

    exit_code = 143  # 128 + SIGTERM, what an orchestrator expects from a terminated process
