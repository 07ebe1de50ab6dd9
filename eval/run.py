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

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from tuneship.chat.labels import ChatTokenizer
from tuneship.chat.tool_template import tool_arguments
from tuneship.config.loading import describe_errors
from tuneship.config.schema import DataMix, EvalConfig, ExportConfig
from tuneship.handoff.bundles import verify
from tuneship.handoff.eval_report import (
    MODELS,
    TUNED,
    AnswerRow,
    BaseIn4Bit,
    EvalReport,
    ModelAnswer,
    ModelFigures,
    ReportData,
)
from tuneship.handoff.manifest import BundleManifest, ComputeInfo, RunManifest, header, read_run
from tuneship.handoff.runs import check_run, training_conversations
from tuneship.infra.errors import ConfigError, TuneshipError
from tuneship.infra.fsutil import check_output_free, staged_dir
from tuneship.modelops.calibration import recipe_sample
from tuneship.modelops.gptq import quantize
from tuneship.modelops.merging import merge
from tuneship.modelops.precision import compute_precision
from tuneship.quality.probes import (
    EvalItem,
    ProbeAnswer,
    ProbeChat,
    ProbeRequest,
    ProbeResult,
    answered,
    cited,
    find_serve_bin,
    load_eval_items,
    perplexity,
    probe,
)
from tuneship.quality.tool_calls import ToolItem, load_tool_items

from . import render
from .figures import (
    base_in_4bit,
    judge,
    model_figures,
    retained,
    share,
    tally,
    tool_answer_rows,
    tool_figures,
)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

LABELS = {
    "base": "base model",
    "merged": "fine-tuned (merged 16-bit)",
    "quantized": "fine-tuned (W4A16 bundle)",
}


@dataclass
class Questions:
    heldout: list[EvalItem]
    general: list[EvalItem]
    heldout_path: str
    tools: list[ToolItem] = field(default_factory=list)
    tool_parser: str | None = None  # the parser the bundle's calls are read with

    @property
    def all(self) -> list[EvalItem]:
        return self.heldout + self.general


@dataclass
class Timings:
    """Seconds per step of the evaluation, for the report."""

    seconds: dict[str, float] = field(default_factory=dict)
    _since: float = field(default_factory=time.monotonic)

    def lap(self, name: str) -> None:
        self.seconds[name] = round(time.monotonic() - self._since, 1)
        self._since = time.monotonic()


@dataclass
class Session:
    """One evaluation: its settings, questions, the serve environment, a work folder and the
    precision it computes in."""

    cfg: EvalConfig
    questions: Questions
    serve_bin: Path
    work: Path
    timings: Timings
    dtype: torch.dtype


