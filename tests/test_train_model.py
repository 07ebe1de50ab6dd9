"""How the model is loaded for each setting (train/model.py): precision, 4-bit placement and
activation checkpointing under DDP and FSDP. Loading decisions that only matter on CUDA are
checked with the CUDA answers faked (the fakes say so)."""

from __future__ import annotations

import contextlib

import torch

from tests.support import train_config
from tuneship.train.model import load_model
from tuneship.train.trainer import fsdp_settings


def test_qlora_under_fsdp_checkpoints_activations_once(tmp_path, tiny_base, small_dataset):
    """FSDP wraps each block in activation checkpointing; HF's gradient checkpointing (turned
    on by prepare_model_for_kbit_training) must then be off, or every block recomputes twice."""
    cfg = train_config(
        tmp_path, tiny_base, small_dataset, qlora=True, gradient_checkpointing=True,
        distributed={"strategy": "fsdp"},
    )  # fmt: skip
    model = load_model(cfg, str(tiny_base), torch.float32, world=2)
    assert fsdp_settings(cfg, 2, model)["fsdp_config"]["activation_checkpointing"]
    assert not model.get_base_model().is_gradient_checkpointing

    one = load_model(cfg, str(tiny_base), torch.float32, world=1)  # no FSDP: HF's, once
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
            load_model(cfg, str(tiny_base), torch.bfloat16, world=8)
        assert seen["device_map"] == {"": 3}, strategy
        assert seen["quantization_config"].bnb_4bit_quant_storage == torch.uint8, strategy
