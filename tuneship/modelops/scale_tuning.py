"""Scale tuning after GPTQ: every group keeps the 4-bit integers GPTQ rounded it to, and only the
group scales (16-bit numbers stored beside them) are tuned, by gradient descent, so that the 4-bit
model's next-token distributions on the calibration sample's assistant tokens come closer to the
16-bit model's (KL divergence). GPTQ fits each layer to its own outputs, one at a time; a decision
that hangs on a few logits (which function to call, a city's first token) drifts through all of
them. Tuning the scales end to end pulls it back, and the bundle keeps its format and size: the
same integers, other scales (the idea of PEQA and EfficientQAT's last step)."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneship.chat.labels import IGNORE
from tuneship.handoff.manifest import ScaleTuningInfo
from tuneship.infra.errors import TuneshipError

if TYPE_CHECKING:
    import torch


@dataclass
class TunedLayer:
    """One quantized layer during tuning: its integers less the zero point, fixed, and the log of
    how far each group's scale moves (0: GPTQ's scale)."""

    module: Any
    offsets: torch.Tensor  # (q - zero point) per weight, int8
    group_size: int
    scale: torch.Tensor  # GPTQ's scales, fp32
    log_gain: torch.Tensor  # trained
    step_weight: Any = None  # this step's weight in the model's dtype, what forward uses
    step_grad: Any = None  # its gradient summed over the step's conversations, fp32

    def weight(self) -> torch.Tensor:
        import torch

        gains = self.scale * torch.exp(self.log_gain)
        return self.offsets.to(gains.dtype) * gains.repeat_interleave(self.group_size, 1)

    def begin_step(self) -> torch.Tensor:
        """Dequantize the weight once for a whole optimizer step (the scales do not change
        within one): forward passes use it as a leaf whose gradients add up in fp32; returns
        the weight still tied to log_gain, for the step's end (tune_scales)."""
        import torch

        weight = self.weight()
        self.step_weight = weight.detach().to(self.module.weight.dtype).requires_grad_()
        self.step_grad = torch.zeros_like(weight)

        def add_up(leaf: torch.Tensor) -> None:
            if leaf.grad is not None:
                self.step_grad.add_(leaf.grad.float())
                leaf.grad = None

        self.step_weight.register_post_accumulate_grad_hook(add_up)
        return weight


def quantized_layers(model: torch.nn.Module) -> list[TunedLayer]:
    """The linear layers GPTQ quantized (they carry weight_scale), with the integers of each
    weight read back from GPTQ's rounded weights. Experts stored as 3D tensors keep GPTQ's
    scales."""
    import torch

    layers = []
    module: Any  # llm-compressor's attributes on torch's modules
    for module in model.modules():
        scale = getattr(module, "weight_scale", None)
        weight = getattr(module, "weight", None)
        if scale is None or weight is None or weight.dim() != 2 or scale.dim() != 2:
            continue
        bits = module.quantization_scheme.weights.num_bits
        low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        scale = scale.data.float()
        group_size = module.weight.shape[1] // scale.shape[1]
        zero = getattr(module, "weight_zero_point", None)
        zero = zero.data.float() if zero is not None else torch.zeros_like(scale)
        scales, zeros = (t.repeat_interleave(group_size, 1) for t in (scale, zero))
        q = (torch.round(module.weight.data.float() / scales) + zeros).clamp(low, high)
        layers.append(
            TunedLayer(
                module=module,
                offsets=(q - zeros).to(torch.int8),
                group_size=group_size,
                scale=scale,
                log_gain=torch.zeros_like(scale, requires_grad=True),
            )
        )
    return layers


