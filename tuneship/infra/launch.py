"""Start `tuneship serve` as a child process and wait until it answers (demo and tests).

Lives in the core because both the demo script and the end-to-end tests drive a server that
runs in the other environment; it uses only the standard library.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from tuneship.infra.errors import TuneshipError

# a line that names why a process failed (not a traceback's frame or source line)
ERROR_LINE = re.compile(r"^\S.*(Error|Exception|Killed|killed)\b|ERROR")


class Server:
    """`with Server([...tuneship serve ...], port, log) as s:` waits for /health, then stops it."""

    def __init__(
        self,
        argv: list[str],
        port: int,
        log_path: Path,
        timeout_s: float = 300,
        env: dict[str, str] | None = None,
    ):
        self.argv, self.port, self.log_path, self.timeout_s = argv, port, Path(log_path), timeout_s
        self.env = os.environ | (env or {})
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def healthy(self) -> bool:
        """Ready for traffic: /ready answers 200 (tuneship serve, after its self-test), or,
        where there is no /ready (a plain vLLM server), /health does."""
        for path in ("/ready", "/health"):
            try:
                with urllib.request.urlopen(f"{self.base_url}{path}", timeout=2) as resp:
                    return resp.status == 200
            except urllib.error.HTTPError as exc:
                if exc.code != 404:
                    return False
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                return False
        return False

    def log_tail(self, lines: int = 40) -> str:
        """The log's last lines, after the earlier lines that name an error: a vLLM engine that
        fails prints its cause, then tracebacks of every process that waited on it."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        every = text.splitlines()
        causes = [line for line in every[:-lines] if ERROR_LINE.search(line)][:10]
        return "\n".join([*causes, *(["..."] if causes else []), *every[-lines:]])

    def __enter__(self) -> Server:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w")
        started = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=self.env
        )
        log.close()
        while time.monotonic() - started < self.timeout_s:
            if self.proc.poll() is not None:
                raise TuneshipError(
                    f"server exited with {self.proc.returncode} before it was ready:\n"
                    + self.log_tail()
                )
            if self.healthy():
                self.startup_s = time.monotonic() - started
                return self
            time.sleep(1)
        self.stop()
        raise TuneshipError(f"server not ready after {self.timeout_s:.0f} s:\n{self.log_tail()}")

    def peak_rss_bytes(self) -> int:
        """Sum of the peak resident memory (VmHWM) of every process in the server's group."""
        total = 0
        if self.proc is None:
            return total
        for status in Path("/proc").glob("[0-9]*/status"):
            try:
                if os.getpgid(int(status.parent.name)) != self.proc.pid:
                    continue
                for line in status.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1]) * 1024
            except (OSError, ValueError, ProcessLookupError):
                continue
        return total

    def stop(self, grace_s: float = 30) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()

    def __exit__(self, *exc) -> None:
        self.stop()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
