"""`tuneship eval BUNDLE --out DIR`: base model, fine-tuned (merged 16-bit) and the quantized
bundle, measured the way users meet them.

Each model is served by vLLM with the production arguments (`tuneship bundle probe` in the serve
environment) and asked every held-out and general question through the OpenAI-compatible chat
endpoint, greedy; perplexity on the held-out reference answers (assistant tokens only) is
computed locally with transformers. The merged 16-bit model is rebuilt from the bundle's run
(base + adapter, both checked against their hashes) and removed afterwards.

Writes DIR/report.json, report.md, report.html (self-contained: plots inlined) and the plots as
PNG files, atomically: an evaluation that fails leaves no report behind.
"""

from __future__ import annotations

import math
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tuneship.bundles import verify
from tuneship.chat_tokens import ChatTokenizer
from tuneship.config import EvalConfig, ExportConfig, describe_errors
from tuneship.errors import ConfigError, TuneshipError
from tuneship.export import checks
from tuneship.export.run import (
    calibration_sample,
    check_run,
    merge,
    quantize,
    serving_max_len,
    training_conversations,
)
from tuneship.fsutil import check_output_free, staged_dir, write_json_atomic
from tuneship.manifest import BundleManifest, read_run

from . import report as render
from .report import MODELS, TUNED

KIND = {"merged": "fine-tuned, merged 16-bit", "quantized": "fine-tuned, W4A16 bundle"}
LABELS = {
    "base": "base model",
    "merged": "fine-tuned (merged 16-bit)",
    "quantized": "fine-tuned (W4A16 bundle)",
}


def share(flags: list[bool]) -> float | None:
    return round(sum(flags) / len(flags), 4) if flags else None


def tally(flags: list[bool]) -> list[int]:
    """[how many are true, of how many]: what a share was measured on."""
    return [sum(flags), len(flags)]


def wilson_interval(hits: int, of: int, z: float = 1.96) -> list[float]:
    """The 95% Wilson score interval of a share: on 35 questions one answer moves it 3 points."""
    if of == 0:
        return [0.0, 1.0]
    p, z2 = hits / of, z * z
    centre = (p + z2 / (2 * of)) / (1 + z2 / of)
    half = z * math.sqrt(p * (1 - p) / of + z2 / (4 * of * of)) / (1 + z2 / of)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def served_answers(
    serve_bin: Path,
    model_dir: Path,
    items: list[checks.EvalItem],
    cfg: EvalConfig,
    work: Path,
    name: str,
) -> dict[str, Any]:
    spec = {
        "max_model_len": serving_max_len(model_dir),
        "max_tokens": cfg.max_tokens,
        "concurrency": cfg.concurrency,
        "tokenize": [],
        "chats": [{"id": i.id, "messages": list(i.messages)} for i in items],
    }
    return checks.probe(serve_bin, model_dir, work, name, spec)


def split_by_style(items: list[checks.EvalItem], flags: list[bool]) -> dict[str, list[bool]]:
    """The flags of the items that have a style, grouped by it (styles in sorted order)."""
    groups: dict[str, list[bool]] = {}
    for item, ok in zip(items, flags, strict=True):
        if item.style:
            groups.setdefault(item.style, []).append(ok)
    return dict(sorted(groups.items()))


def model_figures(
    heldout: list[checks.EvalItem],
    general: list[checks.EvalItem],
    probe: dict[str, Any],
    perplexity: float | None,
) -> dict[str, Any]:
    chats = probe["chats"]
    held_chats, general_chats = chats[: len(heldout)], chats[len(heldout) :]
    held_ok = [checks.answered(i, c["text"]) for i, c in zip(heldout, held_chats, strict=True)]
    tokens = [c["completion_tokens"] for c in chats if c.get("completion_tokens") is not None]
    latencies = [c["latency_s"] for c in chats]
    by_style = split_by_style(heldout, held_ok)
    general_ok = [
        checks.answered(i, c["text"]) for i, c in zip(general, general_chats, strict=True)
    ]
    with_clause = [(i, c) for i, c in zip(heldout, held_chats, strict=True) if i.clause]
    cited = [bool(checks.cited(i, c["text"])) for i, c in with_clause]
    cited_by_style = split_by_style([i for i, _ in with_clause], cited)
    return {
        "perplexity": None if perplexity is None else round(perplexity, 4),
        "recall": share(held_ok),
        "recall_by_style": {style: share(flags) for style, flags in by_style.items()},
        "clause_cited": share(cited),
        "clause_cited_by_style": {style: share(f) for style, f in cited_by_style.items()},
        "general_accuracy": share(general_ok),
        "counts": {
            "recall": tally(held_ok),
            "recall_by_style": {style: tally(flags) for style, flags in by_style.items()},
            "clause_cited": tally(cited),
            "clause_cited_by_style": {style: tally(f) for style, f in cited_by_style.items()},
            "general": tally(general_ok),
        },
        "stop_rate": share([c["finish_reason"] == "stop" for c in chats]),
        "mean_answer_tokens": round(statistics.mean(tokens), 1) if tokens else None,
        "latency_mean_s": round(statistics.mean(latencies), 3),
        "latency_p95_s": percentile(latencies, 0.95),
        "output_tokens_per_s": round(sum(tokens) / probe["chat_s"], 1) if tokens else None,
        "load_s": probe["load_s"],
        "peak_rss_bytes": probe["peak_rss_bytes"],
    }


