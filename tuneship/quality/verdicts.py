"""The vLLM checks of a bundle, judged from what vLLM answered.

The export (train environment) records a CheckPlan: the check prompts with the token ids
training used for each, the merged 16-bit model's answers (the recall baseline), the perplexity
figures and the thresholds. Whoever has vLLM then serves the bundle, asks the plan's prompts and
judges the answers with the functions here: the export itself when the serve environment is at
hand, or `tuneship bundle check` in the serve image, which records the verdicts in checks.json.

- template parity: vLLM's token ids for each prompt are a prefix of the ids training used (one
  BOS, the same generation prompt);
- stop tokens: greedy replies through vLLM end with finish_reason "stop";
- quality gate: the quantized model's fact recall against the merged model's, and perplexity;
- preflight: vLLM loads the bundle with the production arguments and answers;
- tool calls (a run trained on them): the bundle, served with its tool parser, answers the tool
  prompts with calls the parser reads, that fit their schemas, naming the expected function with
  the expected arguments, against thresholds and the merged model's share.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from tuneship.handoff.manifest import PENDING, Check, CheckPlan, ToolCheckPlan
from tuneship.quality.probes import ProbeAnswer, ProbeResult, fact_recall
from tuneship.quality.tool_calls import CallScore, counted, parse_rate, score


class Prompt(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def trained_ids(self) -> list[int]: ...


def judge(plan: CheckPlan, served: ProbeResult) -> dict[str, Check]:
    """Every vLLM check's verdict from the quantized bundle's answers to the plan (its plain
    prompts first, then its tool prompts)."""
    items = [p.item() for p in plan.prompts]
    chats, tool_chats = served.chats[: len(items)], served.chats[len(items) :]
    rate = stop_rate(chats, plan.min_stop_rate, plan.max_tokens)
    static = plan.stop_tokens
    recall_merged = None if plan.merged_answers is None else fact_recall(items, plan.merged_answers)
    tool_prompts = plan.tools.prompts if plan.tools else []
    verdicts = {
        "stop_tokens": static.model_copy(
            update={"passed": bool(static.passed and rate.passed), "stop_rate": rate.model_dump()}
        ),
        "template_parity": template_parity(
            [*plan.prompts, *tool_prompts],
            [*served.tokenize, *served.tool_tokenize],
            plan.bos_token_id,
        ),
        "preflight": Check(
            passed=bool(chats and (chats[0].text or "").strip()),
            flavour=served.flavour,
            served_as=served.served_as,
            load_s=served.load_s,
            peak_rss_bytes=served.peak_rss_bytes,
            chat_s=served.chat_s,
            args=served.argv,
        ),
        "quality_gate": quality_gate(
            plan, recall_merged, fact_recall(items, [c.text for c in chats])
        ),
    }
    if plan.tools:
        verdicts["tool_calls"] = tool_check(plan.tools, tool_scores(plan.tools, tool_chats))
    return verdicts


def tool_scores(tools: ToolCheckPlan, chats: list[ProbeAnswer]) -> list[CallScore]:
    return [
        score(p.item(), c.tool_calls, c.text, tools.parser)
        for p, c in zip(tools.prompts, chats, strict=True)
    ]


def tool_check(tools: ToolCheckPlan, scores: list[CallScore] | None) -> Check:
    """The parser reads the calls the model makes, and enough of them are right (and not many
    fewer than the merged model's). scores None: not judged yet."""
    merged = tools.merged_right
    merged_share = _share([r for r in merged if r is not None]) if merged is not None else None
    figures: dict = {
        "data": tools.data,
        "parser": tools.parser,
        "strict_level": tools.strict_level,
        "prompts": len(tools.prompts),
        "min_parse_rate": tools.min_parse_rate,
        "min_right_calls": tools.min_right_calls,
        "max_right_calls_drop_points": tools.max_right_calls_drop,
        "right_calls_merged": _rounded(merged_share),
    }
    if scores is None:
        return Check(passed=None, reason=PENDING, **figures)
    read, attempted = parse_rate(scores)
    right = _share([s.right for s in scores if s.right is not None])
    parse = read / attempted if attempted else None
    drop = None if merged_share is None or right is None else 100 * (merged_share - right)
    pairs = list(zip(tools.prompts, scores, strict=True))
    passed = (
        (parse is None or parse >= tools.min_parse_rate)
        and (right or 0.0) >= tools.min_right_calls
        and (drop is None or drop <= tools.max_right_calls_drop)
    )
    return Check(
        passed=passed,
        **figures,
        parse_rate=_rounded(parse),
        calls_attempted=attempted,
        calls_read=read,
        right_calls=_rounded(right),
        right_calls_drop_points=_rounded(drop, 2),
        **{
            figure: _rounded(_share_of(counted(scores, figure)))
            for figure in ("valid_json", "schema_valid", "right_function", "no_call")
        },
        unread_ids=[p.id for p, s in pairs if s.attempted and not s.parsed][:10],
        wrong_ids=[p.id for p, s in pairs if s.right is False][:10],
    )


def _share(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def _share_of(tally: tuple[int, int]) -> float | None:
    return tally[0] / tally[1] if tally[1] else None


def template_parity(prompts: Sequence[Prompt], served: list[list[int]], bos: int | None) -> Check:
    """Training token ids for each prompt + reply must start with vLLM's prompt ids exactly."""
    mismatches, bos_problems = [], []
    for prompt, served_ids in zip(prompts, served, strict=True):
        trained = prompt.trained_ids
        if trained[: len(served_ids)] != served_ids:
            mismatches.append(prompt.id)
        # BOS twice at the start, on either side (a template that writes it and a tokenizer
        # that adds it); elsewhere the id may be a turn token (ChatML tokenizers call
        # <|im_start|> their BOS) or the eos too (OLMo 2: a reply ends with it)
        if bos is not None and [bos, bos] in (served_ids[:2], trained[:2]):
            bos_problems.append(prompt.id)
    return Check(
        passed=not mismatches and not bos_problems,
        conversations=len(prompts),
        mismatched=len(mismatches),
        mismatched_ids=mismatches[:10],
        double_bos_ids=bos_problems[:10],
    )


def stop_rate(chats: list[ProbeAnswer], minimum: float, max_tokens: int) -> Check:
    """Share of greedy replies that ended on the end-of-turn token (finish_reason "stop")."""
    stopped = sum(c.finish_reason == "stop" for c in chats)
    rate = stopped / len(chats) if chats else 0.0
    return Check(
        passed=rate >= minimum,
        rate=round(rate, 3),
        minimum=minimum,
        prompts=len(chats),
        max_tokens=max_tokens,
        not_stopped_ids=[c.id for c in chats if c.finish_reason != "stop"][:10],
        stopped_ids=[c.id for c in chats if c.finish_reason == "stop"],  # the self-test's
    )


def quality_gate(
    plan: CheckPlan, recall_merged: float | None, recall_quantized: float | None
) -> Check:
    merged, quantized = plan.perplexity_merged, plan.perplexity_quantized
    ratio = None if merged is None or quantized is None else quantized / merged
    drop = None if recall_merged is None else 100 * (recall_merged - (recall_quantized or 0.0))
    passed = (ratio is None or ratio <= plan.max_perplexity_ratio) and (
        drop is None or drop <= plan.max_recall_drop
    )
    return Check(
        passed=passed,
        data=plan.data,
        perplexity_merged=_rounded(merged),
        perplexity_quantized=_rounded(quantized),
        perplexity_ratio=_rounded(ratio),
        max_perplexity_ratio=plan.max_perplexity_ratio,
        recall_merged=_rounded(recall_merged),
        recall_quantized=_rounded(recall_quantized),
        recall_drop_points=_rounded(drop, 2),
        max_recall_drop_points=plan.max_recall_drop,
    )


def _rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def pending_checks(plan: CheckPlan) -> dict[str, Check]:
    """The verdicts a bundle carries until `tuneship bundle check` has run."""
    return {
        "stop_tokens": plan.stop_tokens.model_copy(update={"passed": None, "reason": PENDING}),
        "template_parity": Check(passed=None, reason=PENDING),
        "preflight": Check(passed=None, reason=PENDING),
        "quality_gate": quality_gate(plan, None, None).model_copy(
            update={"passed": None, "reason": PENDING}
        ),
    } | ({"tool_calls": tool_check(plan.tools, None)} if plan.tools else {})
