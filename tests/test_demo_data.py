"""The demo handbook datasets meet their contract and match their generator."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

from tuneship.chat.records import load_file

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DEMO / name).read_text(encoding="utf-8").splitlines()]


def test_training_set_is_valid_sharegpt_with_multi_turn_and_chinese():
    result = load_file(DEMO / "train.jsonl")
    assert result.problems == []
    assert result.formats == {"sharegpt": len(result.conversations)}
    assert len(result.conversations) >= 300
    multi = [
        c for c in result.conversations if sum(m["role"] == "assistant" for m in c.messages) > 1
    ]
    assert len(multi) >= 20
    chinese = [
        c for c in result.conversations if re.search(r"[\u4e00-\u9fff]", c.messages[0]["content"])
    ]
    assert len(chinese) >= 3


def test_heldout_facts_are_taught_and_questions_are_unseen():
    train = load_file(DEMO / "train.jsonl").conversations
    answers = [m["content"] for c in train for m in c.messages if m["role"] == "assistant"]
    questions = {
        m["content"].strip().lower() for c in train for m in c.messages if m["role"] == "user"
    }
    heldout = rows("heldout.jsonl")
    assert len({h["id"] for h in heldout}) == len(heldout)
    for style in ("reworded", "paraphrase"):
        assert sum(h["style"] == style for h in heldout) >= 50
    for item in heldout:
        assert any(item["fact"] in a for a in answers), f"{item['id']}: fact never taught"
        assert item["fact"] in item["answer"]
        assert item["question"].strip().lower() not in questions, f"{item['id']} seen in training"


def test_general_questions_have_short_reference_answers_and_are_not_trained():
    general = rows("general.jsonl")
    assert len(general) >= 30
    assert all(g["question"].endswith("?") and g["answers"] for g in general)
    replay = load_file(DEMO / "general_replay.jsonl")
    assert replay.problems == [] and len(replay.conversations) >= 50
    replayed = {c.messages[0]["content"] for c in replay.conversations}
    assert not replayed & {g["question"] for g in general}


def test_committed_files_are_what_the_generator_writes(tmp_path):
    subprocess.run([sys.executable, str(DEMO / "make_data.py"), str(tmp_path)], check=True)
    names = ("train.jsonl", "heldout.jsonl", "general.jsonl", "validation.jsonl")
    tools = ("tool_train.jsonl", "tool_validation.jsonl", "tool_heldout.jsonl")
    for name in names + tools:
        assert (tmp_path / name).read_bytes() == (DEMO / name).read_bytes(), name


def test_tool_data_is_valid_and_its_prompts_are_unseen_in_training():
    from tuneship.quality.tool_calls import load_tool_items

    train = load_file(DEMO / "tool_train.jsonl")
    assert train.problems == [] and all(c.tools for c in train.conversations)
    turns = [m for c in train.conversations for m in c.messages]
    asked = {m["content"] for m in turns if m["role"] == "user"}
    calls = [m for m in turns if m.get("tool_calls")]
    answered_directly = [  # a question followed at once by the answer: no call
        a for q, a in itertools.pairwise(turns) if q["role"] == "user" and not a.get("tool_calls")
    ]
    assert len(calls) >= 60 and len(answered_directly) >= 8
    trained_calls = {json.dumps(m["tool_calls"][0]["function"], sort_keys=True) for m in calls}
    for split in ("tool_validation.jsonl", "tool_heldout.jsonl"):
        items = load_tool_items(DEMO / split)
        assert not asked & {i.messages[0]["content"] for i in items}, split
        calls = [i for i in items if i.call]
        assert {i.call["name"] for i in calls} == {"submit_expense", "get_policy", "book_travel"}
        assert not trained_calls & {json.dumps(i.call, sort_keys=True) for i in calls}, split
    kinds = {i.kind for i in load_tool_items(DEMO / "tool_heldout.jsonl")}
    assert kinds == {"call", "no call", "answer after result"}
