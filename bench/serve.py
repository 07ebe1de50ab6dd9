"""Serving throughput: vLLM (W4A16 bundle and merged bf16) against the article's FastAPI server.

    .venv/train/bin/python bench/serve.py [--bundle bundles/demo]      (or: make bench-serve)

Needs a bundle (`make demo` writes bundles/demo) and both environments. On the same machine and
model, one after the other, each server gets the same concurrency sweep (default 1, 8, 32, 64
requests in flight; max(concurrency, 8) requests per level), distinct prompts of a fixed input
length, and exactly `--output-tokens` tokens per reply:

- article: bench/article_server.py, the article's FastAPI + transformers `generate` per request
  (base + LoRA adapter through peft, bf16);
- vllm-bf16: vLLM on the merged 16-bit model, with `tuneship serve`'s production arguments;
- vllm-w4a16: `tuneship serve BUNDLE`, the GPTQ W4A16 bundle.

Writes bench/results/serve.json, serve.md and serve.png. Target (issue 7): at concurrency 32 the
W4A16 bundle serves at least 20x the article's output tokens/s.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from loadgen import prompts, sweep, write_results  # noqa: E402

SERVE_ENV = REPO / ".venv" / "serve" / "bin"
TARGET_LEVEL, TARGET_RATIO = 32, 20.0
# vLLM with `tuneship serve`'s production arguments on a plain checkpoint (no bundle.json)
VLLM_ON_CHECKPOINT = (
    "import os, sys; from pathlib import Path; "
    "from tuneship.serve.run import build_command, vllm_flavour; "
    "from tuneship.serve.weights import prepare; flavour = vllm_flavour(); "
    "argv, env = build_command(prepare(Path(sys.argv[1]), flavour), 'bench', '127.0.0.1', "
    "int(sys.argv[2]), flavour, int(sys.argv[3])); os.execvpe(argv[0], argv, os.environ | env)"
)


def main() -> None:
    parser = argparse.ArgumentParser(description="vLLM against the article's serving approach")
    parser.add_argument("--bundle", type=Path, default=REPO / "bundles" / "demo")
    parser.add_argument("--levels", default="1,8,32,64", help="Concurrency levels.")
    parser.add_argument("--input-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--name", default="serve", help="Result file names (NAME.json/.md/.png).")
    parser.add_argument(
        "--servers", default="article,vllm-bf16,vllm-w4a16", help="Which servers to measure."
    )
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    from transformers import AutoTokenizer

    from tuneship.handoff.bundles import verify
    from tuneship.infra.launch import Server, free_port
    from tuneship.modelops.merging import merge
    from tuneship.modelops.precision import compute_precision
    from tuneship.quality.probes import serving_max_len

    bundle = verify(args.bundle)
    run_dir = Path(bundle.run.path)
    base = bundle.base.path
    model_dir = args.bundle / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = prompts(tokenizer, max(*levels, 8), args.input_tokens)

    def requests_for(level: int) -> int:
        return max(level, 8)

    servers = {}
    with tempfile.TemporaryDirectory(prefix="tuneship-bench-") as tmp:
        merged = Path(tmp) / "merged"
        wanted = args.servers.split(",")
        if "vllm-bf16" in wanted:
            print("merging the adapter for the bf16 server ...", flush=True)
            merge(base, run_dir / "adapter", merged, compute_precision()[0].torch_dtype)
        commands = {
            "article": lambda port: (
                [
                    *(sys.executable, str(REPO / "bench" / "article_server.py"), "--base", base),
                    *("--adapter", str(run_dir / "adapter"), "--port", str(port)),
                    *("--tokens", str(args.output_tokens)),
                ],
                "article",
                "FastAPI + transformers generate per request (peft LoRA, bf16)",
            ),
            "vllm-bf16": lambda port: (
                [
                    *(str(SERVE_ENV / "python"), "-c", VLLM_ON_CHECKPOINT, str(merged)),
                    *(str(port), str(serving_max_len(model_dir))),
                ],
                "openai",
                "vLLM, merged 16-bit checkpoint (the machine's precision: bf16 where native)",
            ),
            "vllm-w4a16": lambda port: (
                [
                    *(str(SERVE_ENV / "tuneship"), "serve", str(args.bundle)),
                    *("--host", "127.0.0.1", "--port", str(port)),
                ],
                "openai",
                "vLLM, `tuneship serve` on the GPTQ W4A16 bundle",
            ),
        }
        for name in wanted:
            port = free_port()
            argv, kind, description = commands[name](port)
            log = args.out / f"{args.name}-{name}.log"
            print(f"{name}: starting ({description}) ...", flush=True)
            with Server(argv, port, log, timeout_s=600) as server:
                started = time.monotonic()
                served_name = "bench" if name == "vllm-bf16" else bundle.served_model_name
                rows = sweep(
                    kind,
                    server.base_url,
                    served_name,
                    texts,
                    levels,
                    args.output_tokens,
                    requests_for,
                )
                servers[name] = {
                    "description": description,
                    "startup_s": round(server.startup_s or 0, 1),
                    "sweep_s": round(time.monotonic() - started, 1),
                    "peak_rss_bytes": server.peak_rss_bytes(),
                    "levels": rows,
                }
            log.unlink(missing_ok=True)

    ratio = None
    if {"article", "vllm-w4a16"} <= servers.keys():
        by_level = {
            name: {r["concurrency"]: r["output_tokens_per_s"] for r in data["levels"]}
            for name, data in servers.items()
        }
        if TARGET_LEVEL in by_level["article"]:
            ratio = round(
                by_level["vllm-w4a16"][TARGET_LEVEL] / by_level["article"][TARGET_LEVEL], 1
            )
    result = {
        "setup": (
            f"{bundle.base.ref or base} fine-tuned (run `{run_dir.name}`), CPU "
            f"({_cpu_count()} cores), {args.input_tokens} input / {args.output_tokens} output "
            f"tokens per request, max(concurrency, 8) requests per level."
        ),
        "command": " ".join(
            [".venv/train/bin/python", "bench/serve.py", *map(shlex.quote, sys.argv[1:])]
        ),
        "input_tokens": args.input_tokens,
        "output_tokens": args.output_tokens,
        "target": {
            "concurrency": TARGET_LEVEL,
            "min_ratio_w4a16_vs_article": TARGET_RATIO,
            "ratio": ratio,
            "met": ratio is not None and ratio >= TARGET_RATIO,
        },
        "servers": servers,
    }
    markdown = write_results(
        result, args.name, args.out, "article" if "article" in servers else wanted[0],
        f"Serving: vLLM against the article's FastAPI server ({_cpu_count()}-core CPU)",
    )  # fmt: skip
    print(markdown)
    if ratio is not None:
        verdict = "met" if result["target"]["met"] else "MISSED"
        print(f"W4A16 vs article at concurrency {TARGET_LEVEL}: {ratio}x (target 20x: {verdict})")


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
