"""`tuneship export RUN --out BUNDLE`: merge the adapter in 16-bit, then GPTQ W4A16.

Reads: RUN/run.json and RUN/adapter/ (checked against their hashes before any model loads),
the base model and the training data named in run.json.
Writes: BUNDLE/model/ (compressed-tensors checkpoint vLLM loads) and BUNDLE/bundle.json,
atomically: a failed export leaves no bundle behind.

The adapter is always merged into the 16-bit base, never into a quantized one, and GPTQ is
calibrated on a seeded sample of the training conversations rendered with the chat template.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from tuneship.chat.records import Conversation
from tuneship.config.schema import ExportConfig
from tuneship.handoff.bundles import engine_arguments, show, verify
from tuneship.handoff.manifest import (
    BUNDLE_FILE,
    RUN_FILE,
    BundleManifest,
    Check,
    CheckPlan,
    ComputeInfo,
    MergeInfo,
    RunManifest,
    RunRef,
    ServingInfo,
    Sizes,
    header,
    read_run,
    versions,
    write_manifest,
)
from tuneship.handoff.runs import check_run, training_conversations
from tuneship.infra.errors import TuneshipError
from tuneship.infra.fsutil import check_output_free, hash_tree, sha256_file, staged_dir, tree_size
from tuneship.modelops.calibration import recipe_sample
from tuneship.modelops.gptq import quantize
from tuneship.modelops.merging import merge
from tuneship.modelops.precision import compute_precision
from tuneship.quality.probes import (
    EvalItem,
    find_serve_bin,
    items_from_training,
    load_eval_items,
    probe,
    serving_max_len,
)
from tuneship.quality.tool_calls import items_from_tool_training, load_tool_items
from tuneship.quality.verdicts import judge, pending_checks, tool_scores

from .check_plan import ToolPrompts, any_facts, check_plan, greedy_answers, skipped_checks

if TYPE_CHECKING:
    import torch

LIBRARIES = ("torch", "transformers", "peft", "llmcompressor", "compressed-tensors")


@dataclass(frozen=True)
class CheckPrompts:
    """The held-out prompts the checks and the quality gate ask, and where they came from."""

    items: list[EvalItem]
    label: str


def run(run_dir: Path, out_dir: Path, cfg: ExportConfig, force: bool = False) -> Path:
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    manifest = read_run(run_dir)
    remove_stale_partials(out_dir)
    if not force and up_to_date(out_dir, run_dir, cfg):
        print(f"bundle {out_dir} is complete and verified for this run and config; nothing to do")
        return out_dir
    check_output_free(out_dir, force)
    check_run(run_dir, manifest)
    serve_bin = serve_environment(cfg)
    conversations = training_conversations(manifest)
    prompts = check_prompts(cfg, conversations)
    tool_prompts = tool_check_prompts(cfg, conversations, tool_parser(manifest))
    precision, machine = compute_precision(cfg.precision)
    print(f"computing in {precision.name} ({precision.reason}); the bundle is stored in bf16")
    dtype = precision.torch_dtype
    started = time.monotonic()
    with staged_dir(out_dir) as stage:
        merged_dir, model_dir = stage / "merged", stage / "model"
        print(f"merging {run_dir / 'adapter'} into {manifest.base.path} ...")
        tokenizer = merge(manifest.base.path, run_dir / "adapter", merged_dir, dtype)
        merge_s = time.monotonic() - started
        sample = recipe_sample(conversations, tokenizer, cfg)
        print(
            f"GPTQ {cfg.scheme} with llm-compressor on {len(sample)} training chats "
            f"({cfg.calibration_mix} mix) ..."
        )
        quantization = quantize(merged_dir, tokenizer, sample, cfg, model_dir, dtype)
        quantization.seconds = round(time.monotonic() - started - merge_s, 1)
        plan = check_plan(
            cfg, prompts.items, prompts.label, merged_dir, model_dir, dtype, tool_prompts
        )
        results = vllm_checks(cfg, plan, serve_bin, stage, dtype)
        shutil.rmtree(stage / ".probe", ignore_errors=True)
        sizes = Sizes(merged_bytes=tree_size(merged_dir), model_bytes=tree_size(model_dir))
        merged_files = hash_tree(merged_dir)  # provenance, also when merged/ is not kept
        if not cfg.keep_merged:
            shutil.rmtree(merged_dir)
        bundle = BundleManifest(
            **header("tuneship.bundle", out_dir.name),
            served_model_name=cfg.served_name or out_dir.name,
            layout="merged",
            run=RunRef(
                name=manifest.name,
                path=str(run_dir.resolve()),
                run_json_sha256=sha256_file(run_dir / RUN_FILE),
                datasets=manifest.datasets,
                adapter=manifest.adapter,
            ),
            base=manifest.base,
            config=cfg.model_dump(),
            merge=MergeInfo(dtype="bfloat16", into="16-bit base", seconds=round(merge_s, 1)),
            quantization=quantization,
            compute=ComputeInfo(**precision.record(), machine=machine.describe()),
            files=hash_tree(model_dir),
            merged_files=merged_files,
            sizes=sizes,
            checks=results,
            check_plan=plan,
            versions=versions(*LIBRARIES),
            serving=serving_info(
                model_dir, results.get("preflight"), cfg, tool_parser=tool_parser(manifest)
            ),
        )
        write_manifest(stage / BUNDLE_FILE, bundle)
    report(out_dir, sizes, time.monotonic() - started)
    refuse_failed(bundle, out_dir)
    return out_dir


def check_prompts(cfg: ExportConfig, conversations: list[Conversation]) -> CheckPrompts:
    if cfg.eval_data:
        items = load_eval_items(Path(cfg.eval_data))[: cfg.check_samples]
        return CheckPrompts(items, f"{cfg.eval_data} ({len(items)} questions)")
    items = items_from_training(conversations, cfg.check_samples, cfg.seed)
    return CheckPrompts(items, f"{len(items)} sampled training conversations (no eval_data given)")


def tool_check_prompts(
    cfg: ExportConfig, conversations: list[Conversation], parser: str | None
) -> ToolPrompts | None:
    """The tool check's prompts, for a run trained on tool calls (None: it trained none)."""
    if parser is None:
        if cfg.tool_eval_data:
            raise TuneshipError(
                f"tool_eval_data {cfg.tool_eval_data}: this run trained no tool calls (its data "
                "declares no tools), so there is no tool parser to check; remove the setting"
            )
        return None
    if cfg.tool_eval_data:
        items = load_tool_items(Path(cfg.tool_eval_data))[: cfg.check_samples]
        return ToolPrompts(items, f"{cfg.tool_eval_data} ({len(items)} tool prompts)", parser)
    items = items_from_tool_training(conversations, cfg.check_samples, cfg.seed)
    label = f"{len(items)} sampled training conversations with calls (no tool_eval_data given)"
    return ToolPrompts(items, label, parser)