def run(bundle_dir: Path, out_dir: Path, cfg: EvalConfig, force: bool = False) -> EvalReport:
    bundle_dir, out_dir = Path(bundle_dir), Path(out_dir)
    started = time.monotonic()
    check_output_free(out_dir, force)
    bundle = verify(bundle_dir, require_checked=False)  # eval serves it itself
    if bundle.layout != "merged":
        raise TuneshipError(f"{bundle_dir}: eval compares merged bundles (this one is adapters)")
    run_dir = Path(bundle.run.path)
    manifest = read_run(run_dir)
    check_run(run_dir, manifest)
    questions = load_questions(cfg, manifest)
    export_cfg = export_config(bundle, bundle_dir) if cfg.quantized_base else None
    serve_bin = find_serve_bin(cfg.serve_bin, hint="run eval where both environments are")
    precision, machine = compute_precision(cfg.precision)
    print(f"computing in {precision.name} ({precision.reason})", flush=True)
    with staged_dir(out_dir) as stage:
        session = Session(
            cfg, questions, serve_bin, stage / ".work", Timings(), precision.torch_dtype
        )
        model_dirs = {
            "base": Path(manifest.base.path),
            "merged": session.work / "merged",
            "quantized": bundle_dir / "model",
        }
        print(f"merging {run_dir / 'adapter'} into the base ...", flush=True)
        tokenizer = merge(
            manifest.base.path, run_dir / "adapter", model_dirs["merged"], session.dtype
        )
        session.timings.lap("merge")
        probes, perplexities, tool_answers = {}, {}, {}
        template = chat_template_file(model_dirs["merged"]) if questions.tools else None
        for model in MODELS:
            perplexities[model], probes[model], tool_answers[model] = ask(
                session, model, model_dirs[model], tokenizer, template
            )
        figures = {
            m: model_figures(
                questions.heldout, questions.general, probes[m], perplexities[m], LABELS[m]
            )
            for m in MODELS
        }
        if questions.tool_parser:
            for m in MODELS:
                figures[m].tools = tool_figures(
                    questions.tools, tool_answers[m], questions.tool_parser
                )
        add_retention(figures, questions, probes)
        reference = {}
        if export_cfg is not None:
            reference["base_w4a16"] = base_through_the_recipe(
                session, manifest, export_cfg, tokenizer, probes
            )
            session.timings.lap("base in W4A16")
        report = EvalReport(
            **header("tuneship.report", out_dir.name),
            bundle=str(bundle_dir),
            run=str(run_dir),
            base=manifest.base.ref or manifest.base.path,
            data=ReportData(
                heldout=questions.heldout_path,
                heldout_questions=len(questions.heldout),
                general=cfg.general,
                general_questions=len(questions.general),
                tools=cfg.tools,
                tool_prompts=len(questions.tools),
                tool_parser=questions.tool_parser,
            ),
            config=cfg.model_dump(),
            compute=ComputeInfo(**precision.record(), machine=machine.describe()),
            served={m: probes[m].served_as for m in MODELS if probes[m].served_as},
            models=figures,
            targets=judge(
                figures, cfg, reference.get("base_w4a16"), manifest.base.quantized_origin
            ),
            reference=reference,
            answers=answer_rows(questions, probes),
            tool_answers=tool_answer_rows(questions.tools, tool_answers, questions.tool_parser)
            if questions.tool_parser
            else [],
            seconds=session.timings.seconds | {"total": round(time.monotonic() - started, 1)},
        )
        render.write(report, manifest, stage)
        shutil.rmtree(session.work)
    print(render.summary(report, out_dir))
    return report


def load_questions(cfg: EvalConfig, manifest: RunManifest) -> Questions:
    """The held-out and general questions, refused before any model loads if unusable."""
    heldout_path = cfg.heldout or DataMix.from_stored(manifest.config).eval_data
    if not heldout_path:
        raise TuneshipError(
            "no held-out questions: set heldout (the run had no eval_data to fall back on)"
        )
    heldout = load_eval_items(Path(heldout_path))
    general = load_eval_items(Path(cfg.general)) if cfg.general else []
    if not any(i.facts for i in heldout):
        raise TuneshipError(f"{heldout_path}: no question has a `fact` to check recall against")
    styles = sorted({i.style for i in heldout if i.style})
    if cfg.targets.recall_style and cfg.targets.recall_style not in styles:
        raise TuneshipError(
            f"targets.recall_style {cfg.targets.recall_style!r}: no held-out question in "
            f"{heldout_path} has that style (styles there: {', '.join(styles) or 'none'})"
        )
    if cfg.quantized_base and not general:
        raise TuneshipError("quantized_base: set general too (the base in 4-bit is asked those)")
    if cfg.targets.bundle_retention_against == "quantized_base" and not cfg.quantized_base:
        raise TuneshipError(
            "targets.bundle_retention_against: quantized_base needs quantized_base: true (the "
            "base through the bundle's recipe is what the bundle is judged against)"
        )
    parser = manifest.tool_calling.parser if manifest.tool_calling else None
    if cfg.tools and parser is None:
        raise TuneshipError(
            f"tools {cfg.tools}: the bundle's run trained no tool calls (its data declares no "
            "tools), so it has no tool parser to serve them with; remove the setting"
        )
    tools = load_tool_items(Path(cfg.tools)) if cfg.tools else []
    return Questions(heldout, general, str(heldout_path), tools, parser if tools else None)


def chat_template_file(merged_dir: Path) -> Path:
    """The run's chat template (the tool template included), which the base is served with too
    so that all three models see the same tool prompts."""
    path = merged_dir / "chat_template.jinja"
    if not path.is_file():
        raise TuneshipError(f"{merged_dir}: the merged tokenizer wrote no chat_template.jinja")
    return path


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


