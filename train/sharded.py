"""The adapter and its optimizer state, whole, when FSDP shards them.

The Trainer's FSDP checkpoints gather the whole model (a 70B base: 140 GB on rank 0's host, at
every checkpoint and inside torchrun's SIGTERM window) although only the adapter trains, and on
CPU (gloo) torch hands that state back still sharded. Here only the trainable parameters and
their optimizer state are gathered (all ranks take part: it is a collective), rank 0 writes
them, and loading hands each rank its shard again. Keys are parameter names, so a checkpoint
loads under any number of processes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from tuneship.infra.errors import TuneshipError


def full_tensor(tensor: Any) -> Any:
    """The whole tensor (FSDP may hold only this rank's shard of it)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(value: Any, param: Any) -> Any:
    """`value` (whole) placed as `param` is: this rank's shard under FSDP."""
    if isinstance(param, DTensor):
        value = value.to(param.device_mesh.device_type, param.dtype)
        return distribute_tensor(value, param.device_mesh, param.placements)
    return value.to(param.device, param.dtype)


def whole_on_cpu(value: Any) -> Any:
    return full_tensor(value.detach()).to("cpu", copy=True) if torch.is_tensor(value) else value


def trainable_state(model: Any) -> dict[str, Any]:
    """The trained parameters (the adapter), whole and on the CPU, on every rank."""
    return {
        name: whole_on_cpu(param) for name, param in model.named_parameters() if param.requires_grad
    }


def load_trainable(model: Any, state: dict[str, Any]) -> None:
    """Put trainable_state() back."""
    params = dict(model.named_parameters())
    unknown = [name for name in state if name not in params]
    if unknown:
        raise TuneshipError(f"saved adapter weights do not fit this model: {unknown[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(shard_like(value, params[name]))


def optimizer_state(model: Any, optimizer: Any) -> dict[str, Any]:
    """The optimizer's state and groups, whole, keyed by parameter name."""
    names = {id(param): name for name, param in model.named_parameters()}
    state, groups = {}, []
    for group in optimizer.param_groups:
        groups.append({k: v for k, v in group.items() if k != "params"})
        groups[-1]["params"] = [names[id(p)] for p in group["params"]]
        for param in group["params"]:
            if optimizer.state.get(param):
                state[names[id(param)]] = {
                    key: full_tensor(value).to("cpu", copy=True)
                    if torch.is_tensor(value)
                    else value
                    for key, value in optimizer.state[param].items()
                }
    return {"state": state, "param_groups": groups}


def load_optimizer_state(model: Any, optimizer: Any, saved: dict[str, Any]) -> None:
    params = dict(model.named_parameters())
    names = {id(param): name for name, param in params.items()}
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"], strict=True):
        if [names[id(p)] for p in group["params"]] != saved_group["params"]:
            raise TuneshipError("the checkpoint's optimizer state does not fit this model")
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    for name, values in saved["state"].items():
        param = params[name]
        # `step` stays a CPU scalar, as the optimizer keeps it
        optimizer.state[param] = {
            key: shard_like(value, param) if torch.is_tensor(value) and value.dim() else value
            for key, value in values.items()
        }
