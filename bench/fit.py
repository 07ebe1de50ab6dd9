"""The fit estimate (`tuneship train --dry-run`) against measured memory, on CPU.

    .venv/train/bin/python bench/fit.py        (or: make bench-fit)

Trains the default base (SmolLM2-135M-Instruct, 30 blocks, a 49k vocabulary) with the demo
config's LoRA and precision for 3 steps on the demo's handbook conversations with each reply
repeated past 256 tokens and truncated (`overlong: truncate`), so that every micro-batch is
exactly batch_size x max_length tokens, at two batch sizes and two lengths, each case in its own
process, and reads its peak RSS from run.json. A process that imports the same libraries and loads
nothing gives the footprint the estimate does not model (Python, torch, transformers; on a GPU
that is host memory), and CUDA's fixed allowance is left out of the estimate on CPU, so:

    measured = peak RSS - the libraries' footprint
    estimated = weights + LoRA and optimizer + activations + logits

The parts that grow with the micro-batch (activations, logits) are also compared as growth from
the smallest case, where everything fixed cancels. Writes bench/results/fit.json, fit.md and
fit.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DEMO = REPO / "train" / "configs" / "demo.yaml"
CASES = [(2, 128), (2, 256), (4, 128), (4, 256)]  # (batch_size, max_length)
MiB = 2**20


def long_conversations(out: Path) -> Path:
    """The demo's handbook conversations, every reply repeated 12 times (over 256 tokens)."""
    rows = []
    for line in (REPO / "data" / "demo" / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        for turn in row["conversations"]:
            if turn["from"] == "gpt":
                turn["value"] = " ".join([turn["value"]] * 12)
        rows.append(json.dumps(row, ensure_ascii=False))
    path = out / "long.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


def overrides(batch: int, length: int, out: Path) -> dict:
    return {
        "name": f"b{batch}-l{length}",
        "data": [str(out / "long.jsonl")],
        "eval_data": None,
        "keep_best": False,
        "overlong": "truncate",
        "batch_size": batch,
        "max_length": length,
        "max_steps": 3,
        "warmup_steps": 0,
        "logging_steps": 1,
        "output_dir": str(out),
    }


def libraries_footprint() -> int:
    """Peak RSS of a process that imports what training imports and loads no model."""
    code = (
        "import resource, torch, transformers, peft; import tuneship.train.run; "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


def measured_peak(batch: int, length: int, work: Path) -> int:
    """Train one case in a child process; its peak RSS as run.json records it."""
    values = overrides(batch, length, work)
    sets = [arg for k, v in values.items() for arg in ("--set", f"{k}={json.dumps(v)}")]
    tuneship = Path(sys.executable).parent / "tuneship"
    subprocess.run(
        [str(tuneship), "train", "--config", str(DEMO), *sets],
        check=True,
        capture_output=True,
        text=True,
    )
    run = json.loads((work / f"b{batch}-l{length}" / "run.json").read_text())
    return int(run["metrics"]["peak_memory_bytes"])


def estimated(batch: int, length: int, work: Path) -> dict:
    from tuneship.config.loading import load_config
    from tuneship.config.schema import TrainConfig
    from tuneship.train.base import resolve_base
    from tuneship.train.estimate import estimate, model_shape

    cfg = load_config(TrainConfig, DEMO, overrides(batch, length, work))
    base = resolve_base(cfg.base)
    return estimate(model_shape(base, cfg), cfg, gpus=1)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"batch {r['batch_size']}\nlength {r['max_length']}" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([i - 0.2 for i in x], [r["estimated_mib"] for r in rows], 0.4, label="estimated")
    ax.bar([i + 0.2 for i in x], [r["measured_mib"] for r in rows], 0.4, label="measured")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("MiB (beyond the libraries' footprint)")
    ax.set_title("Fit estimate against measured peak memory, SmolLM2-135M, CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()
    footprint = libraries_footprint()
    rows = []
    with tempfile.TemporaryDirectory(prefix="tuneship-fit-") as tmp:
        long_conversations(Path(tmp))
        for batch, length in CASES:
            print(f"batch {batch} x length {length} ...", flush=True)
            peak = measured_peak(batch, length, Path(tmp))
            parts = estimated(batch, length, Path(tmp))
            growing = parts["activations"] + parts["logits"]
            rows.append(
                {
                    "batch_size": batch,
                    "max_length": length,
                    "tokens": batch * length,
                    "estimated_mib": round((parts["total"] - parts["runtime"]) / MiB),
                    "measured_mib": round((peak - footprint) / MiB),
                    "estimated_growing_mib": round(growing / MiB),
                    "weights_mib": round(parts["weights"] / MiB),
                    "lora_and_optimizer_mib": round(parts["lora_and_optimizer"] / MiB),
                    "peak_rss_mib": round(peak / MiB),
                }
            )
    first = rows[0]
    for row in rows:
        row["estimated_growth_mib"] = row["estimated_growing_mib"] - first["estimated_growing_mib"]
        row["measured_growth_mib"] = row["measured_mib"] - first["measured_mib"]
        row["ratio"] = round(row["measured_mib"] / row["estimated_mib"], 2)
    result = {
        "machine": f"{os.cpu_count()} CPUs ({platform.machine()}), no GPU",
        "libraries_footprint_mib": round(footprint / MiB),
        "cases": rows,
        "command": ".venv/train/bin/python bench/fit.py",
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fit.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Fit estimate against measured peak memory (CPU)",
        "",
        f"`{result['command']}`; the libraries' own footprint ({result['libraries_footprint_mib']}"
        " MiB) is taken off the measured peak, CUDA's allowance off the estimate.",
        "",
        "| batch x length | tokens | estimated MiB | measured MiB | measured / estimated "
        "| growth from the first case: estimated / measured MiB |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['batch_size']} x {r['max_length']} | {r['tokens']} | {r['estimated_mib']} | "
        f"{r['measured_mib']} | {r['ratio']} | {r['estimated_growth_mib']} / "
        f"{r['measured_growth_mib']} |"
        for r in rows
    ]
    (RESULTS / "fit.md").write_text("\n".join(lines) + "\n")
    plot(rows, RESULTS / "fit.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