def retained(general: list[checks.EvalItem], base: list[dict], tuned: list[dict]) -> list[bool]:
    """For each general question the base model answers correctly: still answered?"""
    return [
        checks.answered(item, mine["text"])
        for item, theirs, mine in zip(general, base, tuned, strict=True)
        if checks.answered(item, theirs["text"])
    ]


def retention(general: list[checks.EvalItem], base: list[dict], tuned: list[dict]) -> float | None:
    """Of the general questions the base model answers correctly, the share still answered."""
    return share(retained(general, base, tuned))


def base_in_4bit(
    general: list[checks.EvalItem],
    base: list[dict],
    bundle: list[dict],
    base_4bit: list[dict],
) -> dict[str, Any]:
    """The base model quantized with the bundle's recipe: the general knowledge 4-bit weights
    alone cost it, and the bundle's retention measured against it instead of the 16-bit base."""
    answered = [checks.answered(i, c["text"]) for i, c in zip(general, base_4bit, strict=True)]
    kept = retained(general, base, base_4bit)
    bundle_kept = retained(general, base_4bit, bundle)
    return {
        "general_accuracy": share(answered),
        "retention": share(kept),
        "bundle_retention": share(bundle_kept),
        "counts": {
            "general": tally(answered),
            "retention": tally(kept),
            "bundle_retention": tally(bundle_kept),
        },
        "answers": [
            {"id": i.id, "text": c["text"], "ok": ok}
            for i, c, ok in zip(general, base_4bit, answered, strict=True)
        ],
    }


def export_config(bundle: BundleManifest, bundle_dir: Path) -> ExportConfig:
    """The recipe the bundle was exported with, to quantize the base model the same way."""
    try:
        return ExportConfig.model_validate(bundle.config)
    except ValidationError as exc:
        where = f"{bundle_dir / 'bundle.json'} (config)"
        raise ConfigError(
            f"quantized_base: cannot reuse the export config of {bundle_dir}",
            describe_errors(ExportConfig, exc, where),
        ) from None


def judge(figures: dict[str, dict[str, Any]], cfg: EvalConfig) -> list[dict[str, Any]]:
    """The targets, each with the measured value and whether it is met."""
    t = cfg.targets

    def recall(model: str) -> float | None:
        if t.recall_style is None:
            return figures[model]["recall"]
        return figures[model]["recall_by_style"].get(t.recall_style)

    on = f", held-out questions ({t.recall_style})" if t.recall_style else ", held-out questions"
    merged, quantized, base = recall("merged"), recall("quantized"), recall("base")
    drop = None if merged is None or quantized is None else round(100 * (merged - quantized), 1)
    kept = {model: figures[model].get("retention") for model in TUNED}

    def count(model: str, figure: str) -> list[int] | None:
        counts = figures[model].get("counts", {})
        if figure == "recall" and t.recall_style is not None:
            return counts.get("recall_by_style", {}).get(t.recall_style)
        return counts.get(figure)

    rows = [  # name, goal, measured, unit, [hits, of] it was measured on, test
        ("base model fact recall" + on, f"< {t.max_base_recall:.0%}", base, "share",
         count("base", "recall"), lambda v: v < t.max_base_recall),
        ("fine-tuned fact recall" + on, f">= {t.min_recall:.0%}", merged, "share",
         count("merged", "recall"), lambda v: v >= t.min_recall),
        ("quantized recall drop (points)" + on, f"<= {t.max_quantized_drop:g}", drop, "points",
         None, lambda v: v <= t.max_quantized_drop),
    ] + [
        (f"general knowledge retained ({KIND[model]})", f">= {t.min_retention:.0%}",
         kept[model], "share", count(model, "retention"), lambda v: v >= t.min_retention)
        for model in TUNED
    ]  # fmt: skip
    return [
        {
            "target": name,
            "goal": goal,
            "value": value,
            "unit": unit,
            "met": value is not None and bool(test(value)),
        }
        | ({"count": counted, "interval": wilson_interval(*counted)} if counted else {})
        for name, goal, value, unit, counted, test in rows
    ]


