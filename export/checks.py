"""The export's checks: each proves one way the bundle could misbehave in vLLM does not happen.

- template parity: vLLM's token ids for chat messages equal the ids training used (one BOS,
  identical generation prompt);
- stop tokens: greedy replies through vLLM end with finish_reason "stop";
- quality gate: perplexity (assistant tokens) and fact recall of the quantized model against the
  merged 16-bit model;
- preflight: vLLM loads the bundle with the production arguments and answers; load time and
  peak memory are recorded.

vLLM runs in the serve environment: `tuneship bundle probe` there does the serving, these
functions judge what it returns.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneship.chats import Conversation
from tuneship.config import ExportConfig
from tuneship.errors import TuneshipError
from tuneship.facts import cites_clause, contains_fact


@dataclass(frozen=True)
class EvalItem:
    id: str
    messages: tuple[dict[str, str], ...]  # the prompt: everything before the reply
    answer: str | None  # reference reply (perplexity), if known
    fact: str | None  # key fact the reply must contain (recall), if known
    accepted: tuple[str, ...] = ()  # other accepted facts ("answers": general questions)
    style: str | None = None  # a label to break recall down by (e.g. reworded, paraphrase)
    clause: str | None = None  # the clause id a reply should cite ("T-4.2"), if any

    @property
    def facts(self) -> tuple[str, ...]:
        return ((self.fact,) if self.fact else ()) + self.accepted


def find_serve_bin(
    explicit: str | None,
    hint: str = "set checks=false to export without them (the bundle then records them as skipped)",
) -> Path:
    """The serve environment's `tuneship`, which runs vLLM for the checks and the evaluation."""
    candidates = [explicit, os.environ.get("TUNESHIP_SERVE_BIN"), ".venv/serve/bin/tuneship"]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate).resolve()
    raise TuneshipError(
        "vLLM runs in the serve environment: this needs its `tuneship` (looked at the "
        "serve_bin setting, $TUNESHIP_SERVE_BIN and .venv/serve/bin/tuneship); set one of them "
        f"(`make envs` builds .venv/serve), or {hint}"
    )


def load_eval_items(path: Path) -> list[EvalItem]:
    """Held-out questions: JSONL rows {"question", "fact"?, "answers"?, "answer"?, "id"?,
    "style"?, "clause"?}: `fact` (or any of `answers`) is what a correct reply must contain,
    `answer` a reference reply for perplexity, `clause` the id of the rule it should cite."""
    items, problems = [], []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            question = row["question"]
            if not isinstance(question, str) or not question.strip():
                raise ValueError("'question' must be a non-empty string")
            for key in ("fact", "answer", "id", "style", "clause"):
                if row.get(key) is not None and not isinstance(row[key], str):
                    raise ValueError(f"'{key}' must be a string")
            if row.get("clause") is not None and not row["clause"].strip():
                raise ValueError("'clause' must be a non-empty string")
            accepted = row.get("answers", [])
            if not isinstance(accepted, list) or not all(
                isinstance(a, str) and a.strip() for a in accepted
            ):
                raise ValueError("'answers' must be a list of non-empty strings")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            problems.append(f"{path}:line {lineno}: {exc}")
            continue
        items.append(
            EvalItem(
                str(row.get("id", f"{Path(path).name}:{lineno}")),
                ({"role": "user", "content": question},),
                row.get("answer"),
                row.get("fact"),
                tuple(accepted),
                row.get("style"),
                row.get("clause"),
            )
        )
    if problems or not items:
        raise TuneshipError(
            f"eval_data {path} is not a held-out question file:\n"
            + "\n".join(f"  - {p}" for p in problems or ["no questions"])
        )
    return items


def items_from_training(conversations: list[Conversation], count: int, seed: int) -> list[EvalItem]:
    """Fallback when no eval_data is given: the last reply of sampled training conversations."""
    picked = random.Random(seed).sample(conversations, min(count, len(conversations)))
    items = []
    for conv in picked:
        last = max(i for i, m in enumerate(conv.messages) if m["role"] == "assistant")
        items.append(EvalItem(conv.id, conv.messages[:last], conv.messages[last]["content"], None))
    return items


def probe(serve_bin: Path, model_dir: Path, work: Path, name: str, spec: dict) -> dict:
    """Run `tuneship bundle probe` in the serve environment; return its result."""
    work.mkdir(parents=True, exist_ok=True)
    spec_path, out_path = work / f"{name}.in.json", work / f"{name}.out.json"
    spec_path.write_text(json.dumps(spec, ensure_ascii=False))
    argv = [str(serve_bin), "bundle", "probe", str(model_dir)]
    argv += ["--input", str(spec_path), "--output", str(out_path)]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0 or not out_path.is_file():
        log = out_path.with_suffix(".log")
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        raise TuneshipError(
            f"vLLM could not serve {model_dir} (preflight): {proc.stderr.strip()[-1500:]}\n{tail}"
        )
    return json.loads(out_path.read_text())


