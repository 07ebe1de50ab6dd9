"""Preemption: atomic checkpoints, resume after SIGKILL, refusing what cannot be resumed."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time

import pytest

from tests.support import TUNESHIP, events, train_config, write_config
from tuneship.handoff.manifest import read_run
from tuneship.infra.errors import TuneshipError
from tuneship.train import checkpoints as ckpt
from tuneship.train.run import run


def start_and_kill_when(argv: list[str], ready, timeout_s: float = 120) -> None:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"


@pytest.mark.processes
def test_sigkill_after_a_checkpoint_resumes_there_and_finishes_once(
    tmp_path, tiny_base, small_dataset
):
    steps = 300
    cfg_path = write_config(
        tmp_path, tiny_base, small_dataset, max_steps=steps, checkpoint_steps=20,
        log_format="json",
    )  # fmt: skip
    work = tmp_path / "runs" / "t.work"
    argv = [TUNESHIP, "train", "--config", str(cfg_path)]
    start_and_kill_when(argv, lambda: bool(ckpt.complete_checkpoints(work)))
    assert not (tmp_path / "runs" / "t").exists()
    saved = ckpt.complete_checkpoints(work)
    resumed_at = ckpt.checkpoint_step(saved[-1])
    assert 20 <= resumed_at < steps and resumed_at % 20 == 0

    again = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    resume = [e for e in events(again.stdout) if e["event"] == "resume"]
    assert [e["step"] for e in resume] == [resumed_at]
    manifest = read_run(tmp_path / "runs" / "t")
    assert manifest.metrics.steps == steps
    assert manifest.metrics.resumed_from_step == resumed_at
    logged = [step for step, _ in manifest.metrics.loss]
    assert logged == list(range(1, steps + 1))  # every step once: none lost, none doubled
    adapters = list((tmp_path / "runs").rglob("adapter_model.safetensors"))
    assert adapters == [tmp_path / "runs" / "t" / "adapter" / "adapter_model.safetensors"]
    assert not work.exists()

    # the resumed run continues the interrupted one: same losses as a run never killed
    shutil.rmtree(tmp_path / "runs")
    subprocess.run(argv, check=True, capture_output=True, timeout=300)
    uninterrupted = dict(read_run(tmp_path / "runs" / "t").metrics.loss)
    after = [(s, loss) for s, loss in manifest.metrics.loss if s > resumed_at]
    assert after and all(abs(loss - uninterrupted[s]) < 1e-3 for s, loss in after), after


@pytest.mark.processes
def test_killed_before_any_checkpoint_starts_from_zero(tmp_path, tiny_base, small_dataset):
    cfg_path = write_config(
        tmp_path, tiny_base, small_dataset, max_steps=30, checkpoint_steps=1000,
        log_format="json",
    )  # fmt: skip
    work = tmp_path / "runs" / "t.work"
    argv = [TUNESHIP, "train", "--config", str(cfg_path)]
    start_and_kill_when(argv, lambda: (work / ckpt.PLAN).is_file())
    assert not ckpt.complete_checkpoints(work)
    again = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert not [e for e in events(again.stdout) if e["event"] == "resume"]
    metrics = read_run(tmp_path / "runs" / "t").metrics
    assert metrics.steps == 30 and metrics.resumed_from_step is None


def test_half_written_checkpoints_are_never_resumed(tmp_path):
    work = tmp_path / "t.work"
    good = work / ckpt.COMPLETE / "checkpoint-10"
    good.mkdir(parents=True)
    (good / "trainer_state.json").write_text("{}")
    (work / ckpt.COMPLETE / "checkpoint-30").mkdir()  # no trainer state: not complete
    (work / ckpt.INCOMING / "checkpoint-20").mkdir(parents=True)  # killed while writing
    plan = {"config": {"lr": 1}, "data_sha256": {}}
    assert ckpt.resume_point(work, plan, restart=False, is_main=True) == good
    assert not (work / ckpt.INCOMING).exists()


def test_changed_settings_refuse_to_resume_unless_restarted(tmp_path, tiny_base, small_dataset):
    work = tmp_path / "runs" / "t.work"
    plan = {"config": {"learning_rate": 1.0}, "data_sha256": {}}
    ckpt.resume_point(work, plan, restart=False, is_main=True)
    (work / ckpt.COMPLETE / "checkpoint-5").mkdir(parents=True)
    changed = {"config": {"learning_rate": 2.0}, "data_sha256": {}}
    with pytest.raises(TuneshipError, match=r"learning_rate: 1.0 -> 2.0.*--restart"):
        ckpt.resume_point(work, changed, restart=False, is_main=True)
    assert ckpt.resume_point(work, changed, restart=True, is_main=True) is None


def test_unwritable_or_full_output_fails_before_training(
    tmp_path, tiny_base, small_dataset, monkeypatch
):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the output folder should be")
    with pytest.raises(TuneshipError, match="cannot write to the output folder"):
        run(train_config(tmp_path, tiny_base, small_dataset, output_dir=str(blocker / "runs")))

    # A full disk cannot be produced safely here; the free-space figure is faked.
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda _p: usage._replace(free=1024))
    with pytest.raises(TuneshipError, match=r"only 0 MiB free under .*needs about"):
        run(train_config(tmp_path, tiny_base, small_dataset))
    assert not (tmp_path / "runs" / "t").exists()


@pytest.mark.processes
def test_sigterm_checkpoints_the_current_step_and_exits_143(tmp_path, tiny_base, small_dataset):
    cfg_path = write_config(
        tmp_path, tiny_base, small_dataset, max_steps=400, checkpoint_steps=1000,
        log_format="json",
    )  # fmt: skip
    argv = [TUNESHIP, "train", "--config", str(cfg_path)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait until training is under way
        if '"train_log"' in line and json.loads(line)["step"] >= 7:
            break
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-2000:]
    preempted = [e for e in events(stdout) if e["event"] == "preempted"]
    assert len(preempted) == 1 and "run the same command to resume" in stderr
    saved = ckpt.complete_checkpoints(tmp_path / "runs" / "t.work")
    assert [ckpt.checkpoint_step(p) for p in saved] == [preempted[0]["step"]]
    assert not (tmp_path / "runs" / "t").exists()

    again = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert [e["step"] for e in events(again.stdout) if e["event"] == "resume"] == [
        preempted[0]["step"]
    ]
    assert read_run(tmp_path / "runs" / "t").metrics.steps == 400


def test_tuneship_torchrun_passes_on_preemption_only():
    from tuneship.train.torchrun import PREEMPTED, preempted

    assert PREEMPTED == 143
    assert preempted({143}) and preempted({143, -signal.SIGTERM})  # one rank killed while leaving
    assert not preempted({143, 1}) and not preempted({1}) and not preempted(set())
