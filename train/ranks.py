"""The process group a run trains in (torchrun / accelerate launch), and what ranks agree on."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from tuneship.config.schema import TrainConfig


def rank_and_world() -> tuple[int, int]:
    """From the environment torchrun / accelerate launch set (1 process when absent)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def backend_for(cfg: TrainConfig) -> str:
    if cfg.distributed.backend != "auto":
        return cfg.distributed.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def agreed(flag: bool, device: Any) -> bool:
    """True on every rank when it is True on any (a no-op without a process group). Every rank
    must call it at the same point: it is a collective."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
