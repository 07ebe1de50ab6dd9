"""How the model is loaded for each setting (train/model.py): precision, 4-bit placement and
activation checkpointing under DDP and FSDP. Loading decisions that only matter on CUDA are
checked with the CUDA answers faked (the fakes say so)."""

from __future__ import annotations

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
