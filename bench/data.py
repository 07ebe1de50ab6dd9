"""Memory of `tuneship data check` and of the training data preparation against the data's size,
each against holding the conversations in memory (the baseline), in one run.

    .venv/train/bin/python bench/data.py [--check-sizes 10000 100000 1000000]
                                         [--prepare-sizes 10000 100000]      (or: make bench-data)

Writes ShareGPT Parquet files of N two-turn conversations (about 90 words each, 175 bytes a
conversation on disk, row groups of 50,000), then measures the peak RSS of a fresh process for
each:
- data check: `tuneship data check FILE --no-tokens` (streamed), against reading every
  conversation into a list (records.load_file: what the check held before it streamed);
- training preparation (needs `tuneship base fetch`): the train stage's prepare_data (the plan
  keeps numbers, the rows go to an Arrow file), against the in-memory prepare() with the
  conversations tokenized into Python lists (what training held before the rows file).
Writes bench/results/data-CLASS.{json,md}; CLASS is the CPU class (figures are RSS, not speed,
but the seconds are there too).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = REPO / ".venv" / "train" / "bin" / "python"
TUNESHIP = REPO / ".venv" / "train" / "bin" / "tuneship"
sys.path.insert(0, str(REPO / "bench"))

WORDS = [
    "policy",
    "expense",
    "travel",
    "leave",
    "manager",
    "approval",
    "receipt",
    "hotel",
    "flight",
    "budget",
    "days",
    "office",
    "remote",
    "laptop",
    "security",
    "badge",
    "claim",
    "form",
    "deadline",
    "team",
]

HELD = """
import sys
from tuneship.chat.records import load_file
convs = load_file(sys.argv[1]).conversations
print(len(convs))
"""
STREAMED_PREPARE = """
import sys, tempfile
from pathlib import Path
from transformers import AutoTokenizer
from tuneship.chat.template import align_eos
from tuneship.config.schema import TrainConfig
from tuneship.train.base import resolve_base
from tuneship.train.observe import Reporter
from tuneship.train.run import prepare_data
tokenizer = AutoTokenizer.from_pretrained(resolve_base("default"))
align_eos(tokenizer)
cfg = TrainConfig(name="bench", data=[sys.argv[1]], eval_fraction=0.01)
with tempfile.TemporaryDirectory() as work:
    prepared = prepare_data(cfg, tokenizer, Reporter("json", is_main=False), Path(work))
    print(prepared.stats.used)
"""
HELD_PREPARE = """
import sys
from transformers import AutoTokenizer
from tuneship.chat.labels import ChatTokenizer
from tuneship.chat.mixing import prepare
from tuneship.chat.template import align_eos
from tuneship.config.schema import TrainConfig
from tuneship.train.base import resolve_base
import tuneship.train.run  # the same imports as the streamed side: only the data differs
tokenizer = AutoTokenizer.from_pretrained(resolve_base("default"))
align_eos(tokenizer)
cfg = TrainConfig(name="bench", data=[sys.argv[1]], eval_fraction=0.01)
data = prepare(cfg.data_mix())
chat_tokenizer = ChatTokenizer(tokenizer)
rows = [chat_tokenizer(c) for c in data.train + data.eval]
print(len(rows))
"""


def write_parquet(path: Path, n: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    turn = pa.struct([("from", pa.string()), ("value", pa.string())])
    schema = pa.schema([("conversations", pa.list_(turn))])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, n, 50_000):
            rows = []
            for i in range(start, min(n, start + 50_000)):
                question = f"Question {i}: " + " ".join(rng.choices(WORDS, k=15)) + "?"
                answer = f"Answer {i}: " + " ".join(rng.choices(WORDS, k=70)) + "."
                rows.append(
                    [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
                )
            writer.write_table(pa.table({"conversations": rows}, schema=schema))


def measure(label: str, argv: list[str]) -> dict:
    # RUSAGE_CHILDREN is a maximum over every child so far: run each in its own interpreter
    code = (
        "import json, resource, subprocess, sys; subprocess.run(sys.argv[1:], check=False, "
        "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True, cwd=REPO
    )
    result = {
        "peak_rss_mib": round(int(out.stdout.strip()) / 1024),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(f"  {label}: {result['peak_rss_mib']} MiB, {result['seconds']} s", flush=True)
    return result


def main() -> None:
    from cpu import class_label  # bench/cpu.py: the CPU class these figures name

    from tuneship.modelops.precision import detect

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check-sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--prepare-sizes", type=int, nargs="+", default=[10_000, 100_000])
    args = parser.parse_args()
    results: dict = {"cpu_class": class_label(detect()), "check": [], "prepare": []}
    with tempfile.TemporaryDirectory(prefix="tuneship-bench-data-") as tmp:
        for n in sorted(set(args.check_sizes) | set(args.prepare_sizes)):
            path = Path(tmp) / f"chats-{n}.parquet"
            write_parquet(path, n)
            print(f"{n} conversations ({path.stat().st_size / 2**20:.1f} MiB of Parquet)")
            if n in args.check_sizes:
                results["check"].append({
                    "conversations": n,
                    "streamed": measure("data check", [str(TUNESHIP), "data", "check",
                                                       str(path), "--no-tokens"]),
                    "held": measure("held in memory", [str(PYTHON), "-c", HELD, str(path)]),
                })  # fmt: skip
            if n in args.prepare_sizes:
                results["prepare"].append({
                    "conversations": n,
                    "streamed": measure("prepare_data", [str(PYTHON), "-c", STREAMED_PREPARE,
                                                         str(path)]),
                    "held": measure("held in memory", [str(PYTHON), "-c", HELD_PREPARE,
                                                       str(path)]),
                })  # fmt: skip
    out = REPO / "bench" / "results" / f"data-{results['cpu_class']}"
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(table(results))
    print(table(results))


def table(results: dict) -> str:
    lines = [
        f"Peak RSS (MiB) against the data's size, CPU class {results['cpu_class']} "
        "(`make bench-data`)",
        "",
        "| what | conversations | streamed (MiB) | held in memory (MiB) | held / streamed |",
        "|---|---|---|---|---|",
    ]
    for what, rows in (("data check --no-tokens", results["check"]),
                       ("training data preparation", results["prepare"])):  # fmt: skip
        for row in rows:
            streamed, held = row["streamed"]["peak_rss_mib"], row["held"]["peak_rss_mib"]
            lines.append(
                f"| {what} | {row['conversations']:,} | {streamed} ({row['streamed']['seconds']}"
                f" s) | {held} ({row['held']['seconds']} s) | {held / streamed:.1f}x |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
