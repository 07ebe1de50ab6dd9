"""`tuneship export RUN [RUN ...] --out BUNDLE --adapters-only`: serve LoRA adapters unmerged.

The bundle holds the 16-bit base (model/) and one or more LoRA adapters (adapters/NAME/), served
through vLLM's multi-LoRA (`--enable-lora`), each adapter under its run's name. An adapter lint
rejects, with the reason, what vLLM cannot load, before anything is copied.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from tuneship.config.schema import ExportConfig
from tuneship.handoff.bundles import engine_arguments, lora_arguments, show
from tuneship.handoff.manifest import (
    BUNDLE_FILE,
    RUN_FILE,
    AdapterEntry,
    BundleManifest,
    Check,
    MergeInfo,
    QuantizationInfo,
    RunManifest,
    RunRef,
    Sizes,
    header,
    read_run,
    versions,
    write_manifest,
)
from tuneship.handoff.runs import check_run
from tuneship.infra.errors import ProblemsError, TuneshipError
from tuneship.infra.fsutil import check_output_free, hash_tree, sha256_file, staged_dir, tree_size
from tuneship.quality.probes import (
    EvalItem,
    ProbeChat,
    ProbeRequest,
    fact_recall,
    load_eval_items,
    probe,
    serving_max_len,
)
from tuneship.quality.verdicts import stop_rate

from .check_plan import check_stop_tokens
from .run import LIBRARIES, refuse_failed, serve_environment, serving_info, tool_parser

EMBEDDING_MODULES = {"lm_head", "embed_tokens", "wte", "wpe", "embed_in", "embed_out"}
BASE_FILES = ("config.json", "generation_config.json")


def base_module_names(base: Path) -> set[str]:
    """Leaf module names of the base checkpoint, read from safetensors headers (no load)."""
    from safetensors import safe_open

    names = set()
    for weights in base.glob("*.safetensors"):
        with safe_open(weights, "pt") as fh:
            names |= {key.rsplit(".", 2)[-2] for key in fh.keys() if key.count(".") >= 2}  # noqa: SIM118
    return names


def lint_adapter(name: str, adapter_dir: Path, modules: set[str], max_rank: int) -> list[str]:
    """Reasons vLLM would reject this adapter (empty when it can serve it)."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    problems = []
    if cfg.get("peft_type") != "LORA":
        problems.append(f"peft_type {cfg.get('peft_type')}: vLLM serves LoRA adapters only")
    if cfg.get("modules_to_save"):
        problems.append(
            f"modules_to_save {cfg['modules_to_save']}: full module copies cannot be hot-loaded"
        )
    targets = cfg.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    if embedded := sorted(set(targets) & EMBEDDING_MODULES):
        problems.append(f"target_modules {embedded}: embedding and lm_head adapters are rejected")
    if missing := sorted(set(targets) - modules - EMBEDDING_MODULES):
        problems.append(f"target_modules {missing} do not exist in the base architecture")
    if int(cfg.get("r", 0)) > max_rank:
        problems.append(f"rank {cfg['r']} is above max_lora_rank {max_rank}")
    if cfg.get("use_dora"):
        problems.append("DoRA adapters are not supported by vLLM")
    if cfg.get("trainable_token_indices"):
        problems.append("trainable_token_indices (new token embeddings) are not supported")
    return [f"adapter '{name}' ({adapter_dir}): {p}" for p in problems]


def run(run_dirs: list[Path], out_dir: Path, cfg: ExportConfig, force: bool = False) -> Path:
    run_dirs, out_dir = [Path(r) for r in run_dirs], Path(out_dir)
    manifests = [read_run(r) for r in run_dirs]
    check_output_free(out_dir, force)
    base = lint_runs(run_dirs, manifests, cfg)
    served_name = base_served_name(cfg, out_dir, [m.name for m in manifests])
    serve_bin = serve_environment(cfg)
    items = load_eval_items(Path(cfg.eval_data))[: cfg.check_samples] if cfg.eval_data else []
    started = time.monotonic()
    with staged_dir(out_dir) as stage:
        model_dir = copy_base(base, run_dirs[0], stage / "model")
        adapters = copy_adapters(run_dirs, manifests, stage / "adapters")
        ranks = {name: adapter.rank for name, adapter in adapters.items()}
        results = {"stop_tokens": check_stop_tokens(model_dir)}
        if serve_bin is not None:
            lora_args = lora_arguments(stage, ranks)
            results |= preflight_adapters(
                cfg, serve_bin, model_dir, stage, served_name, list(adapters), items, lora_args
            )
        else:
            reason = (
                "checks=off: no vLLM run at export"
                if cfg.checks == "off"
                else "no serve environment at export (adapters-only bundles are checked there)"
            )
            results["preflight"] = Check(passed=None, reason=reason)
        shutil.rmtree(stage / ".probe", ignore_errors=True)
        bundle = BundleManifest(
            **header("tuneship.bundle", out_dir.name),
            served_model_name=served_name,
            layout="adapters",
            run=RunRef(name=manifests[0].name, path=str(run_dirs[0].resolve())),
            base=manifests[0].base,
            config=cfg.model_dump(),
            merge=MergeInfo(into="not merged (adapters served with --enable-lora)"),
            quantization=QuantizationInfo(scheme="none (16-bit base)"),
            files=hash_tree(model_dir),
            adapters=adapters,
            sizes=Sizes(
                model_bytes=tree_size(model_dir), adapters_bytes=tree_size(stage / "adapters")
            ),
            checks=results,
            versions=versions(*LIBRARIES),
            serving=serving_info(
                model_dir,
                results["preflight"],
                cfg,
                max_lora_rank=max(ranks.values()),
                tool_parser=tool_parser(manifests[0]),  # its tokenizer is the bundle's
            ),
        )
        write_manifest(stage / BUNDLE_FILE, bundle)
    print(f"adapters bundle written to {out_dir} in {time.monotonic() - started:.0f} s")
    print(show(out_dir))
    refuse_failed(bundle, out_dir)
    return out_dir