def assistant_kl(
    model: torch.nn.Module, teacher: torch.nn.Module, input_ids: list[int], labels: list[int]
) -> torch.Tensor:
    """Mean KL(teacher || model) over the positions that predict an assistant token; only those
    positions' logits are computed (logits_to_keep), the vocabulary being most of the cost."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device  # where GPTQ left the model
    ids = torch.tensor([input_ids], device=device)
    keep = torch.tensor([i for i, label in enumerate(labels[1:]) if label != IGNORE], device=device)
    with torch.no_grad():
        target = F.log_softmax(teacher(ids, logits_to_keep=keep).logits[0].float(), -1)
    student = F.log_softmax(model(ids, logits_to_keep=keep).logits[0].float(), -1)
    return F.kl_div(student, target, log_target=True, reduction="batchmean")


def mean_kl(
    model: torch.nn.Module, teacher: torch.nn.Module, examples: list[tuple[list[int], list[int]]]
) -> float:
    """KL(teacher || model) per assistant token over the examples (input ids, labels)."""
    import torch

    total, tokens = 0.0, 0
    with torch.no_grad():
        for input_ids, labels in examples:
            n = sum(label != IGNORE for label in labels[1:])
            if n:
                total += assistant_kl(model, teacher, input_ids, labels).item() * n
                tokens += n
    return total / max(tokens, 1)


def tune_scales(
    model: torch.nn.Module,
    teacher_dir: Path,
    examples: list[tuple[list[int], list[int]]],
    epochs: float,
    learning_rate: float,
    seed: int,
    dtype: torch.dtype,
    batch: int,
) -> ScaleTuningInfo:
    """Tune the group scales of a GPTQ-quantized model (llm-compressor's, frozen, before saving)
    toward the 16-bit model in teacher_dir, `batch` conversations (input ids, labels) a step: one
    conversation's gradient is mostly noise, and Adam would take a full step on it. Write the
    tuned scales and the weights they give back into the model, ready to compress."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    examples = [ex for ex in examples if any(label != IGNORE for label in ex[1][1:])]
    if not examples:
        raise TuneshipError(
            "scale tuning: no calibration conversation has an assistant token within "
            "calibration_max_length; raise it, or set scale_tuning_epochs: 0"
        )
    device = next(model.parameters()).device
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=dtype).eval()
    torch.nn.Module.to(teacher, device)  # nn.Module's `to`: see gptq.quantize
    layers = quantized_layers(model)
    wrapped = {id(layer.module): layer.module.forward for layer in layers}
    for param in model.parameters():
        param.requires_grad_(False)
    for layer in layers:
        layer.module.forward = tuned_forward(layer)
    draws_total = math.ceil(epochs * len(examples))
    steps = math.ceil(draws_total / batch)
    optimizer = torch.optim.Adam([layer.log_gain for layer in layers], lr=learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    order = random.Random(seed)
    draws: list[tuple[list[int], list[int]]] = []
    while len(draws) < draws_total:  # each epoch a fresh order of the whole sample
        epoch = list(examples)
        order.shuffle(epoch)
        draws += epoch
    draws = draws[:draws_total]
    started = time.monotonic()
    losses = []
    try:
        with tqdm(total=len(draws), desc="tuning the 4-bit scales", unit="chat") as progress:
            for first in range(0, len(draws), batch):
                weights = [layer.begin_step() for layer in layers]
                for input_ids, labels in draws[first : first + batch]:
                    loss = assistant_kl(model, teacher, input_ids, labels)
                    (loss / batch).backward()
                    losses.append(loss.item())
                    progress.update()
                    progress.set_postfix(kl=f"{sum(losses[-16:]) / len(losses[-16:]):.4f}")
                # the step's summed gradient through the dequantization once, into log_gain
                torch.autograd.backward(weights, [layer.step_grad for layer in layers])
                optimizer.step()
                optimizer.zero_grad()
                schedule.step()
    finally:
        for layer in layers:
            layer.module.forward = wrapped[id(layer.module)]
            layer.step_weight = layer.step_grad = None
    with torch.no_grad():
        for layer in layers:
            weight = layer.weight()
            layer.module.weight_scale.data = (layer.scale * torch.exp(layer.log_gain)).to(
                layer.module.weight_scale.dtype
            )
            layer.module.weight.data = weight.to(layer.module.weight.dtype)
    gains = torch.cat([layer.log_gain.detach().flatten() for layer in layers]).exp()
    window = max(1, min(16, len(losses) // 4))
    return ScaleTuningInfo(
        epochs=epochs,
        learning_rate=learning_rate,
        steps=steps,
        kl_first=round(sum(losses[:window]) / window, 5) if losses else None,
        kl_last=round(sum(losses[-window:]) / window, 5) if losses else None,
        largest_change=round(float((gains - 1).abs().max()), 4) if len(gains) else 0.0,
        seconds=round(time.monotonic() - started, 1),
    )


def tuned_forward(layer: TunedLayer):
    import torch.nn.functional as F

    def forward(x):
        return F.linear(x, layer.step_weight.to(x.dtype), layer.module.bias)

    return forward
