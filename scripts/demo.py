"""`make demo`: the whole path on the embedded default base, with the same commands a user runs.

base fetch -> data check -> train -> export -> serve (vLLM, serve environment) -> ask the served
model held-out handbook questions and general questions through the OpenAI SDK, next to the base
model's answers. Leaves runs/demo/ and bundles/demo/ (reused on a second run: delete to redo).
Writes reports/demo.json with the answers, the recall figures and the time of each stage.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tuneship.facts import contains_fact
from tuneship.launch import Server, free_port
from tuneship.paths import default_base_dir

REPO = Path(__file__).resolve().parents[1]
TUNESHIP = str(Path(sys.executable).parent / "tuneship")
SERVE_TUNESHIP = str(REPO / ".venv" / "serve" / "bin" / "tuneship")
RUN, BUNDLE = REPO / "runs" / "demo", REPO / "bundles" / "demo"
SHOWN_HELDOUT = ["T-4.2", "L-1.1", "S-1.1", "P-1.1-p", "T-4.2-zh"]
SHOWN_GENERAL = 2
MAX_TOKENS = 64
console = Console()
timings: dict[str, float] = {}


def stage(name: str, argv: list[str], skip_if: Path | None = None) -> None:
    if skip_if is not None and skip_if.exists():
        console.print(f"[bold]{name}[/]: {skip_if.parent} already there (delete it to redo)")
        return
    console.rule(f"[bold]{name}")
    started = time.monotonic()
    subprocess.run(argv, cwd=REPO, check=True)
    timings[name] = round(time.monotonic() - started, 1)


def base_answers(questions: list[str]) -> list[str]:
    """Greedy answers of the untuned base model (transformers, batched), same chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = default_base_dir()
    tokenizer = AutoTokenizer.from_pretrained(base, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).eval()
    answers = []
    for start in range(0, len(questions), 16):
        prompts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
            )
            for q in questions[start : start + 16]
        ]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=MAX_TOKENS, do_sample=False)
        answers += tokenizer.batch_decode(
            out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
        )
    return [a.strip() for a in answers]


def served_answers(base_url: str, questions: list[str]) -> list[tuple[str, str]]:
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key="demo")

    def ask(question: str) -> tuple[str, str]:
        reply = client.chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": question}],
            max_tokens=MAX_TOKENS,
            temperature=0,
        )
        return reply.choices[0].message.content.strip(), reply.choices[0].finish_reason

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(ask, questions))


def main() -> None:
    started = time.monotonic()
    stage("base fetch", [TUNESHIP, "base", "fetch"])
    check = [TUNESHIP, "data", "check", "data/demo/train.jsonl", "data/demo/general_replay.jsonl"]
    stage("data check", [*check, "--eval", "data/demo/heldout.jsonl", "--max-length", "256"])
    stage("train", [TUNESHIP, "train", "--config", "train/configs/demo.yaml"], RUN / "run.json")
    export = [TUNESHIP, "export", "runs/demo", "--out", "bundles/demo"]
    export += ["--config", "export/configs/demo.yaml"]
    stage("export", export, BUNDLE / "bundle.json")

    heldout = [json.loads(x) for x in (REPO / "data/demo/heldout.jsonl").read_text().splitlines()]
    general = [json.loads(x) for x in (REPO / "data/demo/general.jsonl").read_text().splitlines()]
    questions = [h["question"] for h in heldout] + [g["question"] for g in general]

    console.rule("[bold]base model answers (transformers, greedy)")
    t0 = time.monotonic()
    base = base_answers(questions)
    timings["base answers"] = round(time.monotonic() - t0, 1)

    console.rule("[bold]serve (vLLM) and ask through the OpenAI SDK")
    port = free_port()
    argv = [SERVE_TUNESHIP, "serve", "bundles/demo", "--host", "127.0.0.1", "--port", str(port)]
    t0 = time.monotonic()
    with Server(argv, port, REPO / "reports" / "demo-serve.log") as server:
        timings["serve start"] = round(server.startup_s or 0, 1)
        tuned = served_answers(server.base_url, questions)
    timings["serve + ask"] = round(time.monotonic() - t0, 1)

    n = len(heldout)
    rows = []
    for i, q in enumerate(questions):
        expected = [heldout[i]["fact"]] if i < n else general[i - n]["answers"]
        rows.append(
            {
                "question": q,
                "expected": expected,
                "kind": heldout[i]["style"] if i < n else "general",
                "id": heldout[i]["id"] if i < n else f"general-{i - n}",
                "base": base[i],
                "base_ok": any(contains_fact(base[i], e) for e in expected),
                "tuned": tuned[i][0],
                "tuned_finish": tuned[i][1],
                "tuned_ok": any(contains_fact(tuned[i][0], e) for e in expected),
            }
        )
    gen = rows[n:]

    def share(kind: str, key: str) -> float:
        picked = [r for r in rows if r["kind"] == kind]
        return round(sum(r[key] for r in picked) / len(picked), 3)

    summary = {
        f"{kind}_{who}": share(kind, f"{who}_ok")
        for kind in ("reworded", "paraphrase", "general")
        for who in ("base", "tuned")
    } | {"stop_rate_tuned": round(sum(r["tuned_finish"] == "stop" for r in rows) / len(rows), 3)}
    run = json.loads((RUN / "run.json").read_text())
    bundle = json.loads((BUNDLE / "bundle.json").read_text())
    summary |= {
        "final_train_loss": run["metrics"]["final_loss"],
        "train_wall_s": run["metrics"]["wall_s"],
        "bundle_mb": round(bundle["sizes"]["model_bytes"] / 1e6, 1),
        "merged_16bit_mb": round(bundle["sizes"]["merged_bytes"] / 1e6, 1),
        "stage_seconds": timings,
        "total_seconds": round(time.monotonic() - started, 1),
    }

    table = Table(title="held-out handbook questions and general questions", show_lines=True)
    for column in ("question", "must contain", "base model", "fine-tuned (W4A16, vLLM)"):
        table.add_column(column, overflow="fold")
    by_id = {r["id"]: r for r in rows}
    for row in [by_id[i] for i in SHOWN_HELDOUT if i in by_id] + gen[:SHOWN_GENERAL]:
        mark = lambda ok: "[green]✓[/]" if ok else "[red]✗[/]"  # noqa: E731
        table.add_row(
            row["question"],
            " / ".join(row["expected"]),
            f"{mark(row['base_ok'])} {row['base']}",
            f"{mark(row['tuned_ok'])} {row['tuned']}",
        )
    console.print(table)
    for kind, label in (
        ("reworded", "held-out fact recall, reworded questions"),
        ("paraphrase", "held-out fact recall, paraphrased subjects"),
        ("general", "general knowledge kept"),
    ):
        base_share, tuned_share = summary[f"{kind}_base"], summary[f"{kind}_tuned"]
        console.print(f"{label}: base {base_share:.0%}, fine-tuned {tuned_share:.0%}")
    console.print(
        f"fine-tuned answers ending with finish_reason stop: {summary['stop_rate_tuned']:.0%}"
    )
    console.print(
        f"final train loss {summary['final_train_loss']} | bundle {summary['bundle_mb']} MB vs "
        f"merged 16-bit {summary['merged_16bit_mb']} MB | stage seconds {timings} | "
        f"total {summary['total_seconds']} s"
    )
    report = REPO / "reports" / "demo.json"
    report.write_text(
        json.dumps({"summary": summary, "answers": rows}, indent=2, ensure_ascii=False)
    )
    console.print(f"answers and figures: {report}")


if __name__ == "__main__":
    main()
