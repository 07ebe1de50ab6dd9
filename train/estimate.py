"""Will it fit? Peak GPU memory per device for a training config, from the base model's
config.json alone: the model is built on the meta device (no weights read, none allocated), so
its parameters and layer shapes are exact for any architecture transformers knows; memory then
follows from what each part is stored as while training.

The parts, per GPU:
- weights: at the load dtype (bf16; fp32 for fp16 runs, which train under autocast). QLoRA: the
  decoder blocks' linear layers in NF4 with double-quantized scales (~0.516 bytes a parameter);
  everything else in fp32, because peft's prepare_model_for_kbit_training upcasts it (a 128k
  vocabulary's embedding and output layer: 4 GB for 8B). FSDP divides them by the GPUs and
  gathers two blocks whole at a time (the one running, the one prefetched); QLoRA's 4-bit
  weights it leaves whole on every GPU (model.py says why).
- LoRA: fp32 weights, their gradients and two AdamW moments, 16 bytes a parameter (FSDP:
  divided by the GPUs).
- activations at batch_size x max_length tokens (the longest micro-batch, packed or padded):
  what each block saves for the backward pass. Without checkpointing every block's; with it,
  each block's input plus one block recomputed and its gradients. The count is a Llama-style
  block (attention over all heads, gated MLP, RMSNorm in fp32, LoRA's input copies); other
  architectures get the same arithmetic as an approximation.
- the loss: one `loss_chunk` of logits (and the teacher's on distilled rows), or the whole
  batch's fp32 logits and their gradient when loss_chunk is 0.
- a fixed allowance for the CUDA context, cuBLAS/NCCL workspaces and allocator slack.

Step time (`step_time`), for a GPU of the table below, from three bounds taken per micro-batch:
- compute: matmul FLOPs at MATMUL_EFFICIENCY of the GPU's dense bf16 peak. Per token, the frozen
  base costs 2 FLOPs a weight forward and 2 backward (the gradient of the input only: its
  weights get none), 2 more recomputing the blocks under checkpointing; attention 2 x length x
  hidden a layer forward (causal: half the scores), twice that backward; LoRA 6 a parameter.
  The output layer counts on every token (the loss applies it to the trained ones only: an
  upper bound).
- memory: every weight read once a pass (forward, backward, the recompute), at the GPU's
  bandwidth; QLoRA also writes and reads each weight dequantized to 16 bits.
- communication: FSDP gathers the sharded weights twice a micro-batch (forward and backward)
  over one node's NVLink (PCIe cards: their PCIe link); DDP all-reduces LoRA's gradients once a
  step. FSDP overlaps it with compute, so the step takes the largest of the three bounds.
Nodes linked by a network slower than NVLink make FSDP's gathers slower than this says.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from tuneship.config.schema import TrainConfig
from tuneship.infra.errors import TuneshipError

from .targets import decoder_blocks, resolve

GiB = 2**30
# NF4: 4 bits a weight, an 8-bit scale per 64 weights, an fp32 scale per 256 of those
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
ADAM_LORA_BYTES = 4 * 4  # fp32 weight, gradient, two moments
RUNTIME_BYTES = 1 * GiB  # CUDA context, workspaces, allocator slack: measured ~0.6-1 GiB
# A Trainer step of LoRA reaches 35-50% of the dense peak in published runs; not yet measured
# here (scripts/gpu_check.py prints the estimate beside what a GPU does)
MATMUL_EFFICIENCY = 0.4


@dataclass(frozen=True)
class Gpu:
    """Datasheet figures: dense bf16 FLOP/s (no sparsity), memory and its bandwidth, and the
    bandwidth one GPU has to the others of its node (one direction)."""

    memory: int
    bf16_flops: float
    bandwidth: float
    link: float


GB = 10**9
GPUS = {
    "H200": Gpu(141 * GB, 989e12, 4800 * GB, 450 * GB),
    "H100": Gpu(80 * GiB, 989e12, 3350 * GB, 450 * GB),  # SXM
    "H100-PCIE": Gpu(80 * GiB, 756e12, 2000 * GB, 32 * GB),
    "A100-80GB": Gpu(80 * GiB, 312e12, 2039 * GB, 300 * GB),  # SXM
    "A100-40GB": Gpu(40 * GiB, 312e12, 1555 * GB, 300 * GB),
    "L40S": Gpu(48 * GiB, 362e12, 864 * GB, 32 * GB),
    "A10G": Gpu(24 * GiB, 70e12, 600 * GB, 16 * GB),  # AWS g5
    "A10": Gpu(24 * GiB, 125e12, 600 * GB, 32 * GB),
    "L4": Gpu(24 * GiB, 121e12, 300 * GB, 32 * GB),
    "RTX4090": Gpu(24 * GiB, 165e12, 1008 * GB, 32 * GB),
}


@dataclass(frozen=True)
class Shape:
    """What the estimate needs to know about the base model."""

    parameters: int
    block_parameters: int  # the largest decoder block
    block_linear_parameters: int  # in all blocks: the ones QLoRA stores in 4 bits
    largest_linear: int
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    lora_parameters: int
    lora_inputs: int  # summed input widths of one block's LoRA targets (dropout copies them)
    lora_targets: int  # per block
    lora_names: dict[str, list[str]] = field(default_factory=dict)  # resolved (targets.py)


def model_shape(base: str, cfg: TrainConfig) -> Shape:
    """The base's shape from its config.json, with cfg's LoRA targets counted on it."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # from_pretrained ties; on the meta device from_config leaves them apart
    blocks = decoder_blocks(model)
    linears = [[m for m in block.modules() if isinstance(m, torch.nn.Linear)] for block in blocks]
    resolved = resolve(model, cfg.lora.target_modules)
    targets = set(resolved.modules)
    per_block = [
        [m for name, m in block.named_modules() if name.rsplit(".", 1)[-1] in targets]
        for block in blocks
    ]
    r = cfg.lora.r
    hidden = config.get_text_config().hidden_size
    return Shape(
        parameters=sum(p.numel() for p in model.parameters()),
        block_parameters=max(sum(p.numel() for p in b.parameters()) for b in blocks),
        block_linear_parameters=sum(m.weight.numel() for ms in linears for m in ms),
        largest_linear=max(m.weight.numel() for ms in linears for m in ms),
        layers=len(blocks),
        hidden=hidden,
        intermediate=getattr(config.get_text_config(), "intermediate_size", None) or 4 * hidden,
        vocab=model.get_output_embeddings().weight.shape[0],
        lora_parameters=sum(r * (m.in_features + m.out_features) for ms in per_block for m in ms),
        lora_inputs=max(sum(m.in_features for m in ms) for ms in per_block),
        lora_targets=max(len(ms) for ms in per_block),
        lora_names=resolved.record(),
    )


