"""Dataset files as users have them (tuneship/chat/files.py, records.py): every format gives the
same conversations, a bad record is named by file and line, index or row, Alpaca records, and
column and role names mapped from the config."""

from __future__ import annotations

import csv
import gzip
import json
import subprocess

import pytest

from tests.support import TUNESHIP
from tuneship.chat.records import load_file
from tuneship.config.schema import DataMix

GOOD = [
    {"messages": [{"role": "user", "content": f"Policy {i}?"},
                  {"role": "assistant", "content": f"It says ${i}."}]}
    for i in range(3)
]  # fmt: skip
BAD = {"messages": [{"role": "user", "content": "Orphan?"}]}  # no assistant turn
ROWS = [GOOD[0], GOOD[1], BAD, GOOD[2]]  # the bad one is the third record


def write(folder, kind: str, rows: list[dict]):
    """rows in one of the formats; returns the path and where the third record is said to be."""
    if kind in ("jsonl.gz", "json.gz"):
        path = folder / f"d.{kind}"
        text = ("\n".join(json.dumps(r) for r in rows) if kind == "jsonl.gz"
                else json.dumps(rows))  # fmt: skip
        path.write_bytes(gzip.compress(text.encode()))
        return path, "line 3" if kind == "jsonl.gz" else "index 2"
    if kind == "csv":
        path = folder / "d.csv"
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["messages"])
            writer.writeheader()
            writer.writerows({"messages": json.dumps(r["messages"])} for r in rows)
        return path, "line 4"  # the header is line 1
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows)
    if kind == "parquet":
        pq.write_table(table, folder / "d.parquet")
        return folder / "d.parquet", "row 2"
    if kind == "shards":
        shards = folder / "shards"
        shards.mkdir()
        pq.write_table(table.slice(0, 2), shards / "part-0.parquet")
        pq.write_table(table.slice(2), shards / "part-1.parquet")
        return shards, "part-1.parquet:row 0"
    from datasets import Dataset

    Dataset.from_list(rows).save_to_disk(str(folder / "saved"))
    return folder / "saved", "row 2"


@pytest.mark.parametrize("kind", ["jsonl.gz", "json.gz", "csv", "parquet", "shards", "saved"])
def test_every_format_gives_the_same_conversations_and_names_the_bad_record(tmp_path, kind):
    path, where = write(tmp_path, kind, ROWS)
    result = load_file(path)
    assert [c.messages for c in result.conversations] == [
        tuple(r["messages"]) for r in GOOD
    ]  # fmt: skip
    assert [str(p) for p in result.problems] == [f"{path}:{where}: no assistant turn: nothing to "
                                                 "train on"]  # fmt: skip
    assert len({c.id for c in result.conversations}) == 3


def function(name: str, properties: dict) -> dict:
    parameters = {"type": "object", "required": list(properties), "properties": properties}
    return {"type": "function", "function": {"name": name, "description": f"{name}.",
                                             "parameters": parameters}}  # fmt: skip


TOOLS = [
    function("submit", {"category": {"type": "string", "enum": ["meals", "travel"]}}),
    function("lookup", {"code": {"type": "string"}}),
]
CALL = {"role": "assistant", "content": "", "tool_calls": [{
    "id": "c0", "type": "function", "function": {"name": "lookup", "arguments": '{"code": "T"}'}
}]}  # fmt: skip
TOOL_ROW = {"tools": TOOLS, "messages": [{"role": "user", "content": "Clause T-1.1?"}, CALL,
            {"role": "tool", "tool_call_id": "c0", "content": "Meals: $62."},
            {"role": "assistant", "content": "Meals are $62."}]}  # fmt: skip


@pytest.mark.parametrize("kind", ["parquet", "saved"])
def test_tools_stored_as_arrow_structs_read_back_as_declared(tmp_path, kind):
    # Arrow stores a list of tools as one struct type holding every tool's keys; each tool
    # reads back with the others' keys as nulls ('code': None beside 'category'), which the
    # template would render as phantom parameters training sees and serving never does
    path, _ = write(tmp_path, kind, [TOOL_ROW] * 3)
    (conversation, *_) = load_file(path).conversations
    assert [t["function"]["parameters"] for t in conversation.tools] == [
        t["function"]["parameters"] for t in TOOLS
    ]


