"""The export's part of the checks (train environment): what can be known without vLLM, and the
CheckPlan that whoever runs vLLM judges (tuneship/quality/verdicts.py).

- stop tokens, statically: tokenizer eos, generation_config eos and the template's end-of-turn
  token agree;
- the plan: each check prompt with the token ids training used for it, and the perplexity of the
  merged and the quantized model on the reference answers (transformers);
- the merged model's greedy answers (the recall baseline) with transformers, for a bundle whose
  vLLM checks run later, in the serve image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneship.chat.labels import ChatTokenizer
from tuneship.chat.records import Conversation
from tuneship.chat.template import end_of_turn
from tuneship.config.schema import ExportConfig
from tuneship.handoff.manifest import Check, CheckPlan, CheckPrompt, ToolCheckPlan, ToolCheckPrompt
from tuneship.quality.probes import EvalItem, perplexity
from tuneship.quality.tool_calls import ToolItem

if TYPE_CHECKING:
    import torch


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


@dataclass(frozen=True)
class ToolPrompts:
    """The tool prompts the tool check asks, where they came from, and the parser to serve."""

    items: list[ToolItem]
    label: str
    parser: str


def check_plan(
    cfg: ExportConfig,
    items: list[EvalItem],
    label: str,
    merged_dir: Path,
    model_dir: Path,
    dtype: torch.dtype,
    tool_prompts: ToolPrompts | None = None,
) -> CheckPlan:
    """The prompts with their training token ids, the perplexity figures and the thresholds."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chat_tokenizer = ChatTokenizer(tokenizer)
    print("quality gate: perplexity of the merged and the quantized model ...", flush=True)
    tools = None
    if tool_prompts is not None:
        tools = ToolCheckPlan(
            data=tool_prompts.label,
            parser=tool_prompts.parser,
            prompts=[
                ToolCheckPrompt.of(item, trained_tool_ids(chat_tokenizer, item))
                for item in tool_prompts.items
            ],
            min_parse_rate=cfg.min_tool_parse_rate,
            min_right_calls=cfg.min_right_calls,
            max_right_calls_drop=cfg.max_right_calls_drop,
        )
    return CheckPlan(
        tools=tools,
        data=label,
        prompts=[
            CheckPrompt(
                id=item.id,
                messages=list(item.messages),
                facts=list(item.facts),
                trained_ids=trained_ids(chat_tokenizer, item),
            )
            for item in items
        ],
        bos_token_id=tokenizer.bos_token_id,
        max_tokens=cfg.check_max_tokens,
        min_stop_rate=cfg.min_stop_rate,
        max_recall_drop=cfg.max_recall_drop,
        max_perplexity_ratio=cfg.max_perplexity_ratio,
        perplexity_merged=perplexity(merged_dir, chat_tokenizer, items, dtype),
        perplexity_quantized=perplexity(model_dir, chat_tokenizer, items, dtype),
        stop_tokens=check_stop_tokens(model_dir),
    )


def trained_ids(chat_tokenizer: ChatTokenizer, item: EvalItem) -> list[int]:
    """The ids training feeds the model for the prompt and a reply (the reference, or "ok")."""
    reply = {"role": "assistant", "content": item.answer or "ok"}
    return chat_tokenizer(Conversation(item.id, "openai", (*item.messages, reply))).input_ids


def trained_tool_ids(chat_tokenizer: ChatTokenizer, item: ToolItem) -> list[int]:
    """The ids training feeds the model for a tool prompt and its right reply."""
    messages = (*item.messages, item.reply())
    return chat_tokenizer(Conversation(item.id, "openai", messages, item.tools)).input_ids


def greedy_answers(
    model_dir: Path, items: list[EvalItem], max_tokens: int, dtype: torch.dtype, batch: int = 16
) -> list[str]:
    """The model's greedy replies with transformers (the recall baseline when vLLM is not here)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    answers: list[str] = []
    for start in range(0, len(items), batch):
        prompts = [
            tokenizer.apply_chat_template(
                list(item.messages), tokenize=False, add_generation_prompt=True
            )
            for item in items[start : start + batch]
        ]
        inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(
                **inputs,
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = out[:, inputs["input_ids"].shape[1] :]
        answers += tokenizer.batch_decode(new, skip_special_tokens=True)
    return answers


def any_facts(plan: CheckPlan) -> bool:
    return any(p.facts for p in plan.prompts)


def skipped_checks(plan: CheckPlan, reason: str) -> dict[str, Any]:
    """checks: off: the static stop-token check and the perplexity part of the gate only."""
    from tuneship.quality.verdicts import quality_gate

    skipped = Check(passed=None, reason=reason)
    return {
        "stop_tokens": plan.stop_tokens.model_copy(update={"generation": f"skipped ({reason})"}),
        "template_parity": skipped,
        "preflight": skipped,
        "quality_gate": quality_gate(plan, None, None),
    } | ({"tool_calls": skipped} if plan.tools else {})
