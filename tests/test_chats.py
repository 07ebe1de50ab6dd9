"""Chat data formats and every validation error (shared core)."""

from __future__ import annotations

import json

import pytest

from tests.support import sharegpt, write_jsonl
from tuneship.chat.records import load_file, load_files


def test_sharegpt_and_aliases_normalise_to_openai_roles(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            sharegpt(("system", "S"), ("human", "Q"), ("gpt", "A")),
            sharegpt(("user", "Q2"), ("assistant", "A2")),
        ],
    )
    result = load_file(path)
    assert result.problems == []
    assert [m["role"] for m in result.conversations[0].messages] == ["system", "user", "assistant"]
    assert result.conversations[1].messages[1] == {"role": "assistant", "content": "A2"}
    assert result.formats == {"sharegpt": 2}
    assert result.conversations[0].id == "d.jsonl:1"


def test_openai_messages_json_array_with_bom_and_chinese(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "user", "content": "你好"},
                {"role": "assistant", "content": "您好!"},
            ]
        }
    ]
    path = tmp_path / "d.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows, ensure_ascii=False).encode("utf-8"))
    result = load_file(path)
    assert result.problems == []
    assert result.formats == {"openai": 1}
    assert result.conversations[0].messages[0]["content"] == "你好"
    assert result.conversations[0].id == "d.json#0"


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "record is a JSON list"),
        ('{"text": "hi"}', "no 'conversations' (ShareGPT) or 'messages' (OpenAI) list"),
        ('{"conversations": {}}', "'conversations' is a dict, expected a list"),
        ('{"conversations": []}', "'conversations' is empty"),
        ('{"conversations": ["hi"]}', "conversations[0] is a str, expected an object"),
        ('{"conversations": [{"from": "human"}]}', "conversations[0] lacks 'value'"),
        ('{"conversations": [{"from": "bot", "value": "x"}]}', "unknown role 'bot'"),
        ('{"conversations": [{"from": "human", "value": 3}]}', "value is a int, expected a string"),
        ('{"conversations": [{"from": 1, "value": "x"}]}', "from is a int, expected a string"),
        (
            '{"conversations": [{"from": "human", "value": "  "}, {"from": "gpt", "value": "a"}]}',
            "empty user content",
        ),
        ('{"conversations": [{"from": "gpt", "value": "a"}]}', "assistant turn before any user"),
        ('{"conversations": [{"from": "human", "value": "q"}]}', "no assistant turn"),
        (
            '{"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},'
            ' {"role": "assistant", "content": "a"}]}',
            "a system turn may only come first",
        ),
        ('{"messages": [{"role": "human", "content": "q"}]}', "unknown role 'human'"),
    ],
)
def test_each_invalid_record_names_file_line_and_reason(tmp_path, line, reason):
    good = json.dumps(sharegpt(("human", "q"), ("gpt", "a")))
    path = tmp_path / "d.jsonl"
    path.write_text(f"{good}\n\n{line}\n", encoding="utf-8")
    result = load_file(path)
    assert len(result.conversations) == 1
    assert len(result.problems) == 1
    problem = result.problems[0]
    assert problem.where == "line 3"
    assert reason in problem.reason
    assert str(problem).startswith(f"{path}:line 3: ")


def test_json_array_problems_name_the_index(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([sharegpt(("human", "q"), ("gpt", "a")), {"x": 1}]))
    result = load_file(path)
    assert [str(p) for p in result.problems] == [
        f"{path}:index 1: no 'conversations' (ShareGPT) or 'messages' (OpenAI) list, nor "
        "'instruction' and 'output' (Alpaca), nor 'question' and 'answer'; keys present: x (a "
        "list under another name: set messages_field)"
    ]


def test_file_level_problems(tmp_path):
    (tmp_path / "d.txt").write_text("a,b\n")
    (tmp_path / "obj.json").write_text('{"conversations": []}')
    (tmp_path / "broken.json").write_text('[\n{"a": 1},\n{oops}\n]')
    (tmp_path / "latin1.jsonl").write_bytes(b'{"a": "caf\xe9"}\n')
    result = load_files(
        [
            tmp_path / "d.txt",
            tmp_path / "missing.jsonl",
            tmp_path / "obj.json",
            tmp_path / "broken.json",
            tmp_path / "latin1.jsonl",
        ]
    )
    reasons = [str(p) for p in result.problems]
    assert "unsupported file type '.txt'" in reasons[0]
    assert "missing.jsonl: cannot read" in reasons[1]
    assert "top level is a JSON dict" in reasons[2]
    assert "broken.json:line 3: invalid JSON" in reasons[3]
    assert "latin1.jsonl:line 1: not UTF-8" in reasons[4]
    assert result.conversations == []