def serve_environment(cfg: ExportConfig) -> Path | None:
    """The serve environment's tuneship when the vLLM checks run now; None for later or off."""
    if cfg.checks in ("later", "off"):
        return None
    if cfg.checks == "now":
        return find_serve_bin(cfg.serve_bin, hint="or set checks=later (or off)")
    try:
        return find_serve_bin(cfg.serve_bin)
    except TuneshipError:
        print(
            "no serve environment here: the vLLM checks are recorded for `tuneship bundle "
            "check`, run where vLLM is (the serve image)",
            flush=True,
        )
        return None


def vllm_checks(
    cfg: ExportConfig, plan: CheckPlan, serve_bin: Path | None, bundle: Path, dtype: torch.dtype
) -> dict[str, Check]:
    """The checks' verdicts: judged now through vLLM, pending for `bundle check`, or skipped.
    Fills in the plan's recall baseline (the merged model's answers)."""
    merged_dir, model_dir, work = bundle / "merged", bundle / "model", bundle / ".probe"
    engine = engine_arguments(cfg.engine())  # what serve runs with by default
    if cfg.checks == "off":
        return skipped_checks(plan, "checks=off: no vLLM run at export")
    if serve_bin is None:
        if any_facts(plan):
            print("recall baseline: the merged model's answers (transformers) ...", flush=True)
            items = [p.item() for p in plan.prompts]
            answers: list[str | None] = list(
                greedy_answers(merged_dir, items, plan.max_tokens, dtype)
            )
            plan.merged_answers = answers
        return pending_checks(plan)
    if any_facts(plan) or plan.tools:
        print("preflight: vLLM on the merged 16-bit model (the baselines) ...", flush=True)
        ask = plan.request(serving_max_len(model_dir), engine)
        ask.tokenize, ask.tool_tokenize = [], []
        merged = probe(serve_bin, merged_dir, work, "merged", ask)
        plan.merged_answers = merged.texts[: len(plan.prompts)]
        if plan.tools:
            scores = tool_scores(plan.tools, merged.chats[len(plan.prompts) :])
            plan.tools.merged_right = [s.right for s in scores]
    print("preflight: vLLM on the quantized bundle with the production arguments ...", flush=True)
    ask = plan.request(serving_max_len(model_dir), engine)
    return judge(plan, probe(serve_bin, model_dir, work, "quantized", ask))


