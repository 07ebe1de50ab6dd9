"""`tuneship train` under torchrun: 2 CPU processes with the gloo backend, DDP and FSDP."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from tests.support import (
    TORCHRUN,
    TUNESHIP,
    build_tokenizer,
    run_job,
    sharegpt,
    write_config,
    write_jsonl,
)
from tuneship.handoff.manifest import read_run

pytestmark = pytest.mark.processes


def torchrun(cfg_path: Path, *extra: str, timeout: float = 300, env: dict | None = None) -> None:
    done = run_job([*TORCHRUN, "train", "--config", str(cfg_path), *extra], timeout, env)
    assert done.returncode == 0, done.stderr[-3000:]


def adapter(run_dir: Path) -> dict:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


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
    ddp, fsdp = adapter(tmp_path / "runs" / "ddp"), adapter(tmp_path / "runs" / "fsdp")
    assert ddp.keys() == fsdp.keys() and len(ddp) == 2 * 7 * 2  # A and B, 7 linears, 2 layers
    assert all((ddp[k] - fsdp[k]).abs().max() < 1e-5 for k in ddp)
    assert any(ddp[k].abs().max() > 0 for k in ddp if "lora_B" in k)  # B started at zero


def test_qlora_under_fsdp_learns_the_same_adapter_as_under_ddp(tmp_path, tiny_base, small_dataset):
    """The 4-bit weights stay whole under FSDP (model.py), and the adapter is DDP's. With them
    stored as bfloat16 and sharded this held on CPU as well: the corruption bitsandbytes issue
    1945 reports (FSDP2 rewriting NaN bit patterns of packed NF4 pairs) is on CUDA, not here."""
    cfg_path = write_config(
        tmp_path, tiny_base, small_dataset, name="ddp", batch_size=2, max_steps=6, qlora=True
    )
    torchrun(cfg_path)
    torchrun(cfg_path, "--set", "name=fsdp", "--set", "distributed.strategy=fsdp")
    runs = tmp_path / "runs"
    assert read_run(runs / "fsdp").metrics.distributed == "fsdp"
    assert read_run(runs / "fsdp").device.qlora
    ddp, fsdp = adapter(runs / "ddp"), adapter(runs / "fsdp")
    assert ddp.keys() == fsdp.keys()
    worst = max((ddp[k] - fsdp[k]).abs().max().item() for k in ddp)
    assert worst < 1e-4, f"adapters differ by up to {worst}"
    assert dict(read_run(runs / "ddp").metrics.loss) == pytest.approx(
        dict(read_run(runs / "fsdp").metrics.loss), abs=1e-3
    )


SLOW_BASE_HASH = """
import time
import tuneship.infra.fsutil as fsutil
hash_tree = fsutil.hash_tree
def slow_hash_tree(path, *args, **kwargs):
    if str(path) == {base!r}:  # the base's weights, 140 GB on network storage
        time.sleep({seconds})
    return hash_tree(path, *args, **kwargs)
