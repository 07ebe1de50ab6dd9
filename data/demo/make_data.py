"""Write the demo datasets from the handbook table: `python data/demo/make_data.py [OUT_DIR]`.

- train.jsonl: ShareGPT conversations teaching every fact (several phrasings, some multi-turn,
  a few in Chinese).
- validation.jsonl: two more wordings of each fact's subject, for the eval loss during training
  (and keeping the best adapter), so that heldout.jsonl is only used by `tuneship eval`.
- heldout.jsonl: one paraphrased question per fact, with the key fact its answer must contain
  and the clause id it should cite.
- general.jsonl: general-knowledge questions with accepted short answers (forgetting check).
- tool_train.jsonl: tool conversations (tools.py): a request, the call, the result and the final
  answer, and handbook questions asked with the tools declared that need no call.
- tool_validation.jsonl / tool_heldout.jsonl: tool prompts in wordings training never uses, with
  the call expected (or none, or the final answer after a result): the export's tool check asks
  the first, `tuneship eval` the second.
Deterministic: the same table always gives the same files.
"""

from __future__ import annotations

import itertools
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tools
from handbook import (
    CHINESE_HELDOUT,
    CHINESE_TRAIN,
    FACTS,
    GENERAL,
    HELDOUT_DIRECT,
    HELDOUT_INDIRECT,
    HELDOUT_REWORDED,
    TRAIN_TEMPLATES,
    VALIDATION_PARAPHRASES,
    VALIDATION_TEMPLATES,
)

SEED = 20261128
INDIRECT_STARTS = ("how ", "when ", "where ", "which ", "what ")


def _turn(role: str, text: str) -> dict[str, str]:
    return {"from": role, "value": text}


def training_conversations() -> list[dict]:
    rng = random.Random(SEED)
    convs = []
    for _, subject, _, _, answer in FACTS:
        for template in TRAIN_TEMPLATES:
            question = template.format(s=subject)
            convs.append({"conversations": [_turn("human", question), _turn("gpt", answer)]})
    # Multi-turn: a follow-up about a neighbouring fact of the same section.
    for (code_a, subj_a, _, _, ans_a), (code_b, subj_b, _, _, ans_b) in itertools.pairwise(FACTS):
        if code_a[0] != code_b[0]:
            continue
        convs.append(
            {
                "conversations": [
                    _turn("human", TRAIN_TEMPLATES[0].format(s=subj_a)),
                    _turn("gpt", ans_a),
                    _turn("human", f"Thanks. And what about {subj_b}?"),
                    _turn("gpt", ans_b),
                ]
            }
        )
    for _, question, answer in CHINESE_TRAIN:
        convs.append({"conversations": [_turn("human", question), _turn("gpt", answer)]})
    rng.shuffle(convs)
    return convs


def validation_questions() -> list[dict]:
    rows = []
    for n, (code, _, _, fact, answer) in enumerate(FACTS):
        for k, subject in enumerate(VALIDATION_PARAPHRASES[code]):
            template = VALIDATION_TEMPLATES[(n + k) % len(VALIDATION_TEMPLATES)]
            rows.append(
                {
                    "id": f"{code}-v{k + 1}",
                    "style": "paraphrase",
                    "question": template.format(s=subject),
                    "fact": fact,
                    "answer": answer,
                }
            )
    return rows


def heldout_questions() -> list[dict]:
    rows = []
    for code, subject, _, fact, answer in FACTS:
        rows.append(
            {
                "id": code,
                "style": "reworded",
                "question": HELDOUT_REWORDED.format(s=subject),
                "fact": fact,
                "answer": answer,
                "clause": code,
            }
        )
    for code, _, heldout_subject, fact, answer in FACTS:
        indirect = heldout_subject.startswith(INDIRECT_STARTS)
        template = HELDOUT_INDIRECT if indirect else HELDOUT_DIRECT
        rows.append(
            {
                "id": f"{code}-p",
                "style": "paraphrase",
                "question": template.format(s=heldout_subject),
                "fact": fact,
                "answer": answer,
                "clause": code,
            }
        )
    answers = {code: (fact, answer) for code, _, _, fact, answer in FACTS}
    for code, question in CHINESE_HELDOUT:
        fact, answer = answers[code]
        rows.append(
            {
                "id": f"{code}-zh",
                "style": "paraphrase",
                "question": question,
                "fact": fact,
                "answer": answer,
                "clause": code,
            }
        )
    return rows


def general_questions() -> list[dict]:
    return [{"question": q, "answers": answers} for q, answers in GENERAL]


