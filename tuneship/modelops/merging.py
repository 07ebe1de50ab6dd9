"""Merging a LoRA adapter into its base, always in 16-bit (never into a quantized base: merging
into 4-bit weights loses the adapter's effect). Used by export and by eval."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tuneship.chat.template import align_eos

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


def merge(
    base: str, adapter_dir: Path, out_dir: Path, dtype: torch.dtype
) -> PreTrainedTokenizerBase:
    """Merge the LoRA adapter into the base, computed in `dtype` (the run's compute precision);
    save in bfloat16 whatever that was, so a merge from any machine is the same checkpoint;
    return the tokenizer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    align_eos(tokenizer, model.config, model.generation_config)
    model.to(torch.bfloat16).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return tokenizer