def ask(
    session: Session,
    model: str,
    model_dir: Path,
    tokenizer: PreTrainedTokenizerBase,
    template: Path | None,
) -> tuple[float | None, ProbeResult, list[ProbeAnswer]]:
    """One model's held-out perplexity (transformers), its answers to every question and its
    replies to the tool prompts (vLLM, with the run's tool parser and template)."""
    questions = session.questions
    print(f"{LABELS[model]}: held-out perplexity (transformers) ...", flush=True)
    ppl = perplexity(model_dir, ChatTokenizer(tokenizer), questions.heldout, session.dtype)
    session.timings.lap(f"perplexity {model}")
    tools = f" and {len(questions.tools)} tool prompts" if questions.tools else ""
    print(
        f"{LABELS[model]}: serving with vLLM, asking {len(questions.all)} questions{tools} "
        "through the OpenAI-compatible endpoint ...",
        flush=True,
    )
    extra = [*tool_arguments(questions.tool_parser, session.cfg.tool_strict_level)]
    if template is not None and model == "base":
        extra += ["--chat-template", str(template)]
    answers = served_answers(session, model_dir, questions.all, model, questions.tools, extra)
    session.timings.lap(f"serve {model}")
    plain = len(questions.all)
    tool_answers = answers.chats[plain:]
    return ppl, answers.model_copy(update={"chats": answers.chats[:plain]}), tool_answers


def served_answers(
    session: Session,
    model_dir: Path,
    items: list[EvalItem],
    name: str,
    tools: list[ToolItem] | None = None,
    extra_args: list[str] | None = None,
) -> ProbeResult:
    """The items' answers, then the tool prompts' replies."""
    cfg = session.cfg
    request = ProbeRequest.asking(
        items, model_dir, cfg.max_tokens, concurrency=cfg.concurrency, extra_args=extra_args or []
    )
    request.chats += [
        ProbeChat(id=t.id, messages=t.wire_messages(), tools=list(t.tools)) for t in tools or []
    ]
    return probe(session.serve_bin, model_dir, session.work, name, request)


def base_through_the_recipe(
    session: Session,
    manifest: RunManifest,
    export_cfg: ExportConfig,
    tokenizer: PreTrainedTokenizerBase,
    probes: dict[str, ProbeResult],
) -> BaseIn4Bit:
    """The base model quantized with the bundle's own recipe and asked the general questions
    (its scales tuned too only with quantized_base_scale_tuning)."""
    if not session.cfg.quantized_base_scale_tuning:
        export_cfg = export_cfg.model_copy(update={"scale_tuning_epochs": 0})
    tuned = ", its scales tuned toward the 16-bit base" if export_cfg.scale_tuning_epochs else ""
    print(
        f"base model in W4A16 (the bundle's recipe): GPTQ{tuned}, then the general questions "
        "through vLLM ...",
        flush=True,
    )
    quantized = session.work / "base-w4a16"
    sample = recipe_sample(training_conversations(manifest), tokenizer, export_cfg)
    quantize(Path(manifest.base.path), tokenizer, sample, export_cfg, quantized, session.dtype)
    general = session.questions.general
    answers = served_answers(session, quantized, general, "base-w4a16")
    n = len(session.questions.heldout)
    return base_in_4bit(
        general,
        probes["base"].chats[n:],
        probes["quantized"].chats[n:],
        answers.chats,
        scales_tuned=export_cfg.scale_tuning_epochs > 0,
    )


def add_retention(
    figures: dict[str, ModelFigures], questions: Questions, probes: dict[str, ProbeResult]
) -> None:
    n = len(questions.heldout)
    for model in TUNED:
        kept = retained(questions.general, probes["base"].chats[n:], probes[model].chats[n:])
        figures[model].retention = share(kept)
        figures[model].counts.retention = tally(kept)


def answer_rows(questions: Questions, probes: dict[str, ProbeResult]) -> list[AnswerRow]:
    rows = []
    for n, item in enumerate(questions.all):
        replies = {model: probes[model].chats[n] for model in MODELS}
        rows.append(
            AnswerRow(
                id=item.id,
                kind="general" if n >= len(questions.heldout) else item.style or "held-out",
                question=item.messages[-1]["content"],
                expected=list(item.facts),
                clause=item.clause,
                **{
                    model: ModelAnswer(
                        text=reply.text,
                        ok=answered(item, reply.text),
                        cited=cited(item, reply.text),
                        finish_reason=reply.finish_reason,
                    )
                    for model, reply in replies.items()
                },
            )
        )
    return rows