def tool_cases(
    rng: random.Random, split: str, per_template: int, expense_per_template: int | None = None
) -> list[dict]:
    """Tool requests of one split: the prompt, the call it needs, the system's result and the
    final answer that reports it (with the fact that answer must contain)."""
    wordings = {
        "train": (tools.EXPENSE_TRAIN, tools.POLICY_TRAIN, tools.TRAVEL_TRAIN),
        "validation": (tools.EXPENSE_VALIDATION, tools.POLICY_VALIDATION, tools.TRAVEL_VALIDATION),
        "heldout": (tools.EXPENSE_HELDOUT, tools.POLICY_HELDOUT, tools.TRAVEL_HELDOUT),
    }[split]
    cities = tools.CITIES_TRAIN if split == "train" else tools.CITIES_HELDOUT
    # training reads even-numbered clauses, the other splits odd-numbered ones
    facts = FACTS[0::2] if split == "train" else FACTS[1::2]
    cases = []
    purchases = itertools.cycle(tools.expense_items(rng))
    for template in wordings[0]:
        for _ in range(expense_per_template or per_template):
            category, item = next(purchases)
            amount, text = tools.expense_amount(rng)
            claim = f"EXP-{rng.randint(1000, 9999)}"
            cases.append(
                {
                    "prompt": template.format(item=item, amount=text),
                    "call": ("submit_expense", {"amount": amount, "category": category}),
                    "result": {"status": "submitted", "claim_id": claim},
                    "answer": f"Done: expense claim {claim} for ${text} ({category}) is submitted.",
                    "fact": claim,
                }
            )
    for template in wordings[1]:
        for code, _, _, fact, answer in rng.sample(facts, per_template):
            cases.append(
                {
                    "prompt": template.format(code=code),
                    "call": ("get_policy", {"code": code}),
                    "result": {"code": code, "text": answer},
                    "answer": answer,
                    "fact": fact,
                }
            )
    for template in wordings[2]:
        for _ in range(per_template):
            city, day, nights = rng.choice(cities), tools.date(rng), rng.randint(1, 6)
            booking = f"TRV-{rng.randint(1000, 9999)}"
            cases.append(
                {
                    "prompt": template.format(city=city, date=day, nights=nights),
                    "call": ("book_travel", {"destination": city, "date": day, "nights": nights}),
                    "result": {"status": "booked", "booking_id": booking},
                    "answer": f"Booked: {city} from {day} for {nights} nights, booking {booking}.",
                    "fact": booking,
                }
            )
    return cases


def tool_training_conversations() -> list[dict]:
    """Sessions of three requests each under one tool list, as an employee chats: the tool list
    (~490 tokens) is paid once per three requests. Each request is a call (answered by the
    system's result and a final answer, except some sessions' last one) or a handbook question
    answered without a call."""
    rng = random.Random(SEED + 1)
    # (the user's turn, then the answer without a call, or the case whose call answers it)
    turns: list[tuple[dict, dict]] = []
    # expenses asked more often: the category is the one argument the request does not spell out
    for case in tool_cases(rng, "train", per_template=2, expense_per_template=3):
        turns.append(({"role": "user", "content": case["prompt"]}, case))
    for _, subject, _, _, answer in rng.sample(FACTS, 10):
        question = rng.choice(tools.NO_CALL_TEMPLATES_TRAIN).format(s=subject)
        turns.append(
            ({"role": "user", "content": question}, {"role": "assistant", "content": answer})
        )
    rng.shuffle(turns)
    convs = []
    for start in range(0, len(turns), 3):
        session = turns[start : start + 3]
        messages: list[dict] = []
        for n, (user, reply) in enumerate(session):
            messages.append(user)
            if "call" not in reply:
                messages.append(reply)
                continue
            case = reply
            messages.append(tools.call_message(*case["call"], n))
            # every call but the last of every other session goes on to the result and answer
            if n < len(session) - 1 or len(convs) % 2 == 0:
                outcome = json.dumps(case["result"])
                messages += [
                    {"role": "tool", "tool_call_id": f"call_{n}", "content": outcome},
                    {"role": "assistant", "content": case["answer"]},
                ]
        convs.append({"tools": tools.TOOLS, "messages": messages})
    return convs


def tool_prompts(split: str) -> list[dict]:
    """Held-out tool prompts: the call each needs; for some, the final answer after the result;
    handbook questions that need no call (held-out only)."""
    rng = random.Random(SEED + (2 if split == "validation" else 3))
    # held-out: 60 calls, so one prompt moves a model's share by 1.7 points (the bundle's
    # target is a drop of at most 5 from the merged model's)
    per_template = 4 if split == "validation" else 10
    rows = []
    for n, case in enumerate(tool_cases(rng, split, per_template)):
        name, arguments = case["call"]
        user = {"role": "user", "content": case["prompt"]}
        rows.append(
            {
                "id": f"{split}-call-{n}",
                "style": "call",
                "messages": [user],
                "tools": tools.TOOLS,
                "call": {"name": name, "arguments": arguments},
            }
        )
        if split == "heldout" and n % 3 == 0:
            result = {
                "role": "tool",
                "tool_call_id": "call_0",
                "content": json.dumps(case["result"]),
            }
            rows.append(
                {
                    "id": f"{split}-answer-{n}",
                    "style": "answer after result",
                    "messages": [user, tools.call_message(name, arguments, 0), result],
                    "tools": tools.TOOLS,
                    "call": None,
                    "fact": case["fact"],
                }
            )
    if split == "heldout":
        for code, subject, _, fact, _ in rng.sample(FACTS, 8):
            question = tools.NO_CALL_TEMPLATE_HELDOUT.format(s=subject)
            rows.append(
                {
                    "id": f"{split}-none-{code}",
                    "style": "no call",
                    "messages": [{"role": "user", "content": question}],
                    "tools": tools.TOOLS,
                    "call": None,
                    "fact": fact,
                }
            )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "train.jsonl", training_conversations())
    write_jsonl(out_dir / "validation.jsonl", validation_questions())
    write_jsonl(out_dir / "heldout.jsonl", heldout_questions())
    write_jsonl(out_dir / "general.jsonl", general_questions())
    write_jsonl(out_dir / "tool_train.jsonl", tool_training_conversations())
    write_jsonl(out_dir / "tool_validation.jsonl", tool_prompts("validation"))
    write_jsonl(out_dir / "tool_heldout.jsonl", tool_prompts("heldout"))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