def lint_runs(run_dirs: list[Path], manifests: list[RunManifest], cfg: ExportConfig) -> Path:
    """Everything vLLM would refuse, found before anything is copied: names, bases, adapters;
    then each run's files against its run.json. Returns the shared base folder."""
    names = [m.name for m in manifests]
    if len(set(names)) != len(names):
        raise TuneshipError(f"adapter names must be unique; runs are named {names}")
    base = Path(manifests[0].base.path)
    if not base.is_dir():
        raise TuneshipError(f"adapters-only bundles need a local base folder; got {base}")
    problems = [
        f"adapter '{manifest.name}' ({run_dir}): trained on a base whose weights hash differs "
        f"from the bundle's base {base}"
        for run_dir, manifest in zip(run_dirs, manifests, strict=True)
        if manifest.base.weights_sha256 != manifests[0].base.weights_sha256
    ]
    modules = base_module_names(base)
    for run_dir, manifest in zip(run_dirs, manifests, strict=True):
        problems += lint_adapter(manifest.name, run_dir / "adapter", modules, cfg.max_lora_rank)
    if problems:
        raise ProblemsError("adapter lint failed:", problems)
    for run_dir, manifest in zip(run_dirs, manifests, strict=True):
        check_run(run_dir, manifest)
    return base


def copy_base(base: Path, first_run: Path, model_dir: Path) -> Path:
    """The 16-bit base's weights and configs, with the first adapter's tokenizer: it carries
    the aligned eos and the chat template trained on."""
    model_dir.mkdir()
    for path in sorted(base.glob("*.safetensors")) + [base / f for f in BASE_FILES]:
        if path.is_file():
            shutil.copy2(path, model_dir / path.name)
    for path in (first_run / "adapter").iterdir():
        if path.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy2(path, model_dir / path.name)
    return model_dir


def copy_adapters(
    run_dirs: list[Path], manifests: list[RunManifest], folder: Path
) -> dict[str, AdapterEntry]:
    """Each run's adapter under its run's name, with its rank and file hashes."""
    adapters = {}
    for run_dir, manifest in zip(run_dirs, manifests, strict=True):
        target = folder / manifest.name
        shutil.copytree(run_dir / "adapter", target)
        adapters[manifest.name] = AdapterEntry(
            run=str(run_dir.resolve()),
            run_json_sha256=sha256_file(run_dir / RUN_FILE),
            rank=json.loads((target / "adapter_config.json").read_text())["r"],
            files=hash_tree(target),
        )
    return adapters


def base_served_name(cfg: ExportConfig, out_dir: Path, adapters: list[str]) -> str:
    """The name the base is served under. vLLM serves each name once: an adapter named like
    the bundle (`--out bundles/demo` for run demo) keeps the name, and clients reach the base
    as NAME-base; a served_name set to an adapter's name is refused."""
    if cfg.served_name in adapters:
        raise TuneshipError(
            f"served_name '{cfg.served_name}' is also an adapter's name (vLLM serves each name "
            "once, and the adapters keep their runs' names): set another served_name"
        )
    name = cfg.served_name or out_dir.name
    return f"{name}-base" if name in adapters else name


def preflight_adapters(
    cfg: ExportConfig,
    serve_bin: Path,
    model_dir: Path,
    stage: Path,
    served_name: str,
    names: list[str],
    items: list[EvalItem],
    lora_args: list[str],
) -> dict[str, Check]:
    prompts = items or [
        EvalItem("hello", ({"role": "user", "content": "Hello! Who are you?"},), None, None)
    ]
    request = ProbeRequest(
        served_name=served_name,  # the names serve will use, adapters beside it
        max_model_len=serving_max_len(model_dir),
        max_tokens=cfg.check_max_tokens,
        extra_args=[*lora_args, *engine_arguments(cfg.engine())],
        chats=[
            ProbeChat(id=f"{name}:{item.id}", model=name, messages=list(item.messages))
            for name in names
            for item in prompts
        ],
    )
    result = probe(serve_bin, model_dir, stage / ".probe", "adapters", request)
    rate = stop_rate(result.chats, cfg.min_stop_rate, cfg.check_max_tokens)
    recalls = {
        name: fact_recall(prompts, [c.text for c in result.chats if c.model == name])
        for name in names
    }
    return {
        "preflight": Check(
            passed=all((c.text or "").strip() for c in result.chats),
            flavour=result.flavour,
            load_s=result.load_s,
            peak_rss_bytes=result.peak_rss_bytes,
            adapters_answered=names,
            args=result.argv,
        ),
        "adapter_stop_rate": rate,
        "adapter_recall": Check(passed=None, per_adapter=recalls),
    }
