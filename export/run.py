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
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from tuneship.bundles import show, verify
from tuneship.chat_tokens import ChatTokenizer
from tuneship.chats import Conversation
from tuneship.config import ExportConfig
from tuneship.errors import TuneshipError
from tuneship.fsutil import check_output_free, hash_tree, sha256_file, staged_dir, tree_size
from tuneship.manifest import (
    BUNDLE_FILE,
    RUN_FILE,
    RunManifest,
    header,
    read_run,
    verify_files,
    versions,
    write_manifest,
)
from tuneship.template import align_eos, end_of_turn

from . import checks

LIBRARIES = ("torch", "transformers", "peft", "llmcompressor", "compressed-tensors")
GROUP_SIZES = (128, 64, 32)


def check_run(run_dir: Path, manifest: RunManifest) -> None:
    """Cheap checks before any load: adapter, base weights and data match the run manifest."""
    problems = verify_files(run_dir / "adapter", manifest.adapter)
    base = Path(manifest.base["path"])
    if base.is_dir():
        for rel, digest in manifest.base["weights_sha256"].items():
            if not (base / rel).is_file():
                problems.append(f"base weights {base / rel}: missing")
            elif sha256_file(base / rel) != digest:
                problems.append(f"base weights {base / rel}: differ from the ones trained on")
    for dataset in manifest.datasets:
        path = Path(dataset["path"])
        if not path.is_file():
            problems.append(
                f"{dataset.get('role', 'train')} data {path}: missing (the export samples "
                "the training conversations for GPTQ calibration and checks)"
            )
        elif sha256_file(path) != dataset["sha256"]:
            problems.append(f"{dataset.get('role', 'train')} data {path}: changed since training")
    if problems:
        raise TuneshipError(
            f"run {run_dir} does not match its {RUN_FILE}:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )


def merge(base: str, adapter_dir: Path, out_dir: Path) -> Any:
    """Merge the LoRA adapter into the base loaded in bfloat16; save; return the tokenizer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    align_eos(tokenizer, model.config, model.generation_config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def training_conversations(manifest: RunManifest) -> list[Conversation]:
    """The conversations the run trained on: its data prepared again from its own config
    (limit, de-duplication, eval split and mixing are deterministic)."""
    from tuneship.config import TrainConfig
    from tuneship.train.data import prepare

    return prepare(TrainConfig.model_validate(manifest.config)).train


def calibration_sample(conversations: list[Conversation], cfg: ExportConfig) -> list[Conversation]:
    """The training conversations GPTQ calibrates on: a seeded sample."""
    return random.Random(cfg.seed).sample(
        conversations, min(cfg.calibration_samples, len(conversations))
    )


def pick_group_size(model: Any, requested: int | None) -> int:
    import torch

    widths = {
        module.in_features
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")
    }
    if requested is not None:
        bad = sorted(w for w in widths if w % requested)
        if bad:
            raise TuneshipError(
                f"group_size {requested} does not divide the input width of every layer "
                f"(widths {sorted(widths)}; {bad} are not multiples)"
            )
        return requested
    for size in GROUP_SIZES:
        if all(w % size == 0 for w in widths):
            return size
    raise TuneshipError(f"no group size in {GROUP_SIZES} divides the layer widths {sorted(widths)}")


def linear_names(model: Any) -> list[str]:
    import torch

    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def check_keep_16bit(names: list[str], patterns: list[str]) -> None:
    """Every keep_16bit entry names a linear layer (exactly, or as a 're:' pattern matched
    from the start of the name, as llm-compressor matches it): a typo would otherwise be
    quantized silently."""
    import re

    for pattern in patterns:
        regex = pattern[3:] if pattern.startswith("re:") else None
        try:
            hit = any(re.match(regex, n) for n in names) if regex else pattern in names
        except re.error as err:
            raise TuneshipError(f"keep_16bit: {pattern!r} is not a valid pattern: {err}") from err
        if not hit:
            raise TuneshipError(
                f"keep_16bit: {pattern!r} matches no linear layer of the model "
                f"(e.g. {names[0]!r}; patterns start with 're:')"
            )


def quiet_llmcompressor() -> None:
    """llm-compressor logs lines per layer (loguru), some at its own METRIC level (38, above
    WARNING); keep only warnings and errors unless TUNESHIP_LLMCOMPRESSOR_LOG asks for more
    (e.g. INFO, which shows the METRIC lines too)."""
    from loguru import logger

    level = os.environ.get("TUNESHIP_LLMCOMPRESSOR_LOG", "WARNING")
    logger.remove()
    logger.add(
        sys.stderr,
        level=level,
        filter=lambda record: level != "WARNING" or record["level"].name != "METRIC",
    )


def quantize(
    merged_dir: Path, tokenizer: Any, sample: list[Conversation], cfg: ExportConfig, out_dir: Path
) -> dict[str, Any]:
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    quiet_llmcompressor()

    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.bfloat16)
    check_keep_16bit(linear_names(model), cfg.keep_16bit)
    group_size = pick_group_size(model, cfg.group_size)
    symmetric = cfg.scheme == "W4A16"
    rows = []
    for conv in sample:
        text = tokenizer.apply_chat_template(list(conv.messages), tokenize=False)
        ids = tokenizer(text, add_special_tokens=False).input_ids[: cfg.calibration_max_length]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(
            num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=group_size
        ),
    )
    ignore = ["lm_head", *cfg.keep_16bit]
    recipe = GPTQModifier(
        config_groups={"group_0": scheme}, ignore=ignore, dampening_frac=cfg.dampening_frac
    )
    oneshot(
        model=model,
        dataset=Dataset.from_list(rows),
        recipe=recipe,
        max_seq_length=cfg.calibration_max_length,
        num_calibration_samples=len(rows),
        shuffle_calibration_samples=False,
        log_dir=None,
    )
    model.save_pretrained(out_dir, save_compressed=True)
    tokenizer.save_pretrained(out_dir)
    shutil.copy(merged_dir / "generation_config.json", out_dir / "generation_config.json")
    return {
        "engine": "llmcompressor",
        "algorithm": "GPTQ",
        "format": "compressed-tensors",
        "scheme": cfg.scheme,
        "num_bits": 4,
        "symmetric": symmetric,
        "group_size": group_size,
        "ignore": ignore,
        "dampening_frac": cfg.dampening_frac,
        "calibration": {
            "samples": len(rows),
            "tokens": sum(len(r["input_ids"]) for r in rows),
            "max_length": cfg.calibration_max_length,
            "seed": cfg.seed,
            "ids": [c.id for c in sample],
        },
    }


def serving_max_len(model_dir: Path, cap: int = 4096) -> int:
    """Context length served by default: the model's, capped to keep the KV cache small."""
    config = json.loads((model_dir / "config.json").read_text())
    return min(int(config.get("max_position_embeddings", 2048)), cap)


def check_stop_tokens(model_dir: Path) -> dict[str, Any]:
    """tokenizer eos, generation_config eos and the template's end-of-turn token must agree."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eot_text, eot_id = end_of_turn(tokenizer)
    gen = json.loads((model_dir / "generation_config.json").read_text())
    gen_eos = gen.get("eos_token_id")
    gen_ids = gen_eos if isinstance(gen_eos, list) else [gen_eos]
    return {
        "passed": tokenizer.eos_token_id == eot_id and eot_id in gen_ids,
        "end_of_turn": eot_text,
        "end_of_turn_id": eot_id,
        "tokenizer_eos_id": tokenizer.eos_token_id,
        "generation_config_eos_ids": gen_ids,
    }


def up_to_date(out_dir: Path, run_dir: Path, cfg: ExportConfig) -> bool:
    """A complete, verified bundle of this run made with this config is already there."""
    if not (out_dir / BUNDLE_FILE).is_file():
        return False
    try:
        bundle = verify(out_dir)
    except TuneshipError:
        return False
    same_run = bundle.run.get("run_json_sha256") == sha256_file(run_dir / RUN_FILE)
    return same_run and bundle.config == cfg.model_dump()


def remove_stale_partials(out_dir: Path) -> None:
    """Folders left by an export that was killed (its process is gone) are removed."""
    for partial in out_dir.parent.glob(f".{out_dir.name}.partial-*"):
        pid = partial.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(partial, ignore_errors=True)


def run_checks(
    cfg: ExportConfig,
    serve_bin: Path | None,
    merged_dir: Path,
    model_dir: Path,
    items: list[checks.EvalItem],
    data_label: str,
    work: Path,
) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chat_tokenizer = ChatTokenizer(tokenizer)
    results: dict[str, Any] = {"stop_tokens": check_stop_tokens(model_dir)}
    print("quality gate: perplexity of the merged and the quantized model ...", flush=True)
    ppl_merged = checks.perplexity(merged_dir, chat_tokenizer, items)
    ppl_quantized = checks.perplexity(model_dir, chat_tokenizer, items)
    recall_merged = recall_quantized = None
    skipped = {"passed": None, "reason": "checks=false: no vLLM run at export"}
    if serve_bin is None:
        results |= {"template_parity": skipped, "preflight": skipped}
        results["stop_tokens"]["generation"] = "skipped (checks=false)"
    else:
        chats = [{"id": i.id, "messages": list(i.messages)} for i in items]
        spec = {
            "max_model_len": serving_max_len(model_dir),
            "max_tokens": cfg.check_max_tokens,
            "tokenize": [list(i.messages) for i in items],
            "chats": chats,
        }
        if any(i.facts for i in items):
            print("preflight: vLLM on the merged 16-bit model (recall baseline) ...", flush=True)
            merged = checks.probe(serve_bin, merged_dir, work, "merged", spec | {"tokenize": []})
            recall_merged = checks.fact_recall(items, merged["chats"])
        print(
            "preflight: vLLM on the quantized bundle with the production arguments ...", flush=True
        )
        probe = checks.probe(serve_bin, model_dir, work, "quantized", spec)
        results["template_parity"] = checks.template_parity(
            tokenizer, chat_tokenizer, items, probe["tokenize"]
        )
        rate = checks.stop_rate(probe["chats"], cfg.min_stop_rate, cfg.check_max_tokens)
        results["stop_tokens"] = results["stop_tokens"] | {
            "passed": results["stop_tokens"]["passed"] and rate["passed"],
            "stop_rate": rate,
        }
        recall_quantized = checks.fact_recall(items, probe["chats"])
        answered = all((c["text"] or "").strip() for c in probe["chats"][:1])
        results["preflight"] = {
            "passed": answered,
            "flavour": probe["flavour"],
            "load_s": probe["load_s"],
            "peak_rss_bytes": probe["peak_rss_bytes"],
            "chat_s": probe["chat_s"],
            "args": probe["argv"],
        }
    results["quality_gate"] = checks.quality_gate(
        cfg, ppl_merged, ppl_quantized, recall_merged, recall_quantized, data_label
    )
    return results


def run(run_dir: Path, out_dir: Path, cfg: ExportConfig, force: bool = False) -> Path:
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    manifest = read_run(run_dir)
    remove_stale_partials(out_dir)
    if not force and up_to_date(out_dir, run_dir, cfg):
        print(f"bundle {out_dir} is complete and verified for this run and config; nothing to do")
        return out_dir
    check_output_free(out_dir, force)
    check_run(run_dir, manifest)
    serve_bin = checks.find_serve_bin(cfg.serve_bin) if cfg.checks else None
    conversations = training_conversations(manifest)
    if cfg.eval_data:
        items = checks.load_eval_items(Path(cfg.eval_data))[: cfg.check_samples]
        data_label = f"{cfg.eval_data} ({len(items)} questions)"
    else:
        items = checks.items_from_training(conversations, cfg.check_samples, cfg.seed)
        data_label = f"{len(items)} sampled training conversations (no eval_data given)"
    served_name = cfg.served_name or out_dir.name
    started = time.monotonic()
    with staged_dir(out_dir) as stage:
        merged_dir = stage / "merged"
        print(f"merging {run_dir / 'adapter'} into {manifest.base['path']} (bfloat16) ...")
        tokenizer = merge(manifest.base["path"], run_dir / "adapter", merged_dir)
        merge_s = time.monotonic() - started
        sample = calibration_sample(conversations, cfg)
        print(f"GPTQ {cfg.scheme} with llm-compressor on {len(sample)} training chats ...")
        quantization = quantize(merged_dir, tokenizer, sample, cfg, stage / "model")
        quantize_s = time.monotonic() - started - merge_s
        results = run_checks(
            cfg, serve_bin, merged_dir, stage / "model", items, data_label, stage / ".probe"
        )
        shutil.rmtree(stage / ".probe", ignore_errors=True)
        sizes = {"merged_bytes": tree_size(merged_dir), "model_bytes": tree_size(stage / "model")}
        merged_files = hash_tree(merged_dir)  # provenance, also when merged/ is not kept
        if not cfg.keep_merged:
            shutil.rmtree(merged_dir)
        config = json.loads((stage / "model" / "config.json").read_text())
        bundle = header("tuneship.bundle", out_dir.name) | {
            "served_model_name": served_name,
            "layout": "merged",
            "run": {
                "name": manifest.name,
                "path": str(run_dir.resolve()),
                "run_json_sha256": sha256_file(run_dir / RUN_FILE),
                "datasets": manifest.datasets,
                "adapter": manifest.adapter,
            },
            "base": manifest.base,
            "config": cfg.model_dump(),
            "merge": {"dtype": "bfloat16", "into": "16-bit base", "seconds": round(merge_s, 1)},
            "quantization": quantization | {"seconds": round(quantize_s, 1)},
            "files": hash_tree(stage / "model"),
            "merged_files": merged_files,
            "sizes": sizes,
            "checks": results,
            "versions": versions(*LIBRARIES),
            "serving": {
                "max_model_len": serving_max_len(stage / "model"),
                "architecture": (config.get("architectures") or ["?"])[0],
                "startup_s": results.get("preflight", {}).get("load_s"),
                "peak_rss_bytes": results.get("preflight", {}).get("peak_rss_bytes"),
            },
        }
        write_manifest(stage / BUNDLE_FILE, bundle)
    ratio = sizes["model_bytes"] / sizes["merged_bytes"]
    print(
        f"bundle written to {out_dir}: model {sizes['model_bytes'] / 1e6:.0f} MB "
        f"({ratio:.0%} of the merged 16-bit {sizes['merged_bytes'] / 1e6:.0f} MB), "
        f"{time.monotonic() - started:.0f} s"
    )
    print(show(out_dir))
    failed = [name for name, c in results.items() if c.get("passed") is False]
    if failed:
        raise TuneshipError(
            f"export checks failed: {', '.join(failed)} (figures in {out_dir / BUNDLE_FILE}); "
            "`tuneship bundle verify` and `tuneship serve` refuse this bundle"
        )
    return out_dir
