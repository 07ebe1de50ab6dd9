"""What a run shows: Prometheus metrics while it trains, JSON log lines, curves and tables."""

from __future__ import annotations

import csv
import json
import subprocess
import time
import urllib.request

import pytest

from tests.support import TUNESHIP, events, train_config, write_config
from tuneship.handoff.manifest import read_run
from tuneship.infra.launch import free_port
from tuneship.train.run import run


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
        text = reply.read().decode()
    return {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("tuneship_train_")
    }


@pytest.mark.processes
def test_prometheus_metrics_are_served_while_training(tmp_path, tiny_base, small_dataset):
    port = free_port()
    cfg_path = write_config(
        tmp_path, tiny_base, small_dataset, max_steps=400, metrics_port=port, log_format="json"
    )
    proc = subprocess.Popen(
        [TUNESHIP, "train", "--config", str(cfg_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    seen: dict[str, float] = {}
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            seen = scrape(port)
        except OSError:
            seen = {}
        if seen.get("tuneship_train_step", 0) >= 5:
            break
        time.sleep(0.05)
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0
    assert 5 <= seen["tuneship_train_step"] < 400, seen
    assert seen["tuneship_train_loss"] > 0 and seen["tuneship_train_learning_rate"] > 0
    assert seen["tuneship_train_tokens_per_second"] > 0
    assert seen["tuneship_train_eta_seconds"] >= 0
    assert seen["tuneship_train_peak_memory_bytes"] > 10 * 2**20

    lines = events(stdout)
    assert [e["event"] for e in lines[:1]] == ["start"] and lines[-1]["event"] == "done"
    logs = [e for e in lines if e["event"] == "train_log"]
    assert [e["step"] for e in logs] == list(range(1, 401))
    assert {"loss", "learning_rate", "tokens_per_s", "eta_s", "epoch"} <= logs[-1].keys()


def test_run_folder_has_curves_and_per_step_metrics(tmp_path, tiny_base, small_dataset):
    out = run(train_config(tmp_path, tiny_base, small_dataset, max_steps=6, logging_steps=2))
    with open(out / "metrics.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    assert [float(r["loss"]) for r in rows] == [loss for _, loss in read_run(out).metrics.loss]
    jsonl = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in jsonl] == [2, 4, 6]
    for plot in ("loss.png", "learning_rate.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_run(out).metrics.plots == ["loss.png", "learning_rate.png"]
