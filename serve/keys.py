"""API keys: the configured ones plus a keys file, re-read while the server runs.

The keys file is opened by its configured path every time, never through a resolved one: a
Kubernetes Secret volume is a chain of links (`api-keys -> ..data/api-keys`, `..data ->
..2026_12_01_12_00_00.123/`) and an update swaps `..data` to a new folder and deletes the old
one, so a resolved path would point at nothing after the first rotation. When the file is
briefly missing or unreadable the last good keys stay in force (a warning and a metric say so),
so a botched update never locks every client out.

Each key has an id for logs and metrics, never the key: its name for a `name:key` line, else
"k-" and 64 bits of an HMAC of the key under a server secret. An unsalted hash on an open
/metrics would let anyone test guessed keys offline; the HMAC cannot be computed without the
secret.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def key_id(key: str, secret: bytes) -> str:
    """The id of an unnamed key: a keyed hash, so it reveals nothing without the secret."""
    return "k-" + hmac.new(secret, key.encode("utf-8"), hashlib.sha256).hexdigest()[:16]


def parse_keys(text: str) -> list[tuple[str | None, str]]:
    """(name or None, key) per line; blank lines and '#' comments (indented too) skipped. A
    line `name:key` names its key (a name of letters, digits, '.', '_', '-'); the key may
    itself hold ':'."""
    found: list[tuple[str | None, str]] = []
    for line in (raw.strip() for raw in text.splitlines()):
        if not line or line.startswith("#"):
            continue
        name, sep, key = line.partition(":")
        if sep and KEY_NAME.fullmatch(name) and key.strip():
            found.append((name, key.strip()))
        else:
            found.append((None, line))
    return found


def read_keys_file(path: Path) -> list[tuple[str | None, str]]:
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
        id_secret: bytes,
        recheck_s: float = 1.0,
        on_error: Callable[[str], None] = lambda reason: None,
    ):
        self.id_secret = id_secret
        parsed = parse_keys("\n".join(keys))
        self.env_keys = self._entries(parsed)
        self.path = Path(path) if path else None
        self.unnamed = any(name is None for name, _ in parsed)  # as of the last read
        self.recheck_s = recheck_s
        self.on_error = on_error
        self._checked = 0.0
        self._file_keys: list[tuple[bytes, str]] = []
        self._failing: str | None = None  # the reason of the last failed read, until one works
        self._load()

    def _entries(self, parsed: list[tuple[str | None, str]]) -> list[tuple[bytes, str]]:
        """(sha256 of the key, its id): what matching needs, without keeping ids to recompute."""
        return [(_digest(key), name or self.id_of(key)) for name, key in parsed]

    def id_of(self, key: str) -> str:
        return key_id(key, self.id_secret)

    def _load(self) -> None:
        if self.path is None:
            return
        try:
            parsed = read_keys_file(self.path)
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
        self._file_keys = self._entries(parsed)
        self.unnamed = self.unnamed or any(name is None for name, _ in parsed)
        if self._failing is not None:
            _say(f"keys file readable again, {len(self._file_keys)} keys: {self.path}")
        self._failing = None

    @property
    def entries(self) -> list[tuple[bytes, str]]:
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
        digest = _digest(presented)
        for key_digest, kid in self.entries:
            if hmac.compare_digest(digest, key_digest):
                found = kid
        return found


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()
