"""The model to train: precision, the base loaded (16-bit, or 4-bit NF4 for QLoRA) with a LoRA
adapter on top, and the process-group settings it trains under."""

from __future__ import annotations

import os
from typing import Any

import torch
from accelerate import init_empty_weights
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig, set_seed

from tuneship.config.schema import TrainConfig
from tuneship.infra.errors import TuneshipError
from tuneship.modelops.precision import Capability, Precision, compute_precision

from .targets import LoraTargets, resolve


def pick_precision(requested: str) -> tuple[Precision, Capability, torch.dtype]:
    """The core rule on this machine (tuneship/modelops/precision.py)."""
    precision, machine = compute_precision(requested)
    return precision, machine, precision.torch_dtype


def load_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the weights load as: fp16 runs keep fp32 weights and train under autocast."""
    return torch.float32 if dtype == torch.float16 else dtype


def rank_0_loads_alone(cfg: TrainConfig, base: str, dtype: torch.dtype, world: int) -> bool:
    """Whether FSDP's low-memory loading applies (distributed.low_memory_loading). A checkpoint
    in the load dtype is memory-mapped: the ranks share its pages, so loading it whole on each
    costs no memory of its own; a converted one is a copy per rank. 4-bit weights are quantized
    by each rank onto its own GPU, shard file by shard file, and FSDP leaves them whole."""
    if world == 1 or cfg.distributed.strategy != "fsdp" or cfg.qlora:
        return False
    if cfg.distributed.low_memory_loading is not None:
        return cfg.distributed.low_memory_loading
    if any(source.distill for source in cfg.data):
        return False
    stored = getattr(AutoConfig.from_pretrained(base), "dtype", None)
    return stored is not None and stored != load_dtype(dtype)


def load_model(
    cfg: TrainConfig, base: str, dtype: torch.dtype, rank: int, world: int, alone: bool = False
) -> Any:
    """The base with its LoRA adapter, whole on each rank, or (alone: FSDP's low-memory
    loading) on rank 0 only: the other ranks' weights are allocated but never written until
    FSDP wraps the model and rank 0 broadcasts each rank its shard (trainer.fsdp_settings)."""
    set_seed(cfg.seed)  # the LoRA A matrices are drawn from the global RNG
    fsdp = world > 1 and cfg.distributed.strategy == "fsdp"
    kwargs: dict[str, Any] = {
        "dtype": load_dtype(dtype),
        "attn_implementation": cfg.attention,
    }
    if cfg.qlora:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,  # the run's precision: fp32 where bf16 is emulated
            # uint8 under FSDP too: accelerate then leaves the 4-bit weights out of fully_shard
            # (whole on every GPU, the rest sharded). Stored as bf16, FSDP2 shards them, and on
            # CUDA rewrites the NaN bit patterns some packed NF4 pairs form: other weights,
            # silently (bitsandbytes issue 1945, open for the pinned versions).
            bnb_4bit_quant_storage=torch.uint8,
        )
    if torch.cuda.is_available() and (cfg.qlora or (world > 1 and not fsdp)):
        # each process's own GPU: bitsandbytes quantizes on the device it loads to
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    if alone and rank != 0:
        # buffers stay real: FSDP keeps the ones the checkpoint lacks (rotary frequencies)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base), **kwargs)
        model.tie_weights()  # init_empty_weights re-registers each parameter, a tied one too
    else:
        model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    # no KV cache in training: it also disables transformers' packed-sequence masking
    model.config.use_cache = False
    targets = resolve(model, cfg.lora.target_modules)
    if cfg.qlora:
        # under FSDP, FSDP checkpoints each block's activations (trainer.fsdp_settings): HF's
        # gradient checkpointing on top would recompute every block twice
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing and not fsdp
        )
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=lora_dropout(cfg, targets),
        target_modules=targets.modules or None,
        target_parameters=targets.parameters or None,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    if alone and rank != 0:
        allocate_unwritten(model)
    return model


def lora_dropout(cfg: TrainConfig, targets: LoraTargets) -> float:
    try:
        return cfg.lora.dropout_for(experts_adapted=bool(targets.parameters))
    except ValueError as exc:
        raise TuneshipError(str(exc)) from None


def allocate_unwritten(model: Any) -> None:
    """Storage for each parameter still on the meta device, never written: the pages stay out
    of the process's memory until FSDP moves the model to meta for rank 0's broadcast. Meta
    parameters themselves will not do: accelerate finds each one's shard by its data_ptr, and on
    the meta device every data_ptr is 0 (the optimizer then steps one parameter only)."""
    for name, param in list(model.named_parameters()):  # a tied parameter once
        if param.is_meta:
            owner, _, leaf = name.rpartition(".")
            empty = torch.empty_like(param, device="cpu")
            setattr(
                model.get_submodule(owner),
                leaf,
                torch.nn.Parameter(empty, requires_grad=param.requires_grad),
            )
    model.get_base_model().tie_weights()


def checkpoint_bytes(model: Any) -> int:
    """Disk one checkpoint needs: trainable weights + two AdamW moments, all fp32."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable * 4 * 3
