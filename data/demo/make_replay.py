"""Write general_replay.jsonl: the base model's own answers to general prompts (self-replay).

`.venv/train/bin/python data/demo/make_replay.py` after `tuneship base fetch`. Greedy decoding,
so the output is reproducible on the same base; answers that do not end with the end-of-turn
token within the budget are left out (training on them would teach the model not to stop).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from replay_prompts import ALL_PROMPTS  # noqa: E402

MAX_NEW_TOKENS = 96


def main(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneship.infra.paths import default_base_dir

    base = default_base_dir()
    tokenizer = AutoTokenizer.from_pretrained(base, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    rows = []
    for start in range(0, len(ALL_PROMPTS), 16):
        prompts = ALL_PROMPTS[start : start + 16]
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out_ids = model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        for prompt, ids in zip(prompts, out_ids[:, batch["input_ids"].shape[1] :], strict=True):
            ids = ids.tolist()
            if tokenizer.eos_token_id not in ids:
                continue
            answer = tokenizer.decode(ids[: ids.index(tokenizer.eos_token_id)]).strip()
            if answer:
                rows.append(
                    {
                        "conversations": [
                            {"from": "human", "value": prompt},
                            {"from": "gpt", "value": answer},
                        ]
                    }
                )
    with open(out, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{len(rows)} of {len(ALL_PROMPTS)} prompts answered within {MAX_NEW_TOKENS} tokens")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "general_replay.jsonl")