def tool_parser(manifest: RunManifest) -> str | None:
    """The vLLM parser for the tool calls the run trained (None: it trained none)."""
    return manifest.tool_calling.parser if manifest.tool_calling else None


def serving_info(
    model_dir: Path,
    preflight: Check | None,
    cfg: ExportConfig,
    max_lora_rank: int | None = None,
    tool_parser: str | None = None,
) -> ServingInfo:
    """How the bundle is served: its context, architecture, what the preflight measured, the
    tool parser its calls need, and the engine settings it ran with (serve's defaults)."""
    config = json.loads((model_dir / "config.json").read_text())
    figures = preflight.figures() if preflight is not None else {}
    return ServingInfo(
        max_model_len=serving_max_len(model_dir),
        architecture=(config.get("architectures") or ["?"])[0],
        startup_s=figures.get("load_s"),
        peak_rss_bytes=figures.get("peak_rss_bytes"),
        max_lora_rank=max_lora_rank,
        tool_parser=tool_parser,
        **cfg.engine(),
    )


def up_to_date(out_dir: Path, run_dir: Path, cfg: ExportConfig) -> bool:
    """A complete, verified bundle of this run made with this config is already there."""
    if not (out_dir / BUNDLE_FILE).is_file():
        return False
    try:
        bundle = verify(out_dir, require_checked=False)
    except TuneshipError:
        return False
    same_run = bundle.run.run_json_sha256 == sha256_file(run_dir / RUN_FILE)
    return same_run and recorded_config(bundle) == cfg


def recorded_config(bundle: BundleManifest) -> ExportConfig | None:
    """The config a bundle records, with today's defaults for keys added since it was made
    (None when it no longer validates: a key since removed)."""
    try:
        return ExportConfig.model_validate(bundle.config)
    except ValidationError:
        return None


def remove_stale_partials(out_dir: Path) -> None:
    """Folders left by an export that was killed (its process is gone) are removed."""
    for partial in out_dir.parent.glob(f".{out_dir.name}.partial-*"):
        pid = partial.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(partial, ignore_errors=True)


def report(out_dir: Path, sizes: Sizes, seconds: float) -> None:
    merged = sizes.merged_bytes or 0
    share = f" ({sizes.model_bytes / merged:.0%} of the merged 16-bit {merged / 1e6:.0f} MB)"
    print(
        f"bundle written to {out_dir}: model {sizes.model_bytes / 1e6:.0f} MB"
        f"{share if merged else ''}, {seconds:.0f} s"
    )
    print(show(out_dir))


def refuse_failed(bundle: BundleManifest, out_dir: Path) -> None:
    failed = bundle.failed_checks()
    if failed:
        raise TuneshipError(
            f"export checks failed: {', '.join(failed)} (figures in {out_dir / BUNDLE_FILE}); "
            "`tuneship bundle verify` and `tuneship serve` refuse this bundle"
        )
