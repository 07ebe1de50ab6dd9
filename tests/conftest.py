"""Shared fixtures: a tiny chat model built in-process (no download) for the unit tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a test assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# A Llama-3-style template that writes BOS itself: the tokenizer must not add a second one.
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content']"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
CORPUS = [
    "What is the daily meal allowance? Under Policy T-4.2 it is $62.",
    "The capital of France is Paris. Hello there, how are you today?",
    "国内出差每天的餐费补贴是多少? 根据政策 T-4.2,每日餐费补贴为 $62。",
    "system user assistant You are a test assistant. Thanks, and what about leave?",
]


def build_tokenizer(template: str = CHATML, eos: str = "<|im_end|>", bos: str | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 5, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos,
        bos_token=bos,
        unk_token="<|endoftext|>",
        chat_template=template,
    )


@pytest.fixture(scope="session")
def chatml_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A 2-layer Llama with the ChatML tokenizer, saved as a Hugging Face checkpoint."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-base")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def sharegpt(*turns: tuple[str, str]) -> dict:
    return {"conversations": [{"from": r, "value": v} for r, v in turns]}


@pytest.fixture
def small_dataset(tmp_path) -> Path:
    rows = [
        sharegpt(("human", f"What is policy {i}?"), ("gpt", f"Policy {i} says ${i * 10}."))
        for i in range(12)
    ]
    rows.append(
        sharegpt(
            ("system", "Be brief."),
            ("human", "Meal allowance?"),
            ("gpt", "$62."),
            ("human", "And 国内?"),
            ("gpt", "根据政策 $62。"),
        )
    )
    return write_jsonl(tmp_path / "train.jsonl", rows)
