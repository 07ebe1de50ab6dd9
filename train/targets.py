"""Which layers get LoRA adapters, resolved from the model itself.

`lora.target_modules: auto` (the default) adapts every linear layer of every decoder block,
whatever the family calls it (Llama's q_proj ... down_proj, Phi-3's fused qkv_proj and
gate_up_proj, OLMo's, Gemma's), and a mixture-of-experts block's experts where they are stored
as 3D tensors (peft's target_parameters: transformers 5 keeps Qwen3-MoE's and Mixtral's experts
that way). A router (the MoE gate that picks experts) is never adapted: a LoRA there changes
which experts run, and vLLM expects it in 16-bit. Nothing outside the blocks (embeddings,
lm_head) is adapted either. A list of names is taken as given, each checked to exist.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from tuneship.infra.errors import TuneshipError

if TYPE_CHECKING:
    from peft import PeftModel

ROUTER_NAMES = ("gate", "router", "shared_expert_gate")
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


@dataclass(frozen=True)
class LoraTargets:
    """Leaf names of the linear layers to adapt, and expert parameters (suffixes) to adapt."""

    modules: list[str]
    parameters: list[str] = field(default_factory=list)

    def record(self) -> dict[str, list[str]]:
        return {"modules": self.modules, "parameters": self.parameters}


def applied(peft_model: PeftModel) -> LoraTargets:
    """What a peft model adapts, as its LoRA config says (for run.json)."""
    config: Any = peft_model.peft_config["default"]  # a LoraConfig
    modules = config.target_modules or []
    parameters = getattr(config, "target_parameters", None) or []
    return LoraTargets(sorted(modules), sorted(parameters))


def decoder_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise TuneshipError(
            f"cannot find the decoder blocks of {type(model).__name__} (no _no_split_modules): "
            "set lora.target_modules to the layers to adapt"
        )
    return blocks


def experts_in(config: object) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return next(
        (getattr(text, k) for k in EXPERT_COUNT_KEYS if isinstance(getattr(text, k, None), int)),
        None,
    )


def is_router(name: str, module: torch.nn.Module, experts: int | None) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    if leaf not in ROUTER_NAMES or not isinstance(module, torch.nn.Linear):
        return False
    return module.out_features in ({experts} if experts else set()) | {1}


def resolve(model: torch.nn.Module, requested: list[str] | str) -> LoraTargets:
    """The targets for `requested` ('auto', or a list of leaf names) on this model."""
    if requested != "auto":
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [m for m in requested if m not in present]
        if missing:
            linear = sorted(resolve(model, "auto").modules)
            raise TuneshipError(
                f"lora.target_modules {missing} do not exist in this model; its linear layers: "
                f"{linear} (or set lora.target_modules: auto)"
            )
        return LoraTargets(list(requested))
    experts = experts_in(getattr(model, "config", None))
    modules: set[str] = set()
    parameters: set[str] = set()
    for block in decoder_blocks(model):
        for name, module in block.named_modules():
            if isinstance(module, torch.nn.Linear) and not is_router(name, module, experts):
                modules.add(name.rsplit(".", 1)[-1])
        for name, param in block.named_parameters():
            owner = name.rsplit(".", 1)[0] if "." in name else ""
            if param.dim() == 3 and owner.rsplit(".", 1)[-1] not in ROUTER_NAMES:
                parameters.add(name)
    if not modules and not parameters:
        raise TuneshipError(
            f"no linear layer in the decoder blocks of {type(model).__name__}: set "
            "lora.target_modules to the layers to adapt"
        )
    return LoraTargets(sorted(modules), sorted(parameters))
