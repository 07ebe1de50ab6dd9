"""`tuneship train` under torchrun: 2 CPU processes with the gloo backend, DDP and FSDP."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.support import TUNESHIP, write_config
from tuneship.manifest import read_run

TORCHRUN = str(Path(sys.executable).parent / "torchrun")


pytestmark = pytest.mark.processes


def torchrun(cfg_path: Path, *extra: str) -> None:
    argv = [TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "tuneship", "train"]
    done = subprocess.run(
        [*argv, "--config", str(cfg_path), *extra], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_process_ddp_matches_one_process_and_writes_one_run(tmp_path, tiny_base, small_dataset):
    # 2 processes x 2 conversations per step = 1 process x 4 per step
    cfg_path = write_config(
        tmp_path, tiny_base, small_dataset, name="ddp", batch_size=2, max_steps=30,
        checkpoint_steps=10,
    )  # fmt: skip
    torchrun(cfg_path)
    single = write_config(
        tmp_path, tiny_base, small_dataset, name="single", batch_size=4, max_steps=30
    )
    subprocess.run([TUNESHIP, "train", "--config", str(single)], check=True, capture_output=True)

    ddp, one = read_run(tmp_path / "runs" / "ddp"), read_run(tmp_path / "runs" / "single")
    assert ddp.device.world_size == 2 and ddp.metrics.distributed == "ddp"
    assert one.device.world_size == 1
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["ddp", "single"]
    assert len(list((tmp_path / "runs").rglob("run.json"))) == 2  # rank 1 wrote nothing
    ddp_loss, one_loss = dict(ddp.metrics.loss), dict(one.metrics.loss)
    assert list(ddp_loss) == list(one_loss) == list(range(1, 31))
    # same data, seed and effective batch: the curves have the same shape (13 conversations do
    # not split evenly over 2 processes, so batches differ slightly; compare 5-step means) ...
    windows = [range(s, s + 5) for s in range(1, 31, 5)]
    ddp_means = [sum(ddp_loss[s] for s in w) / 5 for w in windows]
    one_means = [sum(one_loss[s] for s in w) / 5 for w in windows]
    assert max(abs(a - b) for a, b in zip(ddp_means, one_means, strict=True)) < 0.1
    # ... and both actually fall
    for losses in (ddp_loss, one_loss):
        assert sum(list(losses.values())[-5:]) < sum(list(losses.values())[:5]) - 0.5


def test_fsdp_shards_and_gathers_the_same_adapter_as_ddp(tmp_path, tiny_base, small_dataset):
    cfg_path = write_config(
        tmp_path, tiny_base, small_dataset, name="ddp", batch_size=2, max_steps=12
    )
    torchrun(cfg_path)
    torchrun(cfg_path, "--set", "name=fsdp", "--set", "distributed.strategy=fsdp")
    assert read_run(tmp_path / "runs" / "fsdp").metrics.distributed == "fsdp"
    ddp = load_file(tmp_path / "runs" / "ddp" / "adapter" / "adapter_model.safetensors")
    fsdp = load_file(tmp_path / "runs" / "fsdp" / "adapter" / "adapter_model.safetensors")
    assert ddp.keys() == fsdp.keys() and len(ddp) == 2 * 7 * 2  # A and B, 7 linears, 2 layers
    assert all((ddp[k] - fsdp[k]).abs().max() < 1e-5 for k in ddp)
    assert any(ddp[k].abs().max() > 0 for k in ddp if "lora_B" in k)  # B started at zero
