"""Write the demo datasets from the handbook table: `python data/demo/make_data.py [OUT_DIR]`.

- train.jsonl: ShareGPT conversations teaching every fact (several phrasings, some multi-turn,
  a few in Chinese).
- validation.jsonl: two more wordings of each fact's subject, for the eval loss during training
  (and keeping the best adapter), so that heldout.jsonl is only used by `tuneship eval`.
- heldout.jsonl: one paraphrased question per fact, with the key fact its answer must contain
  and the clause id it should cite.
- general.jsonl: general-knowledge questions with accepted short answers (forgetting check).
Deterministic: the same table always gives the same files.
"""

from __future__ import annotations

import itertools
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
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


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