def run(bundle_dir: Path, out_dir: Path, cfg: EvalConfig, force: bool = False) -> dict[str, Any]:
    bundle_dir, out_dir = Path(bundle_dir), Path(out_dir)
    started = time.monotonic()
    check_output_free(out_dir, force)
    bundle = verify(bundle_dir)
    if bundle.layout != "merged":
        raise TuneshipError(f"{bundle_dir}: eval compares merged bundles (this one is adapters)")
    run_dir = Path(bundle.run["path"])
    manifest = read_run(run_dir)
    check_run(run_dir, manifest)
    heldout_path = cfg.heldout or manifest.config.get("eval_data")
    if not heldout_path:
        raise TuneshipError(
            "no held-out questions: set heldout (the run had no eval_data to fall back on)"
        )
    heldout = checks.load_eval_items(Path(heldout_path))
    general = checks.load_eval_items(Path(cfg.general)) if cfg.general else []
    if not any(i.facts for i in heldout):
        raise TuneshipError(f"{heldout_path}: no question has a `fact` to check recall against")
    styles = sorted({i.style for i in heldout if i.style})
    if cfg.targets.recall_style and cfg.targets.recall_style not in styles:
        raise TuneshipError(
            f"targets.recall_style {cfg.targets.recall_style!r}: no held-out question in "
            f"{heldout_path} has that style (styles there: {', '.join(styles) or 'none'})"
        )
    export_cfg = export_config(bundle, bundle_dir) if cfg.quantized_base else None
    if cfg.quantized_base and not general:
        raise TuneshipError("quantized_base: set general too (the base in 4-bit is asked those)")
    serve_bin = checks.find_serve_bin(cfg.serve_bin, hint="run eval where both environments are")
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        timings[name] = round(time.monotonic() - since, 1)
        return time.monotonic()

    with staged_dir(out_dir) as stage:
        work = stage / ".work"
        model_dirs = {
            "base": Path(manifest.base["path"]),
            "merged": work / "merged",
            "quantized": bundle_dir / "model",
        }
        t0 = time.monotonic()
        print(f"merging {run_dir / 'adapter'} into the base (bfloat16) ...", flush=True)
        tokenizer = merge(manifest.base["path"], run_dir / "adapter", model_dirs["merged"])
        chat_tokenizer = ChatTokenizer(tokenizer)
        t0 = lap("merge", t0)
        perplexities, probes = {}, {}
        for model in MODELS:
            print(f"{LABELS[model]}: held-out perplexity (transformers) ...", flush=True)
            perplexities[model] = checks.perplexity(model_dirs[model], chat_tokenizer, heldout)
            t0 = lap(f"perplexity {model}", t0)
            print(
                f"{LABELS[model]}: serving with vLLM, asking {len(heldout) + len(general)} "
                "questions through the OpenAI-compatible endpoint ...",
                flush=True,
            )
            probes[model] = served_answers(
                serve_bin, model_dirs[model], heldout + general, cfg, work, model
            )
            t0 = lap(f"serve {model}", t0)

        figures = {m: model_figures(heldout, general, probes[m], perplexities[m]) for m in MODELS}
        base_general = probes["base"]["chats"][len(heldout) :]
        for model in TUNED:
            kept = retained(general, base_general, probes[model]["chats"][len(heldout) :])
            figures[model]["retention"] = share(kept)
            figures[model]["counts"]["retention"] = tally(kept)
        reference = {}
        if export_cfg is not None:
            print(
                "base model in W4A16 (the bundle's recipe): GPTQ, then the general questions "
                "through vLLM ...",
                flush=True,
            )
            sample = calibration_sample(training_conversations(manifest), export_cfg)
            quantize(model_dirs["base"], tokenizer, sample, export_cfg, work / "base-w4a16")
            probe = served_answers(serve_bin, work / "base-w4a16", general, cfg, work, "base-w4a16")
            bundle_general = probes["quantized"]["chats"][len(heldout) :]
            reference["base_w4a16"] = base_in_4bit(
                general, base_general, bundle_general, probe["chats"]
            )
            t0 = lap("base in W4A16", t0)
        answers = [
            {
                "id": item.id,
                "kind": "general" if n >= len(heldout) else item.style or "held-out",
                "question": item.messages[-1]["content"],
                "expected": list(item.facts),
                "clause": item.clause,
            }
            | {
                model: {
                    "text": probes[model]["chats"][n]["text"],
                    "ok": checks.answered(item, probes[model]["chats"][n]["text"]),
                    "cited": checks.cited(item, probes[model]["chats"][n]["text"]),
                    "finish_reason": probes[model]["chats"][n]["finish_reason"],
                }
                for model in MODELS
            }
            for n, item in enumerate(heldout + general)
        ]
        report = {
            "bundle": str(bundle_dir),
            "run": str(run_dir),
            "base": manifest.base.get("ref") or manifest.base["path"],
            "data": {
                "heldout": str(heldout_path),
                "heldout_questions": len(heldout),
                "general": cfg.general,
                "general_questions": len(general),
            },
            "config": cfg.model_dump(),
            "models": {m: {"label": LABELS[m]} | figures[m] for m in MODELS},
            "targets": judge(figures, cfg),
            "reference": reference,
            "answers": answers,
            "seconds": timings,
        }
        report["seconds"]["total"] = round(time.monotonic() - started, 1)
        render.write(report, run_dir, stage)
        write_json_atomic(stage / "report.json", report)
        shutil.rmtree(work)
    print(render.summary(report, out_dir))
    return report
