"""The model to train: precision, the base loaded (16-bit, or 4-bit NF4 for QLoRA) with a LoRA
adapter on top, and the process-group settings it trains under."""

from __future__ import annotations

import os
from typing import Any

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, set_seed

from tuneship.config import TrainConfig
from tuneship.errors import TuneshipError


def pick_precision(requested: str) -> tuple[str, torch.dtype]:
    cuda = torch.cuda.is_available()
    if requested == "auto" and cuda:
        requested = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    elif requested == "auto":
        requested = "fp32"
    if requested in ("fp16",) and not cuda:
        raise TuneshipError("precision fp16 needs CUDA; use fp32 or bf16 on CPU")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[requested]
    return requested, dtype


def load_model(cfg: TrainConfig, base: str, dtype: torch.dtype, world: int) -> Any:
    set_seed(cfg.seed)  # the LoRA A matrices are drawn from the global RNG
    fsdp = world > 1 and cfg.distributed.strategy == "fsdp"
    kwargs: dict[str, Any] = {
        "dtype": torch.float32 if dtype == torch.float16 else dtype,
        "attn_implementation": cfg.attention,
    }
    if cfg.qlora:
        compute = torch.bfloat16 if dtype != torch.float16 else dtype
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
            # uint8 under FSDP too: accelerate then leaves the 4-bit weights out of fully_shard
            # (whole on every GPU, the rest sharded). Stored as bf16, FSDP2 shards them, and on
            # CUDA rewrites the NaN bit patterns some packed NF4 pairs form: other weights,
            # silently (bitsandbytes issue 1945, open for the pinned versions).
            bnb_4bit_quant_storage=torch.uint8,
        )
    if torch.cuda.is_available() and (cfg.qlora or (world > 1 and not fsdp)):
        # each process's own GPU: bitsandbytes quantizes on the device it loads to
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    # no KV cache in training: it also disables transformers' packed-sequence masking
    model.config.use_cache = False
    check_targets(cfg, model, base)
    if cfg.qlora:
        # under FSDP, FSDP checkpoints each block's activations (trainer.fsdp_settings): HF's
        # gradient checkpointing on top would recompute every block twice
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing and not fsdp
        )
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def check_targets(cfg: TrainConfig, model: Any, base: str) -> None:
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in cfg.lora.target_modules if m not in present]
    if missing:
        raise TuneshipError(
            f"lora.target_modules {missing} do not exist in {base}; "
            f"linear layers there: {sorted(n for n in present if n.endswith('proj'))}"
        )


def checkpoint_bytes(model: Any) -> int:
    """Disk one checkpoint needs: trainable weights + two AdamW moments, all fp32."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable * 4 * 3
