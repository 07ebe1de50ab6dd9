"""`make demo`: the whole path on the embedded default base, with the same commands a user runs.

base fetch -> data check -> train -> export -> eval: `tuneship eval` serves the base model, the
merged 16-bit fine-tune and the W4A16 bundle with vLLM (serve environment), asks each the held-out
handbook questions and general questions through the OpenAI-compatible endpoint, and writes
reports/demo/report.{md,html,json}. Leaves runs/demo/ and bundles/demo/ (reused on a second run:
delete them to redo); the report is rewritten each time. Prints a few answers side by side, the
report's summary and the time of each stage.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from tuneship.eval.render import measured, must_contain
from tuneship.handoff.eval_report import EvalReport, read_report
from tuneship.handoff.manifest import read_bundle, read_run

REPO = Path(__file__).resolve().parents[1]
TUNESHIP = str(Path(sys.executable).parent / "tuneship")
RUN, BUNDLE, REPORT = REPO / "runs" / "demo", REPO / "bundles" / "demo", REPO / "reports" / "demo"
SHOWN = ["T-4.2", "L-1.1", "S-1.1", "P-1.1-p", "T-4.2-zh", "general-0", "general-1"]
console = Console()
timings: dict[str, float] = {}


def stage(name: str, argv: list[str], skip_if: Path | None = None) -> None:
    if skip_if is not None and skip_if.exists():
        console.print(f"[bold]{name}[/]: {skip_if.parent} already there (delete it to redo)")
        return
    console.rule(f"[bold]{name}")
    started = time.monotonic()
    done = subprocess.run(argv, cwd=REPO)
    if done.returncode != 0:
        console.print(f"[red]{name} failed (exit {done.returncode}): see its message above[/]")
        raise SystemExit(done.returncode)
    timings[name] = round(time.monotonic() - started, 1)


def side_by_side(report: EvalReport) -> Table:
    table = Table(title="a few of the questions (all of them: report.html)", show_lines=True)
    for column in ("question", "must contain", "base model", "fine-tuned (W4A16, vLLM)"):
        table.add_column(column, overflow="fold")
    general = [a for a in report.answers if a.kind == "general"]
    by_id = {a.id: a for a in report.answers} | {f"general-{n}": a for n, a in enumerate(general)}
    for answer in [by_id[i] for i in SHOWN if i in by_id]:
        mark = lambda ok: "[green]✓[/]" if ok else "[red]✗[/]"  # noqa: E731
        table.add_row(
            answer.question,
            must_contain(answer),
            f"{mark(answer.base.ok)} {answer.base.text}",
            f"{mark(answer.quantized.ok)} {answer.quantized.text}",
        )
    return table


def main() -> None:
    started = time.monotonic()
    stage("base fetch", [TUNESHIP, "base", "fetch"])
    data = ["data/demo/train.jsonl", "data/demo/tool_train.jsonl", "data/demo/general_replay.jsonl"]
    evals = ["--eval", "data/demo/validation.jsonl", "--eval", "data/demo/heldout.jsonl"]
    train_config = "train/configs/demo.yaml"
    max_length = str(yaml.safe_load(Path(train_config).read_text())["max_length"])
    stage("data check", [TUNESHIP, "data", "check", *data, *evals, "--max-length", max_length])
    stage("train", [TUNESHIP, "train", "--config", train_config], RUN / "run.json")
    export = [TUNESHIP, "export", "runs/demo", "--out", "bundles/demo"]
    export += ["--config", "export/configs/demo.yaml"]
    stage("export", export, BUNDLE / "bundle.json")
    evaluate = [TUNESHIP, "eval", "bundles/demo", "--out", "reports/demo", "--force"]
    stage("eval", [*evaluate, "--config", "eval/configs/demo.yaml"])

    report = read_report(REPORT)
    console.print(side_by_side(report))
    run, bundle = read_run(RUN), read_bundle(BUNDLE)
    console.print(
        f"train: {run.metrics.wall_s or 0:.0f} s, final train loss {run.metrics.final_loss}"
        f" | bundle {bundle.sizes.model_bytes / 1e6:.0f} MB vs merged 16-bit "
        f"{(bundle.sizes.merged_bytes or 0) / 1e6:.0f} MB"
    )
    console.print(f"stage seconds {timings} | total {time.monotonic() - started:.0f} s")
    met = sum(t.met for t in report.targets)
    console.print(f"[bold]targets met: {met} of {len(report.targets)}[/]")
    for target in report.targets:
        colour = "green" if target.met else "red"
        verdict = "met" if target.met else "MISSED"
        console.print(
            f"  [{colour}]{verdict}[/] {target.target}: {measured(target)} (goal {target.goal})"
        )
        if target.rule:
            console.print(f"         judged {target.rule}")
    tools = {m: f.tools for m, f in report.models.items() if f.tools}
    if tools:
        console.print(
            f"tool prompts ({report.data.tool_prompts}, vLLM's '{report.data.tool_parser}' "
            "parser): right function with the exact arguments"
        )
        for model, figures in tools.items():
            right, no_call = figures["right_calls"], figures["no_call"]
            console.print(
                f"  {report.models[model].label}: {right.count[0]} of {right.count[1]}"
                f" | no call where none is needed {no_call.count[0]} of {no_call.count[1]}"
            )
    base_4bit = report.base_w4a16
    if base_4bit:
        (kept, of), (bundle_kept, bundle_of) = (
            base_4bit.counts["retention"],
            base_4bit.counts["bundle_retention"],
        )
        console.print(
            f"  for reference: the base itself in W4A16 keeps {kept} of {of} general answers; "
            f"against it, the bundle keeps {bundle_kept} of {bundle_of}"
        )
    console.print(f"report: {REPORT / 'report.html'} (and report.md, report.json)")


if __name__ == "__main__":
    main()
