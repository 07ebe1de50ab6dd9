"""The evaluation's figures: shares with what they were measured on, recall and clause citation
per question style, retention of general knowledge, and the targets judged against them."""

from __future__ import annotations

import json
import math
import statistics

from tuneship.config.schema import EvalConfig
from tuneship.handoff.eval_report import (
    BaseIn4Bit,
    Counts,
    Figure,
    ModelFigures,
    ReferenceAnswer,
    Tally,
    Target,
    ToolAnswerRow,
    ToolReply,
)
from tuneship.quality.probes import EvalItem, ProbeAnswer, ProbeResult, answered, cited
from tuneship.quality.tool_calls import ToolItem, counted, parse_rate, score

# The tool-call figures, in the order the report shows them: (key, what it is).
TOOL_FIGURES = {
    "right_calls": "right function with the exact arguments",
    "right_function": "right function",
    "exact_arguments": "exact arguments",
    "parse_rate": "calls the tool parser read",
    "valid_json": "arguments valid JSON",
    "schema_valid": "arguments fit the schema",
    "no_call": "no call where none is needed",
    "answer_after_result": "final answer after a tool result",
}

KIND = {"merged": "fine-tuned, merged 16-bit", "quantized": "fine-tuned, W4A16 bundle"}


def share(flags: list[bool]) -> float | None:
    return round(sum(flags) / len(flags), 4) if flags else None


def tally(flags: list[bool]) -> Tally:
    """(how many are true, of how many): what a share was measured on."""
    return (sum(flags), len(flags))


