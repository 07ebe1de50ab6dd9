"""API keys: the configured ones plus a keys file, re-read while the server runs.

The keys file is opened by its configured path every time, never through a resolved one: a
Kubernetes Secret volume is a chain of links (`api-keys -> ..data/api-keys`, `..data ->
..2026_12_01_12_00_00.123/`) and an update swaps `..data` to a new folder and deletes the old
one, so a resolved path would point at nothing after the first rotation. When the file is
briefly missing or unreadable the last good keys stay in force (a warning and a metric say so),
so a botched update never locks every client out.
"""

from __future__ import annotations

import hashlib
import hmac
import sys
import time
from collections.abc import Callable
from pathlib import Path


def key_id(key: str) -> str:
    return "k-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:8]


def parse_keys(text: str) -> list[str]:
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def read_keys_file(path: Path) -> list[str]:
    """The keys in the file; OSError or UnicodeDecodeError when it cannot be read."""
    with open(path, encoding="utf-8") as fh:  # through the links, as they are now
        return parse_keys(fh.read())


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class KeyRing:
    """The accepted keys: the configured ones plus the file's, the file re-read every
    recheck_s seconds. on_error(reason) is called for each failed read (missing, unreadable)."""

    def __init__(
        self,
        keys: list[str],
        path: str | None,
        recheck_s: float = 1.0,
        on_error: Callable[[str], None] = lambda reason: None,
    ):
        self.env_keys = list(keys)
        self.path = Path(path) if path else None
        self.recheck_s = recheck_s
        self.on_error = on_error
        self._checked = 0.0
        self._file_keys: list[str] = []
        self._failing: str | None = None  # the reason of the last failed read, until one works
        self._load()

    def _load(self) -> None:
        if self.path is None:
            return
        try:
            self._file_keys = read_keys_file(self.path)
        except (OSError, UnicodeDecodeError) as exc:
            reason = "missing" if isinstance(exc, FileNotFoundError) else "unreadable"
            self.on_error(reason)
            if self._failing != reason:
                _say(
                    f"warning: keys file {self.path} is {reason} ({exc.__class__.__name__}); "
                    f"keeping the {len(self._file_keys)} keys last read from it"
                )
            self._failing = reason
            return
        if self._failing is not None:
            _say(f"keys file readable again, {len(self._file_keys)} keys: {self.path}")
        self._failing = None

    @property
    def keys(self) -> list[str]:
        now = time.monotonic()
        if now - self._checked >= self.recheck_s:
            self._checked = now
            self._load()
        return self.env_keys + self._file_keys

    @property
    def configured(self) -> bool:
        return bool(self.env_keys) or self.path is not None

    def match(self, presented: str) -> str | None:
        """The id of the key presented, or None; every key is compared (constant time)."""
        found = None
        digest = hashlib.sha256(presented.encode("utf-8")).digest()
        for key in self.keys:
            if hmac.compare_digest(digest, hashlib.sha256(key.encode("utf-8")).digest()):
                found = key
        return key_id(found) if found is not None else None
