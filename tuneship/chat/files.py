"""Dataset files as users have them, read one record at a time.

- `.json` (an array) and `.jsonl` (one record per line), also gzip-compressed (`.json.gz`,
  `.jsonl.gz`);
- `.parquet`, read in batches (a million-row file never sits in memory whole);
- `.csv` with a header row; a column holding a list (messages, conversations, history) holds it
  as JSON text;
- a folder: one written by Hugging Face `datasets`' `save_to_disk` (its train split, memory-
  mapped), or one holding `.parquet` shards (read in name order).

Each record comes with where it is (`line 12`, `index 3`, `row 40`, `shard.parquet:row 7`) for
the messages that name a bad one. A record that cannot even be decoded comes as `Unreadable`;
a file that cannot be read at all raises `FileUnreadable`. Parquet and `datasets` folders need
pyarrow and datasets (the train environment has both).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUFFIXES = (".jsonl.gz", ".json.gz", ".jsonl", ".json", ".parquet", ".csv")
LIST_COLUMNS = ("messages", "conversations", "history", "tools")
PARQUET_BATCH = 1024
PARQUET_READ_BUFFER = 1 << 20


@dataclass(frozen=True)
class Unreadable:
    """A record that could not be decoded (bad JSON, not UTF-8): why."""

    reason: str


class FileUnreadable(Exception):
    """The whole file (or folder) cannot be read: the message says why, `where` (a line, when
    known) where."""

    def __init__(self, reason: str, where: str = ""):
        super().__init__(reason)
        self.where = where


def kind(path: Path) -> str | None:
    """The format a path holds: one of SUFFIXES, 'folder', or None."""
    if path.is_dir():
        return "folder"
    name = path.name.lower()
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def records(path: Path, list_columns: tuple[str, ...] = LIST_COLUMNS) -> Iterator[tuple[str, Any]]:
    """(where, record) for every record of path, in order; list_columns: CSV columns whose JSON
    text is decoded (the mapped messages field among them)."""
    found = kind(path)
    if found is None:
        supported = ", ".join(SUFFIXES)
        raise FileUnreadable(
            f"unsupported file type '{path.suffix}' (use {supported}, or a folder)"
        )
    if found == "folder":
        yield from _folder(path)
    elif found == ".parquet":
        yield from _parquet(path)
    elif found == ".csv":
        yield from _csv(path, list_columns)
    else:
        raw = _read(path, gzipped=found.endswith(".gz"))
        if found.startswith(".jsonl"):
            yield from _jsonl(raw)
        else:
            yield from _json_array(raw)


def _read(path: Path, gzipped: bool) -> bytes:
    try:
        raw = gzip.decompress(path.read_bytes()) if gzipped else path.read_bytes()
    except OSError as exc:  # gzip.BadGzipFile is an OSError
        raise FileUnreadable(f"cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    return raw.removeprefix(b"\xef\xbb\xbf")


def _jsonl(raw: bytes) -> Iterator[tuple[str, Any]]:
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        yield f"line {lineno}", _decode(line)


def _decode(data: bytes) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return Unreadable(f"not UTF-8 (byte {exc.start} of the line)")
    except json.JSONDecodeError as exc:
        return Unreadable(f"invalid JSON: {exc.msg} (column {exc.colno})")


def _json_array(raw: bytes) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise FileUnreadable(f"not UTF-8 (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise FileUnreadable(
            f"invalid JSON: {exc.msg} (column {exc.colno})", where=f"line {exc.lineno}"
        ) from None
    if not isinstance(data, list):
        raise FileUnreadable(
            f"top level is a JSON {type(data).__name__}; a .json dataset is an array"
        )
    for index, record in enumerate(data):
        yield f"index {index}", record


def _csv(path: Path, list_columns: tuple[str, ...]) -> Iterator[tuple[str, Any]]:
    raw = _read(path, gzipped=False)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FileUnreadable(f"not UTF-8 (byte {exc.start})") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    for row in reader:
        record: dict[str, Any] = dict(row)
        where = f"line {reader.line_num}"
        bad = None
        for column in list_columns:
            value = record.get(column)
            if isinstance(value, str) and value.strip():
                try:
                    record[column] = json.loads(value)
                except json.JSONDecodeError as exc:
                    bad = Unreadable(f"column {column!r} is not JSON: {exc.msg}")
        yield where, bad or record


def _parquet(path: Path, prefix: str = "") -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # pre-buffering reads whole column chunks ahead and keeps them (a million-row file
        # would sit in Arrow's pool whole); buffered streams hold one page per column instead
        table = pq.ParquetFile(path, pre_buffer=False, buffer_size=PARQUET_READ_BUFFER)
    except (OSError, pa.ArrowException) as exc:
        raise FileUnreadable(f"not a readable Parquet file ({exc})") from None
    row = 0
    for batch in table.iter_batches(batch_size=PARQUET_BATCH, use_threads=False):
        for record in batch.to_pylist():
            yield f"{prefix}row {row}", without_struct_nulls(record)
            row += 1


def _folder(path: Path) -> Iterator[tuple[str, Any]]:
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        yield from _saved_dataset(path)
        return
    shards = sorted(path.glob("*.parquet"))
    if not shards:
        raise FileUnreadable(
            "a folder of data must be one written by datasets' save_to_disk or hold .parquet "
            "shards; this one has neither"
        )
    for shard in shards:
        yield from _parquet(shard, prefix=f"{shard.name}:")


def _saved_dataset(path: Path) -> Iterator[tuple[str, Any]]:
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except (OSError, ValueError, FileNotFoundError) as exc:
        raise FileUnreadable(f"not a readable datasets folder ({exc})") from None
    if isinstance(dataset, DatasetDict):
        if "train" not in dataset:
            splits = ", ".join(dataset) or "none"
            raise FileUnreadable(
                f"a DatasetDict without a 'train' split (splits: {splits}); save the split "
                "to train on, or point at its folder"
            )
        dataset = dataset["train"]
    for row, record in enumerate(dataset):
        yield f"row {row}", without_struct_nulls(record)


def without_struct_nulls(value: Any) -> Any:
    """An Arrow row with the keys its struct type added dropped. A list of structs has one type
    holding every element's keys, so each tool of a record reads back with the other tools'
    parameters as nulls (and each message with the other messages' keys): Arrow cannot tell
    absent from null, and no record format here means anything by a null key, so every null
    key goes (a null inside a list, such as an enum's, stays)."""
    if isinstance(value, dict):
        return {k: without_struct_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_struct_nulls(v) for v in value]
    return value
