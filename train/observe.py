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

from tqdm.auto import tqdm
from transformers import TrainerCallback

from tuneship.infra.plots import Points, line_chart, loss_chart

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
# gauge name -> metrics.jsonl column
GAUGE_COLUMNS = {
    "step": "step",
    "epoch": "epoch",
    "loss": "loss",
    "eval_loss": "eval_loss",
    "learning_rate": "learning_rate",
    "tokens_per_second": "tokens_per_s",
    "eta_seconds": "eta_s",
    "peak_memory_bytes": "peak_memory_bytes",
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
        from tuneship.infra.errors import TuneshipError

        raise TuneshipError(f"metrics_port {port} cannot be used: {exc.strerror or exc}") from None
    return server, gauges


class RunObserver(TrainerCallback):
    """Progress bar or JSON lines, metrics.jsonl rows and Prometheus gauges; it also measures
    this session's throughput (a resumed run counts from its checkpoint)."""

    def __init__(
        self, reporter: Reporter, metrics_file: Path, gauges: dict[str, Any] | None, is_main: bool
    ) -> None:
        self.reporter, self.metrics_file = reporter, metrics_file
        self.gauges, self.is_main = gauges, is_main
        self.bar: Any = None
        self.start_time = time.monotonic()
        self.start_step = 0
        self.start_tokens = 0
        self.session_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_time = time.monotonic()
        self.start_step = state.global_step
        self.start_tokens = state.num_input_tokens_seen
        if not self.is_main:
            return
        if self.metrics_file.exists():  # resumed: rows after the checkpoint will be redone
            kept = [
                line
                for line in self.metrics_file.read_text(encoding="utf-8").splitlines()
                if line and json.loads(line)["step"] <= state.global_step
            ]
            self.metrics_file.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        if not self.reporter.json:
            self.bar = tqdm(
                total=state.max_steps, initial=state.global_step, desc="train", unit="step"
            )

    def on_step_end(self, args, state, control, **kwargs):
        self.session_tokens = state.num_input_tokens_seen - self.start_tokens
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.is_main or not logs or not logs.keys() & {"loss", "eval_loss"}:
            return
        row = self._row(state, logs)
        with open(self.metrics_file, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        self._set_gauges(row)
        if self.reporter.json:
            self.reporter.event("eval" if "eval_loss" in row else "train_log", "", **row)
        elif self.bar is not None:
            shown = {"loss": row.get("loss"), "eval_loss": row.get("eval_loss")}
            self.bar.set_postfix(
                {k: f"{v:.4f}" for k, v in shown.items() if v is not None}
                | {"tok/s": f"{row['tokens_per_s'] or 0:.0f}"},
                refresh=False,
            )

    def on_train_end(self, args, state, control, **kwargs):
        self.session_tokens = state.num_input_tokens_seen - self.start_tokens
        if self.bar is not None:
            self.bar.close()

    def _row(self, state: Any, logs: dict[str, Any]) -> dict[str, Any]:
        elapsed = time.monotonic() - self.start_time
        steps = state.global_step - self.start_step
        tokens = state.num_input_tokens_seen - self.start_tokens
        return {
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

    def _set_gauges(self, row: dict[str, Any]) -> None:
        if self.gauges is None:
            return
        for name, key in GAUGE_COLUMNS.items():
            if row.get(key) is not None:
                self.gauges[name].set(row[key])


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

    def points(key: str) -> list[tuple[float, float]]:
        return [(r["step"], r[key]) for r in rows if r.get(key) is not None]

    written = []
    if loss_chart(points("loss"), points("eval_loss"), folder / "loss.png", title):
        written.append("loss.png")
    lr: dict[str, Points] = {"learning rate": points("learning_rate")}
    if line_chart(lr, folder / "learning_rate.png", title):
        written.append("learning_rate.png")
    return written
