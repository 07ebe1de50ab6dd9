"""Reading a vLLM server's output: whether its engine died, and the one line that says why.

vLLM prints a failing engine's traceback from every process that saw it (the worker, the engine
core, the API server), each line behind a prefix like `(Worker pid=12) ERROR 12-06 16:22:41
[file.py:10] `. The root cause is the first exception line among them; the API server's
`EngineDeadError` only says to look above. Standard library only: both environments use it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# "(EngineCore pid=3834) ERROR 12-06 16:22:41 [core.py:1512] " and "(APIServer pid=1) "
VLLM_PREFIX = re.compile(
    r"^\((?:[\w:.-]+) pid=\d+\)\s*"
    r"(?:[A-Z]+\s+\d\d-\d\d\s+\d\d:\d\d:\d\d(?:\.\d+)?\s+\[[^\]]*\]\s?)?"
)
# "torch._inductor.exc.InductorError: InvalidCxxCompiler: ...", "RuntimeError: ...", "OSError"
EXCEPTION_LINE = re.compile(
    r"^(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt|Failure)(?::\s.*)?$"
)
# what vLLM's API server prints once its engine is gone (it then shuts down, exit code 0)
ENGINE_DEAD = re.compile(r"EngineDeadError|EngineCore encountered an issue|died unexpectedly")
NOT_A_CAUSE = re.compile(r"EngineDeadError|^KeyboardInterrupt|^SystemExit|^CancelledError")


def strip_prefix(line: str) -> str:
    """The line as the process wrote it, without vLLM's process and logger prefix."""
    return VLLM_PREFIX.sub("", line.rstrip("\n"), count=1)


def engine_died(line: str) -> bool:
    return bool(ENGINE_DEAD.search(line))


def root_cause(lines: Iterable[str]) -> str | None:
    """The first exception line in lines (vLLM prefixes removed) that names a cause, or None."""
    for line in lines:
        text = strip_prefix(line)
        if EXCEPTION_LINE.match(text) and not NOT_A_CAUSE.search(text):
            return text.strip()
    return None
