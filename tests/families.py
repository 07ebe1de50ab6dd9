"""Tiny random-weight models of the families users fine-tune, each with a tokenizer whose chat
template keeps that family's conventions (its turn tokens and end of turn, a BOS written by the
template, no system role), at the shapes vLLM's CPU build serves (heads of 32, widths that are
multiples of 32). Built in the test; nothing is downloaded."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support import CHATML, LLAMA3, build_tokenizer

# Gemma 2: its own turn tokens, BOS in the template, no system role (the template refuses it)
GEMMA2 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
# Gemma 3: the same turns; a system prompt is folded into the first user turn
GEMMA3 = (
    "{{ bos_token }}{% set first = 0 %}{% set prefix = '' %}"
    "{% if messages[0]['role'] == 'system' %}{% set first = 1 %}"
    "{% set prefix = messages[0]['content'] + '\n\n' %}{% endif %}"
    "{% for message in messages[first:] %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{% set text = (prefix if loop.first else '') + message['content'] %}"
    "{{ '<start_of_turn>' + role + '\n' + text + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
# Phi-3: <|user|> / <|assistant|> turns ending in <|end|>; eos is <|endoftext|>
PHI3 = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
# Mistral / Mixtral: [INST] ... [/INST] reply</s>, BOS in the template, no system role
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
# OLMo 2: <|user|> / <|assistant|> turns; a reply ends with eos, which is also BOS
OLMO2 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
    "{% else %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
FAMILY_SPECIALS = [
    "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<|user|>", "<|assistant|>",
    "<|system|>", "<|end|>", "<s>", "</s>", "[INST]", "[/INST]",
]  # fmt: skip
SHAPE = {
    "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
}  # fmt: skip
MOE = {"num_experts_per_tok": 2}


@dataclass(frozen=True)
class Family:
    name: str
    config_class: str  # transformers' config class
    model_class: str
    template: str
    eos: str
    bos: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    system_role: bool = True  # the template renders a system turn
    moe: bool = False


FAMILIES = [
    Family("llama", "LlamaConfig", "LlamaForCausalLM", LLAMA3, "<|eot_id|>", "<|begin_of_text|>"),
    Family("qwen2", "Qwen2Config", "Qwen2ForCausalLM", CHATML, "<|im_end|>"),
    Family("qwen3", "Qwen3Config", "Qwen3ForCausalLM", CHATML, "<|im_end|>",
           config={"head_dim": 32}),
    Family("mistral", "MistralConfig", "MistralForCausalLM", MISTRAL, "</s>", "<s>",
           system_role=False),
    Family("gemma2", "Gemma2Config", "Gemma2ForCausalLM", GEMMA2, "<eos>", "<bos>",
           config={"head_dim": 32, "query_pre_attn_scalar": 32}, system_role=False),
    Family("gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM", GEMMA3, "<eos>", "<bos>",
           config={"head_dim": 32, "query_pre_attn_scalar": 32}),
    Family("phi3", "Phi3Config", "Phi3ForCausalLM", PHI3, "<|endoftext|>"),
    Family("olmo2", "Olmo2Config", "Olmo2ForCausalLM", OLMO2, "<|endoftext|>",
           "<|endoftext|>"),
    Family("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", CHATML, "<|im_end|>",
           config={"head_dim": 32, "num_experts": 4, "moe_intermediate_size": 64,
                   "decoder_sparse_step": 1, **MOE}, moe=True),
    Family("mixtral", "MixtralConfig", "MixtralForCausalLM", MISTRAL, "</s>", "<s>",
           config={"num_local_experts": 4, **MOE}, system_role=False, moe=True),
]  # fmt: skip


def build_family_base(family: Family, out: Path) -> Path:
    """The family's tiny checkpoint and tokenizer in out; eos and pad as the family has them
    (the template's end of turn may differ: training aligns it)."""
    import torch
    import transformers

    tokenizer = build_tokenizer(family.template, family.eos, family.bos, FAMILY_SPECIALS)
    config_class = getattr(transformers, family.config_class)
    eos_id = tokenizer.convert_tokens_to_ids(family.eos)
    config = config_class(
        vocab_size=len(tokenizer), **SHAPE, **family.config, eos_token_id=eos_id,
        pad_token_id=eos_id, tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids(family.bos) if family.bos else None,
    )  # fmt: skip
    torch.manual_seed(0)
    model = getattr(transformers, family.model_class)(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
