"""GPTQ W4A16 with llm-compressor: the export's quantization, also used by eval to put the base
model through a bundle's own recipe. Writes a compressed-tensors checkpoint vLLM loads."""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from tuneship.chat.records import Conversation
from tuneship.config.schema import ExportConfig
from tuneship.handoff.manifest import CalibrationInfo, QuantizationInfo
from tuneship.infra.errors import TuneshipError
from tuneship.modelops.calibration import calibration_rows, dataset_of, tuning_examples
from tuneship.modelops.scale_tuning import tune_scales

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

GROUP_SIZES = (128, 64, 32)
# mixture-of-experts routers, which vLLM loads in 16-bit (llm-compressor leaves them so too)
ROUTERS = ["re:.*mlp\\.gate$", "re:.*block_sparse_moe\\.gate$", "re:.*shared_expert_gate$"]


def pick_group_size(model: torch.nn.Module, requested: int | None) -> int:
    """The requested group size if it divides every quantized layer's input width, else the
    largest of GROUP_SIZES that does. Mixture-of-experts experts stored as 3D tensors
    [experts, out, in] count too: llm-compressor quantizes them as one linear layer each."""
    import torch

    widths = {
        module.in_features
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")
    }
    widths |= {param.shape[-1] for param in model.parameters() if param.dim() == 3}
    if requested is not None:
        bad = sorted(w for w in widths if w % requested)
        if bad:
            raise TuneshipError(
                f"group_size {requested} does not divide the input width of every layer "
                f"(widths {sorted(widths)}; {bad} are not multiples)"
            )
        return requested
    for size in GROUP_SIZES:
        if all(w % size == 0 for w in widths):
            return size
    raise TuneshipError(f"no group size in {GROUP_SIZES} divides the layer widths {sorted(widths)}")


def linear_names(model: torch.nn.Module) -> list[str]:
    import torch

    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def check_keep_16bit(names: list[str], patterns: list[str]) -> None:
    """Every keep_16bit entry names a linear layer (exactly, or as a 're:' pattern matched
    from the start of the name, as llm-compressor matches it): a typo would otherwise be
    quantized silently."""
    for pattern in patterns:
        regex = pattern[3:] if pattern.startswith("re:") else None
        try:
            hit = any(re.match(regex, n) for n in names) if regex else pattern in names
        except re.error as err:
            raise TuneshipError(f"keep_16bit: {pattern!r} is not a valid pattern: {err}") from err
        if not hit:
            raise TuneshipError(
                f"keep_16bit: {pattern!r} matches no linear layer of the model "
                f"(e.g. {names[0]!r}; patterns start with 're:')"
            )


def quiet_llmcompressor() -> None:
    """llm-compressor logs lines per layer (loguru), some at its own METRIC level (38, above
    WARNING); keep only warnings and errors unless TUNESHIP_LLMCOMPRESSOR_LOG asks for more
    (e.g. INFO, which shows the METRIC lines too)."""
    from loguru import logger

    level = os.environ.get("TUNESHIP_LLMCOMPRESSOR_LOG", "WARNING")
    logger.remove()
    logger.add(
        sys.stderr,
        level=level,
        filter=lambda record: level != "WARNING" or record["level"].name != "METRIC",
    )


def quantize(
    merged_dir: Path,
    tokenizer: PreTrainedTokenizerBase,
    sample: list[Conversation],
    cfg: ExportConfig,
    out_dir: Path,
    dtype: torch.dtype,
) -> QuantizationInfo:
    """GPTQ the 16-bit checkpoint in merged_dir, calibrated on `sample` and computed in `dtype`
    (the compute precision); save to out_dir with its 16-bit tensors (scales, unquantized
    layers) in bf16 whatever `dtype` was. The 4-bit integers survive that cast: a weight is
    q * scale with |q| <= 8, and rounding both to bf16 moves w / scale by under 0.07 before
    q is recomputed as round(w / scale)."""
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    quiet_llmcompressor()
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=dtype)
    check_keep_16bit(linear_names(model), cfg.keep_16bit)
    group_size = pick_group_size(model, cfg.group_size)
    symmetric = cfg.scheme == "W4A16"
    rows = calibration_rows(tokenizer, sample, cfg.calibration_max_length)
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(
            num_bits=4,
            type="int",
            symmetric=symmetric,
            strategy="group",
            group_size=group_size,
            observer=cfg.observer,
        ),
    )
    ignore = ["lm_head", *ROUTERS, *cfg.keep_16bit]
    recipe = GPTQModifier(
        config_groups={"group_0": scheme}, ignore=ignore, dampening_frac=cfg.dampening_frac
    )
    oneshot(
        model=model,
        dataset=Dataset.from_list(rows),
        recipe=recipe,
        max_seq_length=cfg.calibration_max_length,
        num_calibration_samples=len(rows),
        shuffle_calibration_samples=False,
        log_dir=None,
    )
    tuning = None
    if cfg.scale_tuning_epochs > 0:
        tuning = tune_scales(
            model,
            merged_dir,
            tuning_examples(tokenizer, sample, cfg.calibration_max_length),
            cfg.scale_tuning_epochs,
            cfg.scale_tuning_lr,
            cfg.seed,
            dtype,
            cfg.scale_tuning_batch,
        )
    # nn.Module's own `to`: transformers wraps PreTrainedModel.to in a way type checkers misread
    torch.nn.Module.to(model, dtype=torch.bfloat16)
    model.save_pretrained(out_dir, save_compressed=True)
    tokenizer.save_pretrained(out_dir)
    shutil.copy(
        Path(merged_dir) / "generation_config.json", Path(out_dir) / "generation_config.json"
    )
    return QuantizationInfo(
        engine="llmcompressor",
        algorithm="GPTQ",
        format="compressed-tensors",
        scheme=cfg.scheme,
        num_bits=4,
        symmetric=symmetric,
        group_size=group_size,
        ignore=ignore,
        dampening_frac=cfg.dampening_frac,
        observer=cfg.observer,
        calibration=CalibrationInfo(
            samples=len(rows),
            tokens=sum(len(r["input_ids"]) for r in rows),
            max_length=cfg.calibration_max_length,
            seed=cfg.seed,
            ids=[c.id for c in sample],
            mix=cfg.calibration_mix,
            datasets=dict(Counter(dataset_of(c.id) for c in sample)),
        ),
        scale_tuning=tuning,
    )
