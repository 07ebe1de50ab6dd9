"""The fit estimate (`tuneship train --dry-run`): from config.json alone, for the tiny test model
and for Llama-3-8B / 70B shapes (config.json written here: no hub, no weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from tests.support import REPO, tuneship, write_config
from tuneship.config.loading import load_config
from tuneship.config.schema import TrainConfig
from tuneship.infra.errors import TuneshipError
from tuneship.train.estimate import (
    GPUS,
    GiB,
    estimate,
    gpu_of_device,
    model_shape,
    parse_size,
    step_time,
)

LLAMA3 = {
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32},
    "70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
            "num_attention_heads": 64},
}  # fmt: skip


def llama3_base(tmp_path: Path, size: str) -> Path:
    folder = tmp_path / f"llama3-{size}"
    folder.mkdir()
    config = LLAMA3[size] | {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
        "num_key_value_heads": 8, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def shipped(name: str, base: Path, **overrides) -> TrainConfig:
    path = REPO / "train" / "configs" / f"{name}.yaml"
    return load_config(TrainConfig, path, {"base": str(base), **overrides})


@pytest.fixture(scope="module")
def llama8b(tmp_path_factory) -> Path:
    return llama3_base(tmp_path_factory.mktemp("bases"), "8b")


@pytest.fixture(scope="module")
def llama70b(tmp_path_factory) -> Path:
    return llama3_base(tmp_path_factory.mktemp("bases"), "70b")


def test_counts_llama3_8b_exactly_from_its_config(llama8b):
    cfg = shipped("llama3-8b-qlora-1gpu", llama8b)
    shape = model_shape(cfg.base, cfg)
    assert shape.parameters == 8_030_261_248  # Meta-Llama-3-8B's published count
    assert shape.layers == 32 and shape.vocab == 128256
    # r=16 on the 7 linears of 32 blocks: 16 x (in + out), summed
    per_block = 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))
    assert shape.lora_parameters == 32 * per_block


def test_the_shipped_8b_qlora_config_fits_one_24gb_gpu_and_16_bit_does_not(llama8b):
    """The config's comment says "QLoRA on one 24 GB GPU": the estimate must agree."""
    cfg = shipped("llama3-8b-qlora-1gpu", llama8b)
    shape = model_shape(cfg.base, cfg)
    fit = estimate(shape, cfg, gpus=1, gpu_memory=parse_size("24GB"))
    assert fit["fits"], fit
    # 4-bit blocks, but the fp32 embedding and output layer prepare_model_for_kbit_training
    # leaves: 2 x 128256 x 4096 x 4 bytes = 3.9 GiB of the weights
    assert 6 * GiB < fit["weights"] < 8.5 * GiB
    sixteen = cfg.model_copy(update={"qlora": False})
    assert not estimate(shape, sixteen, gpus=1, gpu_memory=parse_size("24GB"))["fits"]
    # without activation checkpointing, 8192 tokens of 32 blocks do not fit either
    no_ckpt = cfg.model_copy(update={"gradient_checkpointing": False})
    assert not estimate(shape, no_ckpt, gpus=1, gpu_memory=parse_size("24GB"))["fits"]


def test_the_shipped_8b_ddp_and_70b_fsdp_configs_fit_80gb_gpus(llama8b, llama70b):
    ddp = shipped("llama3-8b-lora-8gpu-ddp", llama8b)
    fit = estimate(model_shape(ddp.base, ddp), ddp, gpus=8, gpu_memory=80 * GiB)
    assert fit["fits"] and fit["strategy"] == "ddp", fit
    assert fit["weights"] == 8_030_261_248 * 2  # DDP: the whole bf16 model on every GPU

    fsdp = shipped("llama3-70b-qlora-fsdp", llama70b)
    shape = model_shape(fsdp.base, fsdp)
    assert shape.parameters == 70_553_706_496
    sharded = estimate(shape, fsdp, gpus=8, gpu_memory=80 * GiB)
    assert sharded["fits"] and sharded["strategy"] == "fsdp", sharded
    # on one 48 GB GPU (4-bit weights alone: ~41 GiB), or without checkpointing, it does not
    assert not estimate(shape, fsdp, gpus=1, gpu_memory=48 * 10**9)["fits"]
    no_ckpt = fsdp.model_copy(update={"gradient_checkpointing": False})
    assert not estimate(shape, no_ckpt, gpus=8, gpu_memory=80 * GiB)["fits"]


def test_the_loss_chunk_keeps_128k_vocabulary_logits_small(llama8b):
    cfg = shipped("llama3-8b-qlora-1gpu", llama8b)
    shape = model_shape(cfg.base, cfg)
    chunked = estimate(shape, cfg)["logits"]
    full = estimate(shape, cfg.model_copy(update={"loss_chunk": 0}))["logits"]
    assert chunked < GiB < 7 * GiB < full  # 8192 x 128256 x 10 bytes