def block_bytes_per_token(shape: Shape, cfg: TrainConfig, e: int) -> int:
    """Bytes one decoder block saves for backward per token (e: bytes of the compute dtype)."""
    h, i = shape.hidden, shape.intermediate
    norms = 2 * 4 * h  # RMSNorm keeps its input in fp32, before attention and before the MLP
    attention = e * 5 * h  # normed input, q, k and v over all heads (GQA repeated), output
    mlp = e * (h + 4 * i)  # normed input, gate, up, act(gate), act(gate) * up
    lora = e * shape.lora_targets * cfg.lora.r
    # peft casts each target's input to the adapter's fp32, and autocast that back to a copy
    # in the compute dtype, which lora_A's backward keeps: one input copy per target
    lora += e * shape.lora_inputs
    if cfg.lora.dropout_for(experts_adapted=bool(shape.lora_names.get("parameters"))) > 0:
        lora += shape.lora_inputs * (e + 1)  # each target's dropped-out input, and its mask
    return norms + attention + mlp + lora


def estimate(
    shape: Shape, cfg: TrainConfig, gpus: int = 1, gpu_memory: int | None = None
) -> dict[str, Any]:
    """Peak memory per GPU, part by part, in bytes; `fits` when gpu_memory is known."""
    e = 4 if cfg.precision == "fp32" else 2  # auto: bf16 on the GPUs this is for
    fsdp = gpus > 1 and cfg.distributed.strategy == "fsdp"
    share = gpus if fsdp else 1
    if cfg.qlora:
        # the 4-bit weights are whole on every GPU, FSDP or not (model.py says why); the rest
        # (fp32) is sharded
        quantized = shape.block_linear_parameters
        weights = quantized * NF4_BYTES + (shape.parameters - quantized) * 4 / share
        weights += shape.largest_linear * e  # one weight dequantized for its matmul
    else:
        load = 4 if cfg.precision in ("fp32", "fp16") else 2
        block = shape.block_parameters * load
        weights = shape.parameters * load / share + (2 * block if fsdp else 0)

    tokens = cfg.batch_size * cfg.max_length
    per_block = block_bytes_per_token(shape, cfg, e) * tokens
    checkpointed = shape.layers * tokens * shape.hidden * e + 2 * per_block
    everything = shape.layers * per_block + per_block
    activations = checkpointed if cfg.gradient_checkpointing else everything

    distills = any(source.distill for source in cfg.data)
    if cfg.loss_chunk:
        rows = min(cfg.loss_chunk, tokens)
        logits = rows * shape.vocab * (e + 4) * (2 if distills else 1)
        logits += tokens * shape.hidden * e * (2 if distills else 1)  # the hidden states' grad
    else:
        logits = tokens * shape.vocab * (e + 4 + 4) * (2 if distills else 1)

    lora = shape.lora_parameters * ADAM_LORA_BYTES / share
    total = weights + lora + activations + logits + RUNTIME_BYTES
    return {
        "parameters": shape.parameters,
        "trainable_parameters": shape.lora_parameters,
        "gpus": gpus,
        "strategy": ("fsdp" if fsdp else "ddp") if gpus > 1 else None,
        "tokens_per_micro_batch": tokens,
        "weights": int(weights),
        "lora_and_optimizer": int(lora),
        "activations": int(activations),
        "activations_with_checkpointing": int(checkpointed),
        "activations_without_checkpointing": int(everything),
        "logits": int(logits),
        "runtime": RUNTIME_BYTES,
        "total": int(total),
        "gpu_memory": gpu_memory,
        "fits": None if gpu_memory is None else total <= gpu_memory,
    }


