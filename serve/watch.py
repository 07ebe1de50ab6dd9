"""vLLM's output, passed through line by line and watched for the death of its engine.

When vLLM's engine dies (a request that crashes a worker, memory exhausted, a kernel missing),
its API server answers 500 to whatever is in flight, prints tracebacks from every process, then
shuts down with exit code 0. `tuneship serve` watches for that, so it can stop at once with the
root cause in one line and a non-zero code (a Deployment restarts it; the logs say why).
"""

from __future__ import annotations

import threading
from collections import deque
from typing import IO

from tuneship.infra.engine_log import engine_died, root_cause

KEPT_LINES = 2000  # enough for every process's traceback of one engine failure


class EngineWatch:
    """Copies a child's stdout and stderr to ours, keeps the recent lines, and notes the first
    sign that its engine died."""

    def __init__(self, stdout: IO[bytes], stderr: IO[bytes], out: IO[bytes], err: IO[bytes]):
        self.recent: deque[str] = deque(maxlen=KEPT_LINES)
        self.dead = threading.Event()
        self._lock = threading.Lock()
        self._cause_lines: list[str] | None = None
        self._threads = [
            threading.Thread(target=self._pump, args=pair, daemon=True)
            for pair in ((stdout, out), (stderr, err))
        ]
        for thread in self._threads:
            thread.start()

    def _pump(self, source: IO[bytes], sink: IO[bytes]) -> None:
        for raw in iter(source.readline, b""):
            try:
                sink.write(raw)
                sink.flush()
            except (OSError, ValueError):
                pass  # our own output is gone: keep draining, or vLLM blocks on a full pipe
            line = raw.decode("utf-8", errors="replace")
            with self._lock:
                self.recent.append(line)
                if self._cause_lines is None and engine_died(line):
                    self._cause_lines = list(self.recent)
                    self.dead.set()

    def finish(self, timeout_s: float = 5.0) -> None:
        """Wait for the output to end (the child and its processes exited)."""
        for thread in self._threads:
            thread.join(timeout_s)

    def cause(self) -> str:
        """The engine's root cause, from the lines before its death (or the latest ones)."""
        with self._lock:
            lines = self._cause_lines if self._cause_lines is not None else list(self.recent)
        return root_cause(lines) or "no exception found in vLLM's output"
