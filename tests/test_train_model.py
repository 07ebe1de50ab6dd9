"""How the model is loaded for each setting (train/model.py): precision, 4-bit placement and
activation checkpointing under DDP and FSDP. Loading decisions that only matter on CUDA are
checked with the CUDA answers faked (the fakes say so)."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from pydantic import ValidationError

from tests.support import train_config, write_jsonl
from tuneship.train.model import load_model, rank_0_loads_alone
from tuneship.train.observe import Reporter
from tuneship.train.trainer import Context, fsdp_settings


def test_qlora_under_fsdp_checkpoints_activations_once(tmp_path, tiny_base, small_dataset):
    """FSDP wraps each block in activation checkpointing; HF's gradient checkpointing (turned
    on by prepare_model_for_kbit_training) must then be off, or every block recomputes twice."""
    cfg = train_config(
        tmp_path, tiny_base, small_dataset, qlora=True, gradient_checkpointing=True,
        distributed={"strategy": "fsdp"},
    )  # fmt: skip
    model = load_model(cfg, str(tiny_base), torch.float32, rank=0, world=2)
    ctx = Context(cfg, tmp_path / "work", 2, Reporter("json", is_main=True))
    assert fsdp_settings(ctx, model)["fsdp_config"]["activation_checkpointing"]
    assert not model.get_base_model().is_gradient_checkpointing

    one = load_model(cfg, str(tiny_base), torch.float32, rank=0, world=1)  # no FSDP: HF's, once
    assert one.get_base_model().is_gradient_checkpointing


class Loaded(Exception):
    """Stops load_model once from_pretrained has been called with its arguments."""


def test_qlora_loads_onto_each_process_own_gpu_with_4bit_weights_fsdp_leaves_whole(
    tmp_path, tiny_base, small_dataset, monkeypatch
):
    """CUDA faked (no GPU here): bitsandbytes quantizes on the device the model loads to, so every
    rank's 4-bit model must be placed on its own GPU (LOCAL_RANK), under FSDP as under DDP; and
    the 4-bit weights stay uint8, which accelerate leaves out of FSDP2's sharding (bf16-stored,
    FSDP2 corrupts them on CUDA: bitsandbytes issue 1945)."""
    import transformers

    seen = {}

    def from_pretrained(base, **kwargs):
        seen.update(kwargs)
        raise Loaded

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setenv("LOCAL_RANK", "3")
    for strategy in ("ddp", "fsdp"):
        cfg = train_config(
            tmp_path, tiny_base, small_dataset, qlora=True, distributed={"strategy": strategy}
        )
        seen.clear()
        with contextlib.suppress(Loaded):
            load_model(cfg, str(tiny_base), torch.bfloat16, rank=0, world=8)
        assert seen["device_map"] == {"": 3}, strategy
        assert seen["quantization_config"].bnb_4bit_quant_storage == torch.uint8, strategy


def test_rank_0_loads_alone_where_each_rank_would_convert_its_own_copy(
    tmp_path, tiny_base, small_dataset
):
    """The tiny base is stored in fp32: loaded as bf16, every rank would hold a converted copy;
    loaded as fp32, the ranks share its memory-mapped pages."""
    fsdp = train_config(tmp_path, tiny_base, small_dataset, distributed={"strategy": "fsdp"})
    base = str(tiny_base)
    assert rank_0_loads_alone(fsdp, base, torch.bfloat16, world=2)
    assert not rank_0_loads_alone(fsdp, base, torch.float32, world=2)
    assert not rank_0_loads_alone(fsdp, base, torch.float16, world=2)  # fp16 loads fp32
    assert not rank_0_loads_alone(fsdp, base, torch.bfloat16, world=1)
    ddp = fsdp.model_copy(update={"distributed": fsdp.distributed.model_copy(
        update={"strategy": "ddp"})})  # fmt: skip
    assert not rank_0_loads_alone(ddp, base, torch.bfloat16, world=2)
    qlora = fsdp.model_copy(update={"qlora": True})
    assert not rank_0_loads_alone(qlora, base, torch.bfloat16, world=2)
    forced = train_config(
        tmp_path, tiny_base, small_dataset,
        distributed={"strategy": "fsdp", "low_memory_loading": True},
    )  # fmt: skip
    assert rank_0_loads_alone(forced, base, torch.float32, world=2)

    replay = write_jsonl(tmp_path / "replay.jsonl", [])
    sources = [{"path": str(small_dataset)}, {"path": str(replay), "distill": True}]
    distilled = train_config(tmp_path, tiny_base, sources, distributed={"strategy": "fsdp"})
    assert not rank_0_loads_alone(distilled, base, torch.bfloat16, world=2)  # teacher first
    with pytest.raises(ValidationError, match="low_memory_loading: distill sources"):
        train_config(
            tmp_path, tiny_base, sources,
            distributed={"strategy": "fsdp", "low_memory_loading": True},
        )  # fmt: skip


def test_cpu_workers_under_torchrun_share_the_cores_instead_of_one_thread_each(monkeypatch):
    """torchrun gives every worker OMP_NUM_THREADS=1 when there are several: right beside GPUs,
    an eighth of a 16-core machine for two CPU workers. tuneship-torchrun splits the cores."""
    from tuneship.train import torchrun

    assert torchrun.cpu_threads_per_worker(16, 2) == 8
    assert torchrun.cpu_threads_per_worker(2, 4) == 1 and torchrun.cpu_threads_per_worker(3, 1) == 3
    seen = {}
    monkeypatch.setenv("OMP_NUM_THREADS", "0")  # recorded, so the value main() sets is undone
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr("torch.distributed.run.run", lambda args: seen.update(os.environ))
    assert torchrun.main(["--nproc-per-node", "2", "-m", "tuneship", "train"]) == 0
    assert seen["OMP_NUM_THREADS"] == "8"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the operator's choice stands
    assert torchrun.main(["--nproc-per-node", "2", "-m", "tuneship", "train"]) == 0
    assert seen["OMP_NUM_THREADS"] == "3"
