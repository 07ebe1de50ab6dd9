"""Shared fixtures: a tiny chat model built in-process (no download), small data, the run the
export and adapter tests share, and the end-to-end bundle. Helpers are in tests/support.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support import REPO, build_tokenizer, sharegpt, tuneship, write_jsonl


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


@pytest.fixture(scope="session")
def servable_tiny_base(tmp_path_factory) -> Path:
    """The tiny Llama with the shapes vLLM's CPU build serves (heads of 32: its attention takes
    32 to 512; widths that are multiples of 32, as its 4-bit kernel needs)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=eot, pad_token_id=eot, tie_word_embeddings=True,
    )  # fmt: skip
    out = tmp_path_factory.mktemp("servable-tiny-base")
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_base):
    """A 2-step run on the tiny base (LoRA on every linear layer): what export and the
    adapters-only bundle start from."""
    from tuneship.config.schema import TrainConfig
    from tuneship.train.run import run as train

    root = tmp_path_factory.mktemp("run")
    data = write_jsonl(
        root / "train.jsonl",
        [sharegpt(("human", f"Policy {i}?"), ("gpt", f"Policy {i} says ${i}.")) for i in range(10)],
    )
    cfg = TrainConfig(
        name="tiny",
        base=str(tiny_base),
        data=[str(data)],
        output_dir=str(root / "runs"),
        max_steps=2,
        batch_size=4,
        lora={"r": 4, "alpha": 8},
        precision="fp32",
    )
    return train(cfg)


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> Path:
    """The e2e bundle; TUNESHIP_E2E_BUNDLE names one this fixture built before, to skip the
    ~4 minutes of training and export in an inner loop (tests only read it and write beside it)."""
    if os.environ.get("TUNESHIP_E2E_BUNDLE"):
        return Path(os.environ["TUNESHIP_E2E_BUNDLE"])
    work = tmp_path_factory.mktemp("e2e")
    tuneship("base", "fetch", cwd=work)
    tuneship(
        "train", "--config", str(REPO / "train" / "configs" / "demo.yaml"),
        "--set", f"data=[{REPO / 'data' / 'demo' / 'tool_train.jsonl'},"
        f"{REPO / 'data' / 'demo' / 'train.jsonl'}]",
        "--set", f"eval_data={REPO / 'data' / 'demo' / 'heldout.jsonl'}", "--set", "eval_steps=2",
        "--set", "limit=72", "--set", "max_steps=4", "--set", "warmup_steps=0",
        "--set", "name=e2e", cwd=work,
    )  # fmt: skip
    # A 4-step run is close to the base model, which rambles on handbook questions: the stop-rate
    # and quality thresholds are loosened here (and only here) so the smoke run can pass; the
    # demo export runs with the defaults.
    tuneship(
        "export", "runs/e2e", "--out", "bundles/e2e", "--set", "calibration_samples=8",
        "--set", f"eval_data={REPO / 'data' / 'demo' / 'heldout.jsonl'}",
        "--set", "check_samples=12",
        "--set", "min_stop_rate=0.5", "--set", "max_perplexity_ratio=2.0",
        "--set", "max_recall_drop=100", "--set", "min_tool_parse_rate=0", cwd=work,
    )  # fmt: skip
    return work / "bundles" / "e2e"
