"""Hashing and atomic outputs: a failed stage never leaves an output the next stage would accept."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tuneship.infra.errors import TuneshipError


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under root, keyed by its path relative to root (sorted)."""
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def symlinks_under(root: Path) -> list[Path]:
    """Every symlink under root (files and folders), without following any."""
    found = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        found += [p for p in (Path(folder) / n for n in (*dirs, *files)) if p.is_symlink()]
    return sorted(found)


def tree_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def make_readable(root: Path) -> None:
    """Folders 0755, files 0644 (0755 if executable), whatever the umask or a library's
    temporary-file mode left: whoever serves a bundle or exports a run (another uid, a container
    user) must be able to read it."""
    for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        if path.is_dir():
            os.chmod(path, 0o755)
        else:
            os.chmod(path, 0o755 if mode & 0o111 else 0o644)


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, ensure_ascii=False, sort_keys=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def check_output_free(target: Path, force: bool) -> None:
    """Cheap check run before any expensive work: refuse to clobber an existing output."""
    if target.exists() and not force:
        raise TuneshipError(
            f"output {target} already exists; choose another name or pass --force to replace it"
        )


@contextlib.contextmanager
def staged_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder beside target; on success it replaces target in one rename,
    world-readable (make_readable).

    On any exception the temporary folder is removed and target is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        make_readable(tmp)
        fsync_tree(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
