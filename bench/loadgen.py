"""The serving benchmark's load generator and its result files (CPU and GPU scripts share it).

One level = `requests` chat requests with at most `concurrency` in flight, each a distinct prompt
of a fixed token length that must produce exactly `output_tokens` tokens. OpenAI-compatible
servers (vLLM) are driven with the official OpenAI SDK, streaming, so time to first token and
inter-token latency are what a client sees; the article's server answers in one piece, so its
time to first token is the whole request.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import time
from pathlib import Path
from typing import Any

WORDS = [
    *("policy", "travel", "allowance", "hotel", "receipt", "manager", "approval", "expense"),
    *("report", "flight", "budget", "meal", "laptop", "security", "badge", "leave", "holiday"),
    *("overtime", "training", "course", "reimbursement"),
]


def prompts(tokenizer: Any, count: int, input_tokens: int) -> list[str]:
    """Distinct prompts of exactly `input_tokens` tokens (user text, before the chat template):
    a request number first, so no two share a cached prefix beyond the template."""
    texts = []
    for n in range(count):
        words = [f"Request {n}: summarise these handbook topics."]
        k = 0
        while len(tokenizer(" ".join(words), add_special_tokens=False).input_ids) < input_tokens:
            words.append(WORDS[(n + k) % len(WORDS)])
            k += 1
        ids = tokenizer(" ".join(words), add_special_tokens=False).input_ids[:input_tokens]
        texts.append(tokenizer.decode(ids))
    return texts


async def _openai_request(client: Any, model: str, prompt: str, output_tokens: int) -> dict:
    sent = time.perf_counter()
    first, stamps, tokens, error = None, [], 0, None
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=output_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True, "min_tokens": output_tokens},
        )
        async for chunk in stream:
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].delta.content:
                now = time.perf_counter()
                first = first or now
                stamps.append(now)
    except Exception as exc:  # a failed request is counted, not fatal
        error = f"{type(exc).__name__}: {exc}"[:200]
    done = time.perf_counter()
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return {
        "ttft_s": None if first is None else first - sent,
        "itl_s": statistics.mean(gaps) if gaps else None,
        "latency_s": done - sent,
        "tokens": tokens,
        "error": error,
    }


async def _article_request(client: Any, url: str, prompt: str, output_tokens: int) -> dict:
    sent = time.perf_counter()
    tokens, error = 0, None
    try:
        reply = await client.post(f"{url}/predict", json={"question": prompt}, timeout=3600)
        reply.raise_for_status()
        tokens = reply.json()["tokens"]
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"[:200]
    latency = time.perf_counter() - sent
    return {
        "ttft_s": latency if not error else None,
        "itl_s": latency / tokens if tokens else None,
        "latency_s": latency,
        "tokens": tokens,
        "error": error,
    }


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))], 4)


async def _level(send, texts: list[str], concurrency: int, output_tokens: int) -> dict:
    gate = asyncio.Semaphore(concurrency)

    async def one(text: str) -> dict:
        async with gate:
            return await send(text, output_tokens)

    started = time.perf_counter()
    results = await asyncio.gather(*(one(t) for t in texts))
    wall = time.perf_counter() - started
    ok = [r for r in results if not r["error"]]
    ttft = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    itl = [r["itl_s"] for r in ok if r["itl_s"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "concurrency": concurrency,
        "requests": len(texts),
        "errors": len(results) - len(ok),
        "first_error": next((r["error"] for r in results if r["error"]), None),
        "short_replies": sum(r["tokens"] != output_tokens for r in ok),
        "wall_s": round(wall, 2),
        "output_tokens": tokens,
        "output_tokens_per_s": round(tokens / wall, 1),
        "requests_per_s": round(len(ok) / wall, 3),
        "ttft_p50_s": _pct(ttft, 0.5),
        "ttft_p95_s": _pct(ttft, 0.95),
        "itl_mean_ms": round(1000 * statistics.mean(itl), 2) if itl else None,
        "latency_p50_s": _pct([r["latency_s"] for r in ok], 0.5),
    }


def sweep(
    kind: str,
    url: str,
    model: str,
    texts: list[str],
    levels: list[int],
    output_tokens: int,
    requests_for: Any,
) -> list[dict]:
    """Run every concurrency level in turn against one server; returns one row per level."""
    import httpx
    from openai import AsyncOpenAI
    from tqdm import tqdm

    async def main() -> list[dict]:
        limits = httpx.Limits(max_connections=max(levels) + 8)
        rows = []
        async with httpx.AsyncClient(limits=limits, timeout=3600) as http:
            client = AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", http_client=http)

            async def send(text: str, n: int) -> dict:
                if kind == "openai":
                    return await _openai_request(client, model, text, n)
                return await _article_request(http, url, text, n)

            # one short request first: the first one pays one-off costs (allocations, compiles)
            await send(texts[0], 4)
            for level in tqdm(levels, desc=f"{model}: concurrency", unit="level"):
                rows.append(await _level(send, texts[: requests_for(level)], level, output_tokens))
        return rows

    return asyncio.run(main())


def write_results(result: dict, name: str, folder: Path, baseline: str, title: str) -> str:
    """NAME.json, NAME.md (a table per concurrency level, ratios against `baseline`) and
    NAME.png (output tokens/s and TTFT p50 per concurrency). Returns the markdown."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    servers = result["servers"]
    lines = [
        f"### {title}",
        "",
        result["setup"],
        "",
        "| server | concurrency | output tok/s | vs " + baseline + " | TTFT p50 / p95 (s) | "
        "inter-token (ms) | requests | errors |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    base_rows = {r["concurrency"]: r for r in servers[baseline]["levels"]}
    for server, data in servers.items():
        for row in data["levels"]:
            ref = base_rows.get(row["concurrency"])
            ratio = (
                f"{row['output_tokens_per_s'] / ref['output_tokens_per_s']:.1f}x"
                if ref and ref["output_tokens_per_s"]
                else "-"
            )
            lines.append(
                f"| {server} | {row['concurrency']} | {row['output_tokens_per_s']:.1f} | {ratio} | "
                f"{row['ttft_p50_s']} / {row['ttft_p95_s']} | {row['itl_mean_ms']} | "
                f"{row['requests']} | {row['errors']} |"
            )
    lines += ["", f"Command: `{result['command']}`", ""]
    markdown = "\n".join(lines)
    (folder / f"{name}.md").write_text(markdown)
    plot(result, folder / f"{name}.png", title)
    return markdown


def plot(result: dict, path: Path, title: str) -> None:
    try:
        import matplotlib
    except ImportError:  # the vLLM serving image has no matplotlib: the JSON and table suffice
        print(f"matplotlib is not installed: {path.name} not drawn")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (tput, ttft) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    for server, data in result["servers"].items():
        levels = [r["concurrency"] for r in data["levels"]]
        tput.plot(levels, [r["output_tokens_per_s"] for r in data["levels"]], "o-", label=server)
        ttft.plot(levels, [r["ttft_p50_s"] for r in data["levels"]], "o-", label=server)
    for ax, label in ((tput, "output tokens/s"), (ttft, "time to first token p50 (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    tput.set_yscale("log")
    ttft.set_yscale("log")
    tput.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
