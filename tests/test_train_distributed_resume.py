"""Preemption under torchrun (2 gloo processes): SIGTERM to the agent, or to one worker only
(a multi-pod job where only the evicted pod is signalled). Every rank must agree to stop at the
same step, write one checkpoint, exit 143 (retryable), and the rerun must resume there."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from tests.support import TORCHRUN, events, kill_tree, run_job, write_config
from tuneship.handoff.manifest import read_run
from tuneship.train import checkpoints as ckpt

pytestmark = pytest.mark.processes

STEPS = 80


def workers(agent_pid: int) -> dict[int, int]:
    """RANK -> pid of the agent's worker processes."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid != agent_pid:
                continue
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        env = dict(item.split(b"=", 1) for item in environ if b"=" in item)
        if b"RANK" in env:
            found[int(env[b"RANK"])] = int(stat.parent.name)
    return found


def signal_at_step(argv: list[str], step: int, target: str) -> tuple[int, str, str]:
    """Start the job, send SIGTERM once rank 0 has logged `step`; (exit code, stdout, stderr)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    guard = threading.Timer(600, kill_tree, (proc.pid,))  # a hung start (a loaded machine is slow)
    guard.start()
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if '"train_log"' in line and json.loads(line)["step"] >= step:
            break
    os.kill(proc.pid if target == "agent" else workers(proc.pid)[1], signal.SIGTERM)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)  # a rank left waiting in a collective
        stdout, stderr = proc.communicate()
    guard.cancel()
    return proc.returncode, "".join(seen) + stdout, stderr


@pytest.mark.parametrize(
    "strategy, target, precision",
    # FSDP in bf16: the fp32 tiny base is converted, so rank 0 loads it alone (model.py)
    [("ddp", "agent", "fp32"), ("ddp", "worker", "fp32"), ("fsdp", "agent", "fp32"),
     ("fsdp", "worker", "bf16")],
)  # fmt: skip
def test_sigterm_under_torchrun_checkpoints_exits_143_and_resumes(
    tmp_path, tiny_base, small_dataset, strategy, target, precision
):
    cfg_path = write_config(
        tmp_path, tiny_base, small_dataset, batch_size=2, max_steps=STEPS, checkpoint_steps=1000,
        log_format="json", distributed={"strategy": strategy}, precision=precision,
    )  # fmt: skip
    argv = [*TORCHRUN, "train", "--config", str(cfg_path)]
    code, stdout, stderr = signal_at_step(argv, 3, target)
    assert code == 143, stderr[-3000:]
    preempted = [e for e in events(stdout) if e["event"] == "preempted"]
    assert len(preempted) == 1, stdout[-2000:]
    step = preempted[0]["step"]
    assert step < STEPS
    saved = ckpt.complete_checkpoints(tmp_path / "runs" / "t.work")
    assert [ckpt.checkpoint_step(p) for p in saved] == [step]

    again = run_job(argv, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [e["step"] for e in events(again.stdout) if e["event"] == "resume"] == [step]
    alone = [e for e in events(again.stdout) if e["event"] == "loading"]
    assert len(alone) == (precision == "bf16")
    metrics = read_run(tmp_path / "runs" / "t").metrics
    assert metrics.steps == STEPS and metrics.resumed_from_step == step
    assert [s for s, _ in metrics.loss] == list(range(1, STEPS + 1))
