"""The training rows on disk: every conversation a run uses, tokenized once, in an Arrow file in
the run's work folder, read back memory-mapped.

A million tokenized conversations held as Python lists take gigabytes; here they stream from
the plan (tuneship/chat/mixing.py, which keeps numbers, not conversations) through the chat
tokenizer into the file, 1,024 rows at a time, and the Trainer reads rows from the mapped file.
What stays in memory grows by a few bytes per conversation (its length and trained tokens, the
order). The file is also what the other ranks of a distributed run read (tokenized.py).
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from tuneship.chat.labels import ChatTokenizer, Example
from tuneship.chat.mixing import LeakFinder, MixPlan
from tuneship.chat.records import Conversation

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("truncated", pa.bool_()),
    ]
)
BATCH = 1024


@dataclass
class RowFacts:
    """Per row of the file: its length, trained tokens and whether it was cut at max_length."""

    lengths: np.ndarray
    trained: np.ndarray
    truncated: np.ndarray


@dataclass
class WrittenRows:
    facts: RowFacts
    eval_rows: list[int]  # row numbers of the eval set, in its order
    leaks: list[dict[str, str]]


class ExampleTable(Sequence[Example]):
    """Rows of the file, in the order given, as Examples (a lazy, picklable sequence)."""

    def __init__(self, path: Path, rows: np.ndarray):
        self.path, self.rows = path, rows
        self._batches: list[pa.RecordBatch] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @overload
    def __getitem__(self, index: int) -> Example: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Example]: ...
    def __getitem__(self, index: int | slice) -> Example | Sequence[Example]:
        if isinstance(index, slice):
            return ExampleTable(self.path, self.rows[index])
        row = int(self.rows[index])
        batch = self.batches()[row // BATCH]
        at = row % BATCH
        return Example(
            id=batch.column(0)[at].as_py(),
            input_ids=batch.column(1)[at].as_py(),
            labels=batch.column(2)[at].as_py(),
            truncated=batch.column(3)[at].as_py(),
        )

    def __iter__(self) -> Iterator[Example]:
        return (self[i] for i in range(len(self)))

    def batches(self) -> list[pa.RecordBatch]:
        if self._batches is None:
            reader = pa.ipc.open_file(pa.memory_map(str(self.path)))
            self._batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        return self._batches

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "rows": self.rows}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["rows"])  # type: ignore[misc]

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ExampleTable)
            and self.path == other.path
            and np.array_equal(self.rows, other.rows)
        )

    __hash__ = None  # type: ignore[assignment]


def write_rows(
    plan: MixPlan, chat_tokenizer: ChatTokenizer, path: Path, show_progress: bool = True
) -> WrittenRows:
    """Tokenize every kept conversation (then the eval_data file's) into path, atomically;
    find the eval set's leaks into training on the way."""
    leaks, held_out = LeakFinder(plan.held_out_conversations()), set(plan.held_out)
    lengths, trained, truncated = array("i"), array("i"), array("b")

    def conversations() -> Iterator[Conversation]:
        for number, conv in plan.kept():
            if number not in held_out:
                leaks.see(conv)
            yield conv
        yield from plan.eval_data

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    total = plan.kept_count + len(plan.eval_data)
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as writer:
        batch: list[Example] = []
        progress = tqdm(total=total, desc="tokenizing", unit=" conv", disable=not show_progress)
        for conv in conversations():
            example = chat_tokenizer(conv)
            lengths.append(len(example.input_ids))
            trained.append(example.trained_tokens)
            truncated.append(example.truncated)
            batch.append(example)
            if len(batch) == BATCH:
                writer.write_batch(to_batch(batch))
                batch = []
            progress.update()
        if batch:
            writer.write_batch(to_batch(batch))
        progress.close()
    os.replace(tmp, path)
    eval_rows = plan.held_out or list(range(plan.kept_count, total))
    facts = RowFacts(
        lengths=np.frombuffer(lengths, dtype=np.int32),
        trained=np.frombuffer(trained, dtype=np.int32),
        truncated=np.frombuffer(truncated, dtype=np.int8).astype(bool),
    )
    return WrittenRows(facts, eval_rows, leaks.found())


def to_batch(examples: list[Example]) -> pa.RecordBatch:
    return pa.record_batch(
        [
            pa.array([e.id for e in examples], pa.string()),
            pa.array([e.input_ids for e in examples], pa.list_(pa.int32())),
            pa.array([e.labels for e in examples], pa.list_(pa.int32())),
            pa.array([e.truncated for e in examples], pa.bool_()),
        ],
        schema=SCHEMA,
    )