def test_a_file_that_cannot_be_read_is_one_problem_naming_it(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip")
    (tmp_path / "empty").mkdir()
    for name, reason in (("bad.parquet", "not a readable Parquet file"),
                         ("bad.jsonl.gz", "cannot read"),
                         ("empty", "neither")):  # fmt: skip
        problems = [str(p) for p in load_file(tmp_path / name).problems]
        assert len(problems) == 1 and problems[0].startswith(f"{tmp_path / name}: "), problems
        assert reason in problems[0]


def test_alpaca_records_with_input_system_and_history(tmp_path):
    rows = [
        {"instruction": "Summarise", "input": "The meal allowance is $62.", "output": "$62/day."},
        {"instruction": "And hotels?", "output": "$180.", "system": "Be brief.",
         "history": [["Meals?", "$62."]]},
        {"instruction": "Broken", "output": "x", "history": [["only a question"]]},
    ]  # fmt: skip
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(rows))
    result = load_file(path)
    first, second = (c.messages for c in result.conversations)
    assert first == (
        {"role": "user", "content": "Summarise\n\nThe meal allowance is $62."},
        {"role": "assistant", "content": "$62/day."},
    )
    assert [m["role"] for m in second] == ["system", "user", "assistant", "user", "assistant"]
    assert result.formats == {"alpaca": 2}
    assert [str(p) for p in result.problems] == [
        f"{path}:index 2: history[0] is not a [question, answer] pair"
    ]


def test_column_and_role_names_are_mapped_from_the_config(tmp_path):
    rows = [
        {"dialog": [{"speaker": "customer", "text": "Meals?"}, {"speaker": "bot", "text": "$62."}]},
        {"dialog": [{"speaker": "customer", "text": "Hotel?"}, {"speaker": "agent", "text": "?"}]},
    ]  # fmt: skip
    path, _ = write(tmp_path, "parquet", rows)
    mix = DataMix(data=[{"path": str(path), "messages_field": "dialog", "role_field": "speaker",
                         "content_field": "text",
                         "role_map": {"customer": "user", "bot": "assistant"}}])  # fmt: skip
    result = load_file(path, mix.data[0].mapping())
    assert result.conversations[0].messages == (
        {"role": "user", "content": "Meals?"},
        {"role": "assistant", "content": "$62."},
    )
    assert result.formats == {"mapped": 1}
    assert "dialog[1]: unknown role 'agent'" in str(result.problems[0])
    unmapped = load_file(path)
    assert "keys present: dialog (a list under another name: set messages_field)" in str(
        unmapped.problems[0]
    )


def test_data_check_reads_parquet_with_a_mapping_and_refuses_a_bad_role_name(tmp_path):
    rows = [{"chat": [{"role": "human", "content": "Q?"}, {"role": "bot", "content": "A."}]}]
    path, _ = write(tmp_path, "parquet", rows)
    checked = subprocess.run(
        [TUNESHIP, "data", "check", str(path), "--no-tokens", "--json", "--messages-field",
         "chat", "--role-map", "bot=assistant"], capture_output=True, text=True,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["valid"] == 1
    refused = subprocess.run(
        [TUNESHIP, "data", "check", str(path), "--no-tokens", "--messages-field", "chat",
         "--role-map", "bot=robot"], capture_output=True, text=True,
    )  # fmt: skip
    assert refused.returncode == 2 and "role_map.bot" in refused.stderr, refused.stderr


def test_a_mapped_source_trains_as_any_other(tmp_path):
    """The training mix reads each source with its own mapping."""
    from tuneship.chat.mixing import prepare

    rows = [{"dialog": [{"role": "customer", "content": f"Q{i}?"},
                        {"role": "bot", "content": f"A{i}."}]} for i in range(4)]  # fmt: skip
    path, _ = write(tmp_path, "parquet", rows)
    mix = DataMix(data=[{"path": str(path), "messages_field": "dialog",
                         "role_map": {"customer": "user", "bot": "assistant"}}])  # fmt: skip
    prepared = prepare(mix)
    assert len(prepared.train) == 4 and prepared.problems == []