def wilson_interval(hits: int, of: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a share: on 35 questions one answer moves it 3 points."""
    if of == 0:
        return (0.0, 1.0)
    p, z2 = hits / of, z * z
    centre = (p + z2 / (2 * of)) / (1 + z2 / of)
    half = z * math.sqrt(p * (1 - p) / of + z2 / (4 * of * of)) / (1 + z2 / of)
    return (round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4))


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def split_by_style(items: list[EvalItem], flags: list[bool]) -> dict[str, list[bool]]:
    """The flags of the items that have a style, grouped by it (styles in sorted order)."""
    groups: dict[str, list[bool]] = {}
    for item, ok in zip(items, flags, strict=True):
        if item.style:
            groups.setdefault(item.style, []).append(ok)
    return dict(sorted(groups.items()))


def model_figures(
    heldout: list[EvalItem],
    general: list[EvalItem],
    result: ProbeResult,
    ppl: float | None,
    label: str | None = None,
) -> ModelFigures:
    chats = result.chats
    held_chats, general_chats = chats[: len(heldout)], chats[len(heldout) :]
    held_ok = [answered(i, c.text) for i, c in zip(heldout, held_chats, strict=True)]
    general_ok = [answered(i, c.text) for i, c in zip(general, general_chats, strict=True)]
    tokens = [c.completion_tokens for c in chats if c.completion_tokens is not None]
    latencies = [c.latency_s for c in chats]
    by_style = split_by_style(heldout, held_ok)
    with_clause = [(i, c) for i, c in zip(heldout, held_chats, strict=True) if i.clause]
    clause_ok = [bool(cited(i, c.text)) for i, c in with_clause]
    clause_by_style = split_by_style([i for i, _ in with_clause], clause_ok)
    return ModelFigures(
        label=label or "",
        perplexity=None if ppl is None else round(ppl, 4),
        recall=share(held_ok),
        recall_by_style={style: share(flags) for style, flags in by_style.items()},
        clause_cited=share(clause_ok),
        clause_cited_by_style={style: share(f) for style, f in clause_by_style.items()},
        general_accuracy=share(general_ok),
        counts=Counts(
            recall=tally(held_ok),
            recall_by_style={style: tally(flags) for style, flags in by_style.items()},
            clause_cited=tally(clause_ok),
            clause_cited_by_style={style: tally(f) for style, f in clause_by_style.items()},
            general=tally(general_ok),
        ),
        stop_rate=share([c.finish_reason == "stop" for c in chats]),
        mean_answer_tokens=round(statistics.mean(tokens), 1) if tokens else None,
        latency_mean_s=round(statistics.mean(latencies), 3),
        latency_p95_s=percentile(latencies, 0.95),
        output_tokens_per_s=round(sum(tokens) / result.chat_s, 1) if tokens else None,
        load_s=result.load_s,
        peak_rss_bytes=result.peak_rss_bytes,
    )


def tool_figures(items: list[ToolItem], chats: list[ProbeAnswer], parser: str) -> dict[str, Figure]:
    """Each tool-call figure with what it was measured on and its 95% interval."""
    scores = [score(i, c.tool_calls, c.text, parser) for i, c in zip(items, chats, strict=True)]
    after = [s for s in scores if s.kind == "answer after result"]
    tallies = {
        "right_calls": counted(scores, "right"),
        "right_function": counted(scores, "right_function"),
        "exact_arguments": counted(scores, "exact_arguments"),
        "parse_rate": parse_rate(scores),
        "valid_json": counted(scores, "valid_json"),
        "schema_valid": counted(scores, "schema_valid"),
        "no_call": counted([s for s in scores if s.kind == "no call"], "no_call"),
        "answer_after_result": counted(after, "fact_said"),
    }
    return {
        key: Figure(
            value=round(hits / of, 4) if of else None,
            count=(hits, of),
            interval=wilson_interval(hits, of) if of else None,
        )
        for key, (hits, of) in tallies.items()
    }


def tool_answer_rows(
    items: list[ToolItem], replies: dict[str, list[ProbeAnswer]], parser: str
) -> list[ToolAnswerRow]:
    """Each tool prompt with what each model replied and whether that was right."""
    rows = []
    for n, item in enumerate(items):
        per_model = {}
        for model, chats in replies.items():
            reply = chats[n]
            scored = score(item, reply.tool_calls, reply.text, parser)
            ok = (
                scored.right
                if item.call is not None
                else bool(scored.no_call) and (scored.fact_said is not False)
            )
            per_model[model] = ToolReply(
                calls=reply.tool_calls, text=reply.text, right=scored.right, ok=bool(ok)
            )
        if item.call is not None:
            expected = f"{item.call['name']}({json.dumps(item.call['arguments'])})"
        else:
            expected = f"no call; says {item.fact}" if item.fact else "no call"
        user = [m for m in item.messages if m["role"] == "user"][-1]["content"]
        rows.append(
            ToolAnswerRow(id=item.id, kind=item.kind, prompt=user, expected=expected, **per_model)
        )
    return rows


def tool_rows(figures: dict[str, ModelFigures], cfg: EvalConfig) -> list[tuple]:
    """The tool-call targets (none when the evaluation asked no tool prompts)."""
    t = cfg.targets
    if not figures["merged"].tools:
        return []
    right = {m: figures[m].tools["right_calls"] for m in figures}
    merged, quantized = right["merged"].value, right["quantized"].value
    drop = None if merged is None or quantized is None else round(100 * (merged - quantized), 1)
    return [
        ("base model right calls, held-out tool prompts", f"< {t.max_base_right_calls:.0%}",
         right["base"].value, "share", right["base"].count,
         lambda v: v < t.max_base_right_calls, None),
        ("fine-tuned right calls, held-out tool prompts", f">= {t.min_right_calls:.0%}",
         merged, "share", right["merged"].count, lambda v: v >= t.min_right_calls, None),
        ("quantized right-calls drop (points), held-out tool prompts",
         f"<= {t.max_right_calls_drop:g}", drop, "points", None,
         lambda v: v <= t.max_right_calls_drop, None),
    ]  # fmt: skip


def retained(
    general: list[EvalItem], base: list[ProbeAnswer], tuned: list[ProbeAnswer]
) -> list[bool]:
    """For each general question the base model answers correctly: still answered?"""
    return [
        answered(item, mine.text)
        for item, theirs, mine in zip(general, base, tuned, strict=True)
        if answered(item, theirs.text)
    ]


def retention(
    general: list[EvalItem], base: list[ProbeAnswer], tuned: list[ProbeAnswer]
) -> float | None:
    """Of the general questions the base model answers correctly, the share still answered."""
    return share(retained(general, base, tuned))


def base_in_4bit(
    general: list[EvalItem],
    base: list[ProbeAnswer],
    bundle: list[ProbeAnswer],
    base_4bit: list[ProbeAnswer],
    scales_tuned: bool = False,
) -> BaseIn4Bit:
    """The base model quantized with the bundle's recipe: the general knowledge 4-bit weights
    alone cost it, and the bundle's retention measured against it instead of the 16-bit base."""
    ok = [answered(i, c.text) for i, c in zip(general, base_4bit, strict=True)]
    kept = retained(general, base, base_4bit)
    bundle_kept = retained(general, base_4bit, bundle)
    return BaseIn4Bit(
        scales_tuned=scales_tuned,
        general_accuracy=share(ok),
        retention=share(kept),
        bundle_retention=share(bundle_kept),
        counts={
            "general": tally(ok),
            "retention": tally(kept),
            "bundle_retention": tally(bundle_kept),
        },
        answers=[
            ReferenceAnswer(id=i.id, text=c.text, ok=flag)
            for i, c, flag in zip(general, base_4bit, ok, strict=True)
        ],
    )


def bundle_rule(cfg: EvalConfig, origin: str | None, base_4bit: BaseIn4Bit | None) -> str:
    """What the bundle's retention is judged against: "base" or "quantized_base"."""
    wanted = cfg.targets.bundle_retention_against
    if wanted == "auto":
        return "quantized_base" if origin and base_4bit is not None else "base"
    return wanted


def judge(
    figures: dict[str, ModelFigures],
    cfg: EvalConfig,
    base_4bit: BaseIn4Bit | None = None,
    origin: str | None = None,
) -> list[Target]:
    """The targets, each with the measured value, whether it is met and, for retention, the
    rule that set it. origin: what the base was dequantized from (run.json), if anything."""
    t = cfg.targets

    def recall(model: str) -> float | None:
        if t.recall_style is None:
            return figures[model].recall
        return figures[model].recall_by_style.get(t.recall_style)

    def count(model: str, figure: str) -> Tally | None:
        counts = figures[model].counts
        if figure == "recall" and t.recall_style is not None:
            return counts.recall_by_style.get(t.recall_style)
        return getattr(counts, figure)

    on = f", held-out questions ({t.recall_style})" if t.recall_style else ", held-out questions"
    merged, quantized, base = recall("merged"), recall("quantized"), recall("base")
    drop = None if merged is None or quantized is None else round(100 * (merged - quantized), 1)
    rows = [  # name, goal, measured, unit, (hits, of) it was measured on, test, rule
        ("base model fact recall" + on, f"< {t.max_base_recall:.0%}", base, "share",
         count("base", "recall"), lambda v: v < t.max_base_recall, None),
        ("fine-tuned fact recall" + on, f">= {t.min_recall:.0%}", merged, "share",
         count("merged", "recall"), lambda v: v >= t.min_recall, None),
        ("quantized recall drop (points)" + on, f"<= {t.max_quantized_drop:g}", drop, "points",
         None, lambda v: v <= t.max_quantized_drop, None),
        (f"general knowledge retained ({KIND['merged']})", f">= {t.min_retention:.0%}",
         figures["merged"].retention, "share", count("merged", "retention"),
         lambda v: v >= t.min_retention,
         "against the 16-bit base: forgetting, with no quantization in the way"),
        bundle_retention_row(figures, cfg, base_4bit, origin),
        *tool_rows(figures, cfg),
    ]  # fmt: skip
    return [
        Target(
            target=name,
            goal=goal,
            value=value,
            unit=unit,
            met=value is not None and bool(test(value)),
            count=counted,
            interval=wilson_interval(*counted) if counted else None,
            rule=rule,
        )
        for name, goal, value, unit, counted, test, rule in rows
    ]


def bundle_retention_row(
    figures: dict[str, ModelFigures],
    cfg: EvalConfig,
    base_4bit: BaseIn4Bit | None,
    origin: str | None,
) -> tuple:
    """The bundle's retention target, by the rule that applies (see bundle_rule)."""
    t = cfg.targets
    name = f"general knowledge retained ({KIND['quantized']})"
    if bundle_rule(cfg, origin, base_4bit) == "quantized_base" and base_4bit is not None:
        cost = base_4bit.retention
        rule = (
            f"against the base in W4A16: the base's weights were dequantized from {origin}, "
            "and 4-bit weights alone cost it "
            f"{'n/a' if cost is None else f'{1 - cost:.0%}'} of its general answers, so the "
            "bundle may cost no more than that (targets.bundle_retention_against)"
            if origin
            else "against the base in W4A16 (targets.bundle_retention_against)"
        )
        return (
            f"{name}, against the base in W4A16", f">= {t.min_retention_quantized_base:.0%}",
            base_4bit.bundle_retention, "share", base_4bit.counts.get("bundle_retention"),
            lambda v: v >= t.min_retention_quantized_base, rule,
        )  # fmt: skip
    rule = "against the 16-bit base: a base that was never quantized keeps its answers in 4-bit"
    if origin and base_4bit is None:
        rule += f" (the base came from {origin}; quantized_base: true judges it against that)"
    return (
        name, f">= {t.min_retention:.0%}", figures["quantized"].retention, "share",
        figures["quantized"].counts.retention, lambda v: v >= t.min_retention, rule,
    )  # fmt: skip
