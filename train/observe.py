"""What a training run shows while it runs and leaves behind.

- a progress bar (loss, tokens/s, ETA) or JSON lines on stdout (`log_format: json`);
- metrics.jsonl in the work folder, one row per logged step (kept across resumes);
- Prometheus gauges on `metrics_port` (rank 0), for scraping in Kubernetes;
- at the end: metrics.csv and loss/learning-rate plots in the run folder.
"""

from __future__ import annotations

import csv
import json
import resource
import time
from pathlib import Path
from typing import Any

METRICS_JSONL = "metrics.jsonl"
GAUGES = {
    "step": "Optimizer steps done.",
    "epoch": "Epochs done (fractional).",
    "loss": "Training loss at the last logged step.",
    "eval_loss": "Eval loss at the last evaluation.",
    "learning_rate": "Learning rate at the last logged step.",
    "tokens_per_second": "Conversation tokens (no padding) processed per second.",
    "eta_seconds": "Estimated seconds to the end of training.",
    "peak_memory_bytes": "Peak device memory (CUDA allocator) or peak process RSS on CPU.",
}


def peak_memory_bytes() -> int:
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class Reporter:
    """Human lines, or JSON objects when a log collector reads stdout. Rank 0 only speaks."""

    def __init__(self, log_format: str, is_main: bool = True):
        self.json = log_format == "json"
        self.is_main = is_main

    def event(self, name: str, message: str, **fields: Any) -> None:
        if not self.is_main:
            return
        if self.json:
            print(json.dumps({"event": name, "time": round(time.time(), 3), **fields}), flush=True)
        else:
            print(message, flush=True)


def start_metrics_server(port: int) -> tuple[Any, dict[str, Any]]:
    from prometheus_client import CollectorRegistry, Gauge, start_http_server

    registry = CollectorRegistry()
    gauges = {
        name: Gauge(f"tuneship_train_{name}", doc, registry=registry)
        for name, doc in GAUGES.items()
    }
    try:
        server, _thread = start_http_server(port, registry=registry)
    except OSError as exc:
        from tuneship.errors import TuneshipError

        raise TuneshipError(f"metrics_port {port} cannot be used: {exc.strerror or exc}") from None
    return server, gauges


def observer_callback(
    reporter: Reporter, metrics_file: Path, gauges: dict[str, Any] | None, is_main: bool
) -> Any:
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class RunObserver(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.start_time = time.monotonic()
            self.start_step = state.global_step
            self.start_tokens = state.num_input_tokens_seen
            self.bar = None
            if not is_main:
                return
            if metrics_file.exists():  # resumed: rows after the checkpoint will be redone
                kept = [
                    line
                    for line in metrics_file.read_text(encoding="utf-8").splitlines()
                    if line and json.loads(line)["step"] <= state.global_step
                ]
                metrics_file.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
            if not reporter.json:
                self.bar = tqdm(
                    total=state.max_steps, initial=state.global_step, desc="train", unit="step"
                )

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not is_main or not logs or not logs.keys() & {"loss", "eval_loss"}:
                return
            elapsed = time.monotonic() - self.start_time
            steps = state.global_step - self.start_step
            tokens = state.num_input_tokens_seen - self.start_tokens
            row = {
                "step": state.global_step,
                "epoch": round(state.epoch or 0, 4),
                **{
                    k: round(v, 6) if isinstance(v, float) else v
                    for k, v in logs.items()
                    if k in ("loss", "eval_loss", "learning_rate", "grad_norm")
                },
                "tokens_seen": int(state.num_input_tokens_seen),
                "tokens_per_s": round(tokens / elapsed, 1) if elapsed else None,
                "elapsed_s": round(elapsed, 2),
                "eta_s": round(elapsed / steps * (state.max_steps - state.global_step), 1)
                if steps
                else None,
                "peak_memory_bytes": peak_memory_bytes(),
            }
            with open(metrics_file, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
            if gauges is not None:
                for name, value in (
                    ("step", row["step"]),
                    ("epoch", row["epoch"]),
                    ("loss", row.get("loss")),
                    ("eval_loss", row.get("eval_loss")),
                    ("learning_rate", row.get("learning_rate")),
                    ("tokens_per_second", row["tokens_per_s"]),
                    ("eta_seconds", row["eta_s"]),
                    ("peak_memory_bytes", row["peak_memory_bytes"]),
                ):
                    if value is not None:
                        gauges[name].set(value)
            if reporter.json:
                reporter.event("eval" if "eval_loss" in row else "train_log", "", **row)
            elif self.bar is not None:
                shown = {"loss": row.get("loss"), "eval_loss": row.get("eval_loss")}
                self.bar.set_postfix(
                    {k: f"{v:.4f}" for k, v in shown.items() if v is not None}
                    | {"tok/s": f"{row['tokens_per_s'] or 0:.0f}"},
                    refresh=False,
                )

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()

    return RunObserver()


def read_rows(metrics_file: Path) -> list[dict[str, Any]]:
    if not metrics_file.is_file():
        return []
    return [json.loads(line) for line in metrics_file.read_text().splitlines() if line]


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    if not rows:
        return
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def write_plots(rows: list[dict[str, Any]], folder: Path, title: str) -> list[str]:
    """loss.png (train and eval loss per step) and learning_rate.png; returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    series = {
        "loss.png": [("loss", "train loss"), ("eval_loss", "eval loss")],
        "learning_rate.png": [("learning_rate", "learning rate")],
    }
    for name, lines in series.items():
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        drawn = False
        for key, label in lines:
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                ax.plot(
                    *zip(*points, strict=True),
                    marker="." if len(points) < 50 else None,
                    label=label,
                )
                drawn = True
        if drawn:
            ax.set_xlabel("step")
            ax.set_title(f"{title}: {', '.join(label for _, label in lines)}")
            ax.grid(alpha=0.3)
            ax.legend()
            fig.tight_layout()
            fig.savefig(folder / name)
            written.append(name)
        plt.close(fig)
    return written