def step_time(shape: Shape, cfg: TrainConfig, gpus: int, gpu: Gpu) -> dict[str, Any]:
    """Seconds per optimizer step on `gpus` GPUs of kind `gpu` (the module docstring says what
    is counted), and the tokens per second that makes, at batch_size x max_length tokens a
    micro-batch (packed batches: exactly; padded ones: the longest they can be)."""
    e = 4 if cfg.precision == "fp32" else 2
    fsdp = gpus > 1 and cfg.distributed.strategy == "fsdp"
    recompute = 1 if cfg.gradient_checkpointing else 0
    tokens = cfg.batch_size * cfg.max_length
    output_layer = shape.vocab * shape.hidden
    per_token = (
        (4 + 2 * recompute) * shape.block_linear_parameters
        + 4 * output_layer
        + (6 + 2 * recompute) * shape.layers * cfg.max_length * shape.hidden
        + 6 * shape.lora_parameters
    )
    compute_s = per_token * tokens / (gpu.bf16_flops * MATMUL_EFFICIENCY)

    passes = 2 + recompute
    if cfg.qlora:
        quantized = shape.block_linear_parameters
        per_pass = quantized * (NF4_BYTES + 2 * e) + (shape.parameters - quantized) * 4
        gathered = (shape.parameters - quantized) * 4  # FSDP leaves the 4-bit weights whole
    else:
        per_pass = gathered = shape.parameters * e
    memory_s = passes * per_pass / gpu.bandwidth
    if fsdp:
        communication_s = 2 * gathered * (gpus - 1) / gpus / gpu.link
    elif gpus > 1:  # a ring all-reduce of the fp32 LoRA gradients, once a step
        communication_s = 2 * shape.lora_parameters * 4 * (gpus - 1) / gpus / gpu.link
        communication_s /= cfg.grad_accum
    else:
        communication_s = 0.0
    bounds = {"compute": compute_s, "memory": memory_s, "communication": communication_s}
    bound = max(bounds, key=bounds.__getitem__)
    step_s = bounds[bound] * cfg.grad_accum
    return {
        "step_s": round(step_s, 3),
        "tokens_per_s": round(tokens * cfg.grad_accum * gpus / step_s),
        "bound_by": bound,
        "matmul_efficiency": MATMUL_EFFICIENCY,
        **{f"{name}_s_per_micro_batch": round(value, 4) for name, value in bounds.items()},
    }


