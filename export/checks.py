"""The export's checks: each proves one way the bundle could misbehave in vLLM does not happen.

- template parity: vLLM's token ids for chat messages equal the ids training used (one BOS,
  identical generation prompt);
- stop tokens: greedy replies through vLLM end with finish_reason "stop";
- quality gate: perplexity (assistant tokens) and fact recall of the quantized model against the
  merged 16-bit model;
- preflight: vLLM loads the bundle with the production arguments and answers; load time and
  peak memory are recorded.

vLLM runs in the serve environment: `tuneship bundle probe` there does the serving (see
tuneship.probes), these functions judge what it returns.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tuneship.chats import Conversation
from tuneship.config import ExportConfig
from tuneship.manifest import Check
from tuneship.probes import EvalItem, ProbeAnswer
from tuneship.template import end_of_turn


def check_stop_tokens(model_dir: Path) -> Check:
    """tokenizer eos, generation_config eos and the template's end-of-turn token must agree."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eot_text, eot_id = end_of_turn(tokenizer)
    gen = json.loads((Path(model_dir) / "generation_config.json").read_text())
    gen_eos = gen.get("eos_token_id")
    gen_ids = gen_eos if isinstance(gen_eos, list) else [gen_eos]
    return Check(
        passed=tokenizer.eos_token_id == eot_id and eot_id in gen_ids,
        end_of_turn=eot_text,
        end_of_turn_id=eot_id,
        tokenizer_eos_id=tokenizer.eos_token_id,
        generation_config_eos_ids=gen_ids,
    )


def template_parity(
    tokenizer: Any, chat_tokenizer: Any, items: list[EvalItem], served: list[list[int]]
) -> Check:
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
    return Check(
        passed=not mismatches and not bos_problems,
        conversations=len(items),
        mismatched=len(mismatches),
        mismatched_ids=mismatches[:10],
        double_bos_ids=bos_problems[:10],
    )


def stop_rate(chats: list[ProbeAnswer], minimum: float, max_tokens: int) -> Check:
    """Share of greedy replies that ended on the end-of-turn token (finish_reason "stop")."""
    stopped = sum(c.finish_reason == "stop" for c in chats)
    rate = stopped / len(chats)
    return Check(
        passed=rate >= minimum,
        rate=round(rate, 3),
        minimum=minimum,
        prompts=len(chats),
        max_tokens=max_tokens,
        not_stopped_ids=[c.id for c in chats if c.finish_reason != "stop"][:10],
    )


def quality_gate(
    cfg: ExportConfig,
    ppl_merged: float | None,
    ppl_quantized: float | None,
    recall_merged: float | None,
    recall_quantized: float | None,
    data: str,
) -> Check:
    ratio = None if ppl_merged is None or ppl_quantized is None else ppl_quantized / ppl_merged
    drop = None if recall_merged is None else 100 * (recall_merged - (recall_quantized or 0.0))
    passed = (ratio is None or ratio <= cfg.max_perplexity_ratio) and (
        drop is None or drop <= cfg.max_recall_drop
    )
    return Check(
        passed=passed,
        data=data,
        perplexity_merged=_rounded(ppl_merged),
        perplexity_quantized=_rounded(ppl_quantized),
        perplexity_ratio=_rounded(ratio),
        max_perplexity_ratio=cfg.max_perplexity_ratio,
        recall_merged=_rounded(recall_merged),
        recall_quantized=_rounded(recall_quantized),
        recall_drop_points=_rounded(drop, 2),
        max_recall_drop_points=cfg.max_recall_drop,
    )


def _rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)