def test_step_time_follows_the_llama3_8b_flops_and_the_gpu(llama8b):
    cfg = shipped("llama3-8b-qlora-1gpu", llama8b)
    shape = model_shape(cfg.base, cfg)
    h100 = step_time(shape, cfg, 1, GPUS["H100"])
    # 8B at 4 x 2048 tokens: about 6 FLOPs a weight a token with the recompute (the embedding
    # none, the output layer 4; attention adds some); compute-bound
    flops = 6 * 8.03e9 * cfg.batch_size * cfg.max_length * cfg.grad_accum
    assert h100["bound_by"] == "compute"
    assert 0.9 < h100["step_s"] / (flops / (989e12 * 0.4)) < 1.1
    # an A100 has a third of the H100's FLOP/s; an H200 the same, with faster memory
    a100 = step_time(shape, cfg, 1, GPUS["A100-80GB"])
    assert a100["step_s"] / h100["step_s"] == pytest.approx(989 / 312, rel=0.01)
    assert step_time(shape, cfg, 1, GPUS["H200"])["step_s"] == h100["step_s"]
    # the recompute costs a third more compute than without checkpointing
    plain = step_time(shape, cfg.model_copy(update={"gradient_checkpointing": False}), 1,
                      GPUS["H100"])  # fmt: skip
    assert 1.3 < h100["step_s"] / plain["step_s"] < 1.5


def test_step_time_under_ddp_scales_and_fsdp_waits_for_slow_links(llama8b):
    ddp = shipped("llama3-8b-lora-8gpu-ddp", llama8b)
    shape = model_shape(ddp.base, ddp)
    one, eight = step_time(shape, ddp, 1, GPUS["H100"]), step_time(shape, ddp, 8, GPUS["H100"])
    assert eight["tokens_per_s"] == pytest.approx(8 * one["tokens_per_s"], rel=0.01)
    # 16-bit FSDP gathers 16 GB twice a micro-batch: NVLink hides it behind the compute of
    # 1024 tokens, PCIe cards do not
    fsdp = ddp.model_copy(update={"batch_size": 1, "max_length": 1024, "distributed":
        ddp.distributed.model_copy(update={"strategy": "fsdp"})})  # fmt: skip
    assert step_time(shape, fsdp, 8, GPUS["H100"])["bound_by"] == "compute"
    slow = step_time(shape, fsdp, 8, GPUS["L40S"])
    assert slow["bound_by"] == "communication", slow


def test_gpu_names_as_cuda_reports_them():
    assert gpu_of_device("NVIDIA H100 80GB HBM3") == "H100"
    assert gpu_of_device("NVIDIA H100 PCIe") == "H100-PCIE"
    assert gpu_of_device("NVIDIA A100-SXM4-40GB") == "A100-40GB"
    assert gpu_of_device("NVIDIA GeForce RTX 4090") == "RTX4090"
    assert gpu_of_device("NVIDIA A10G") == "A10G"
    assert gpu_of_device("NVIDIA L40") is None  # not L4, not L40S: no step time


def test_sizes_read_as_written():
    assert parse_size("80GiB") == 80 * GiB
    assert parse_size("24GB") == 24 * 10**9
    assert parse_size("24G") == 24 * GiB
    assert parse_size("81559 MiB") == 81559 * 2**20
    with pytest.raises(TuneshipError, match="memory size"):
        parse_size("lots")


def test_dry_run_prints_the_estimate_for_the_tiny_model(tmp_path, tiny_base, small_dataset):
    cfg_path = write_config(tmp_path, tiny_base, small_dataset, batch_size=2, max_length=128)
    done = tuneship(
        "train", "--config", str(cfg_path), "--dry-run", "--gpu-memory", "2GiB", cwd=tmp_path
    )
    report = yaml.safe_load(done.stdout)
    fit = report["fit"]
    weights = load_file(tiny_base / "model.safetensors")  # tied: the embedding once
    assert fit["parameters"] == sum(v.numel() for v in weights.values())
    assert fit["tokens_per_micro_batch"] == 256 and fit["fits"] is True
    assert report["data"]["used"] > 0  # the data report is still there
    assert not (tmp_path / "runs").exists()  # nothing written, no weights loaded

    assert "--gpu" in fit["step_time"]  # no GPU here: it asks for one
    on_h100 = tuneship(
        "train", "--config", str(cfg_path), "--dry-run", "--gpu", "h100", cwd=tmp_path
    )
    h100 = yaml.safe_load(on_h100.stdout)["fit"]
    assert h100["gpu"] == "H100" and h100["gpu_memory_gib"] == 80
    assert h100["step_time"]["tokens_per_s"] > 0
    unknown = tuneship(
        "train", "--config", str(cfg_path), "--dry-run", "--gpu", "V100", cwd=tmp_path,
        check=False,
    )  # fmt: skip
    assert unknown.returncode != 0 and "unknown GPU 'V100'" in unknown.stderr

    small = tuneship(
        "train", "--config", str(cfg_path), "--dry-run", "--gpu-memory", "100MB", cwd=tmp_path
    )
    assert yaml.safe_load(small.stdout)["fit"]["fits"] is False
    assert "does not fit" in small.stderr and "gradient_checkpointing: true" in small.stderr