def gpu_named(name: str) -> str:
    """The table's name for `name` as a user writes it ('h100', 'A100 80GB')."""
    key = name.upper().replace(" ", "-").removeprefix("NVIDIA-").replace("-", "")
    found = {k.replace("-", ""): k for k in GPUS}.get(key)
    if found is None:
        raise TuneshipError(f"unknown GPU {name!r}; the estimate knows {', '.join(GPUS)}")
    return found


def detected_gpu() -> str | None:
    """The table's name for the GPU here (None: no GPU, or one the table lacks)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return gpu_of_device(torch.cuda.get_device_name(0))


def gpu_of_device(device: str) -> str | None:
    """'NVIDIA H100 80GB HBM3' -> 'H100', 'NVIDIA GeForce RTX 4090' -> 'RTX4090'."""
    words = re.split(r"[\s_-]+", device.upper())
    tokens = set(words) | {a + b for a, b in pairwise(words)}
    for name in sorted(GPUS, key=len, reverse=True):  # H100-PCIE before H100
        if set(name.split("-")) <= tokens:
            return name
    return None


def readable(result: dict[str, Any]) -> dict[str, Any]:
    """The estimate with sizes in GiB, for the dry run's report."""
    sizes = {
        "weights", "lora_and_optimizer", "activations", "activations_with_checkpointing",
        "activations_without_checkpointing", "logits", "runtime", "total", "gpu_memory",
    }  # fmt: skip
    return {
        (f"{k}_gib" if k in sizes else k): round(v / GiB, 2) if k in sizes and v else v
        for k, v in result.items()
    }


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'80GiB', '24GB', '81559MiB', '24G' (G: GiB, as nvidia-smi counts) -> bytes."""
    match = _SIZE.match(text)
    if not match:
        raise TuneshipError(f"cannot read the memory size {text!r} (e.g. 80GiB, 24GB)")
    number, unit = float(match.group(1)), (match.group(2) or "b").lower()
    if unit == "b":
        return int(number)
    power = "kmgt".index(unit[0]) + 1
    decimal = unit.endswith("b") and not unit.endswith("ib")
    return int(number * (1000**power if decimal else 1024**power))


def detected_gpu_memory() -> int | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory


def advice(result: dict[str, Any], cfg: TrainConfig) -> str:
    """What would make a config that does not fit fit."""
    ways = []
    if not cfg.gradient_checkpointing:
        ways.append("gradient_checkpointing: true")
    if not cfg.qlora:
        ways.append("qlora: true")
    if result["gpus"] > 1 and result["strategy"] != "fsdp":
        ways.append("distributed.strategy: fsdp")
    ways.append("a smaller batch_size (with grad_accum) or max_length")
    return (
        f"{result['total'] / GiB:.1f} GiB per GPU does not fit in "
        f"{result['gpu_memory'] / GiB:.1f} GiB; try {', '.join(ways)}"
    )


@dataclass(frozen=True)
class FitQuestion:
    """What `--dry-run` asks the estimate about: how many GPUs, of what memory and kind (each
    None: this launch's or this machine's)."""

    gpus: int | None = None
    gpu_memory: str | None = None
    gpu: str | None = None


def report(
    cfg: TrainConfig, gpus: int | None, gpu_memory: str | None, gpu: str | None = None
) -> dict[str, Any]:
    """The dry run's estimate for cfg: on `gpus` GPUs (default: this launch's WORLD_SIZE) of
    kind `gpu` (default: the GPU here, if the table has it) with `gpu_memory` each (default:
    that GPU's); a warning when it does not fit. Step time only for a GPU of the table."""
    import os
    import sys

    from .base import resolve_base

    gpus = gpus or int(os.environ.get("WORLD_SIZE", "1"))
    gpu = gpu_named(gpu) if gpu else detected_gpu()
    kind = GPUS[gpu] if gpu else None
    memory: int | None
    if gpu_memory:
        memory = parse_size(gpu_memory)
    else:
        memory = kind.memory if kind else detected_gpu_memory()
    shape = model_shape(resolve_base(cfg.base), cfg)
    fit = estimate(shape, cfg, gpus, memory)
    if fit["fits"] is False:
        print(f"warning: {advice(fit, cfg)}", file=sys.stderr)
    result = readable(fit)
    result["lora_targets"] = shape.lora_names
    if kind:
        result["gpu"] = gpu
        result["step_time"] = step_time(shape, cfg, gpus, kind)
    else:
        result["step_time"] = f"name the GPU (--gpu, one of {', '.join(GPUS)}) to estimate it"
    return result