def template_parity(tokenizer: Any, chat_tokenizer: Any, items: list[EvalItem], served: list):
    """Training token ids for each prompt + reply must start with vLLM's prompt ids exactly."""
    mismatches, bos_problems = [], []
    bos = tokenizer.bos_token_id
    for item, served_ids in zip(items, served, strict=True):
        reply = {"role": "assistant", "content": item.answer or "ok"}
        trained = chat_tokenizer(Conversation(item.id, "openai", (*item.messages, reply)))
        if trained.input_ids[: len(served_ids)] != served_ids:
            mismatches.append(item.id)
        # (ChatML tokenizers call <|im_start|> their BOS: many per prompt is normal there)
        if bos is not None and (
            served_ids[:2] == [bos, bos] or served_ids.count(bos) != trained.input_ids.count(bos)
        ):
            bos_problems.append(item.id)
    return {
        "passed": not mismatches and not bos_problems,
        "conversations": len(items),
        "mismatched": len(mismatches),
        "mismatched_ids": mismatches[:10],
        "double_bos_ids": bos_problems[:10],
    }


def stop_rate(chats: list[dict], minimum: float, max_tokens: int) -> dict:
    stopped = sum(c["finish_reason"] == "stop" for c in chats)
    rate = stopped / len(chats)
    return {
        "passed": rate >= minimum,
        "rate": round(rate, 3),
        "minimum": minimum,
        "prompts": len(chats),
        "max_tokens": max_tokens,
        "not_stopped_ids": [c["id"] for c in chats if c["finish_reason"] != "stop"][:10],
    }


def fact_recall(items: list[EvalItem], chats: list[dict]) -> float | None:
    scored = [(i, c) for i, c in zip(items, chats, strict=True) if i.facts]
    if not scored:
        return None
    return sum(answered(i, c["text"]) for i, c in scored) / len(scored)


def answered(item: EvalItem, text: str | None) -> bool:
    """The reply contains the key fact (or one of the accepted answers)."""
    return any(contains_fact(text or "", fact) for fact in item.facts)


def cited(item: EvalItem, text: str | None) -> bool | None:
    """The reply names the clause the question is about; None when the item has no clause."""
    return cites_clause(text or "", item.clause) if item.clause else None


def perplexity(model_dir: Path, chat_tokenizer: Any, items: list[EvalItem]) -> float | None:
    """exp(mean loss) over the reference replies' tokens (assistant tokens only); None when the
    held-out data has no reference replies."""
    import torch
    from transformers import AutoModelForCausalLM

    if not any(item.answer for item in items):
        return None

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    total, count = 0.0, 0
    for item in items:
        if not item.answer:
            continue
        reply = {"role": "assistant", "content": item.answer}
        example = chat_tokenizer(Conversation(item.id, "openai", (*item.messages, reply)))
        ids = torch.tensor([example.input_ids])
        labels = torch.tensor([example.labels])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            labels[:, 1:].reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        total += loss.item()
        count += int((labels[:, 1:] != -100).sum())
    if not count:
        raise TuneshipError("no reference replies to measure perplexity on")
    return math.exp(total / count)


def quality_gate(
    cfg: ExportConfig,
    ppl_merged: float | None,
    ppl_quantized: float | None,
    recall_merged: float | None,
    recall_quantized: float | None,
    data: str,
) -> dict:
    ratio = None if ppl_merged is None or ppl_quantized is None else ppl_quantized / ppl_merged
    drop = None if recall_merged is None else 100 * (recall_merged - (recall_quantized or 0.0))
    passed = (ratio is None or ratio <= cfg.max_perplexity_ratio) and (
        drop is None or drop <= cfg.max_recall_drop
    )
    return {
        "passed": passed,
        "data": data,
        "perplexity_merged": None if ppl_merged is None else round(ppl_merged, 4),
        "perplexity_quantized": None if ppl_quantized is None else round(ppl_quantized, 4),
        "perplexity_ratio": None if ratio is None else round(ratio, 4),
        "max_perplexity_ratio": cfg.max_perplexity_ratio,
        "recall_merged": None if recall_merged is None else round(recall_merged, 4),
        "recall_quantized": None if recall_quantized is None else round(recall_quantized, 4),
        "recall_drop_points": None if drop is None else round(drop, 2),
        "max_recall_drop_points": cfg.max_recall_drop,
    }