fsutil.hash_tree = slow_hash_tree
"""


def hooked(tmp_path: Path, code: str) -> dict:
    """An environment whose every Python process (torchrun's workers too) runs `code` first
    (as sitecustomize)."""
    hooks = tmp_path / "hooks"
    hooks.mkdir(parents=True)
    (hooks / "sitecustomize.py").write_text(code)
    return os.environ | {
        "PYTHONPATH": os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")])
    }


def test_rank_0_hashing_the_base_for_longer_than_the_timeout_fails_no_rank(
    tmp_path, tiny_base, small_dataset
):
    """After training, rank 0 alone hashes the base weights for run.json; the other ranks used
    to wait for it in a barrier, and a hash longer than distributed.timeout_s failed the run."""
    env = hooked(tmp_path, SLOW_BASE_HASH.format(base=str(tiny_base), seconds=30))
    cfg_path = write_config(tmp_path, tiny_base, small_dataset, name="slow", max_steps=2)
    torchrun(cfg_path, "--set", "distributed.timeout_s=15", env=env)
    assert read_run(tmp_path / "runs" / "slow").base.weights_sha256


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_distillation_with_one_rank_distilling_and_the_other_not(tmp_path, tiny_base, strategy):
    """One distilled and one plain conversation, one per rank per step: every step, rank 0 or
    rank 1 alone holds a distilled row (a teacher pass inside the step hung both strategies; the
    targets are now computed before training). The result must be the 1-process run on both
    rows."""
    replay = write_jsonl(tmp_path / "replay.jsonl", [sharegpt(("human", "Hi?"), ("gpt", "Hello!"))])
    domain = write_jsonl(
        tmp_path / "domain.jsonl", [sharegpt(("human", "Policy 7?"), ("gpt", "It says $70."))]
    )
    data = [{"path": str(replay), "distill": True}, {"path": str(domain)}]
    settings = {"max_steps": 4, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
    cfg_path = write_config(
        tmp_path, tiny_base, data, name=strategy, batch_size=1,
        distributed={"strategy": strategy}, **settings,
    )  # fmt: skip
    torchrun(cfg_path, timeout=240)
    single = write_config(tmp_path, tiny_base, data, name="single", batch_size=2, **settings)
    subprocess.run([TUNESHIP, "train", "--config", str(single)], check=True, capture_output=True)

    two, one = adapter(tmp_path / "runs" / strategy), adapter(tmp_path / "runs" / "single")
    assert two.keys() == one.keys()
    assert all((two[k] - one[k]).abs().max() < 1e-5 for k in one)
    assert any(one[k].abs().max() > 0 for k in one if "lora_B" in k)


def test_keep_best_under_fsdp_keeps_the_same_adapter_as_ddp(tmp_path, tiny_base, small_dataset):
    """The best-adapter snapshot under FSDP: gathered from the shards, written by rank 0 into
    the checkpoints, and put back at the end; the result is DDP's. (Before the fix rank 0
    wrote its shards and crashed at the first checkpoint after an eval.)"""
    # a learning rate that grows to the end overshoots: the best eval comes early, so the
    # snapshot outlives two checkpoints and putting it back changes the adapter
    settings = {
        "batch_size": 2, "max_steps": 8, "eval_fraction": 0.3, "eval_steps": 2,
        "keep_best": True, "checkpoint_steps": 3, "learning_rate": 0.5, "warmup_steps": 8,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
    }  # fmt: skip
    for strategy in ("ddp", "fsdp"):
        cfg_path = write_config(
            tmp_path, tiny_base, small_dataset, name=strategy,
            distributed={"strategy": strategy}, **settings,
        )  # fmt: skip
        torchrun(cfg_path, timeout=240)
    ddp, fsdp = read_run(tmp_path / "runs" / "ddp"), read_run(tmp_path / "runs" / "fsdp")
    assert fsdp.metrics.distributed == "fsdp"  # sharded for real, not DDP in its place
    assert ddp.metrics.best.restored and fsdp.metrics.best.restored
    assert ddp.metrics.best.best_step == fsdp.metrics.best.best_step < 6
    assert abs(ddp.metrics.best.best_eval_loss - fsdp.metrics.best.best_eval_loss) < 1e-5
    one, two = adapter(tmp_path / "runs" / "ddp"), adapter(tmp_path / "runs" / "fsdp")
    assert one.keys() == two.keys()
    assert all(one[k].shape == two[k].shape and (one[k] - two[k]).abs().max() < 1e-5 for k in one)


PEAK_MEMORY_ONCE_SHARDED = """
import os, resource, sys
import accelerate.accelerator

prepare = accelerate.accelerator.fsdp2_prepare_model
def prepare_and_record(accelerator, model):
    model = prepare(accelerator, model)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open(os.path.join({folder!r}, "rank" + os.environ["RANK"]), "w") as out:
        out.write(str(peak_kib * 1024))
    return model
accelerate.accelerator.fsdp2_prepare_model = prepare_and_record
"""


def test_fsdp_loads_a_base_it_converts_on_rank_0_alone(tmp_path, small_dataset):
    """A base stored in fp32 and trained in bf16 used to be loaded and converted by every rank,
    each holding its own copy until FSDP sharded it (a 70B base: 140 GB a process). Now rank 0
    alone loads it and the others get their shards from it: rank 1's peak memory, once the model
    is sharded, drops by at least half the base, and it learns the same adapter."""
    base = tmp_path / "base"
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=512, intermediate_size=2048,
        num_hidden_layers=12, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=True,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(base)  # 47M parameters, 190 MB in fp32
    tokenizer.save_pretrained(base)
    base_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    peaks = {}
    for name, low_memory in (("whole", False), ("alone", None)):  # None: tuneship decides
        folder = tmp_path / name / "peaks"
        folder.mkdir(parents=True)
        cfg_path = write_config(
            tmp_path, base, small_dataset, name=name, batch_size=2, max_steps=2,
            precision="bf16", distributed={"strategy": "fsdp", "low_memory_loading": low_memory},
        )  # fmt: skip
        env = hooked(tmp_path / name, PEAK_MEMORY_ONCE_SHARDED.format(folder=str(folder)))
        torchrun(cfg_path, env=env)
        peaks[name] = {p.name: int(p.read_text()) for p in folder.iterdir()}
    whole, alone = peaks["whole"], peaks["alone"]
    assert whole.keys() == alone.keys() == {"rank0", "rank1"}
    saved = whole["rank1"] - alone["rank1"]
    assert saved > base_bytes / 2, f"rank 1 peaks at {whole} then {alone} (base {base_bytes})"
    runs = tmp_path / "runs"
    one, two = adapter(runs / "whole"), adapter(runs / "alone")
    assert all((one[k] - two[k]).abs().max() < 1e-5 for k in one)
