"""What the train stage checks about a local base before any weights load: its architecture,
against transformers (refused when it cannot be built as a causal LM) and against the serve
image's vLLM (a notice when vLLM does not register it or runs it through its Transformers
backend). The list of vLLM's architectures is generated; tests/test_families.py holds it to the
installed vLLM."""

from __future__ import annotations

import json

import pytest
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from tuneship.infra.errors import TuneshipError
from tuneship.modelops.served_architectures import THROUGH_TRANSFORMERS, VLLM_ARCHITECTURES
from tuneship.train.base import check_architecture


def base_with(tmp_path, model_type: str):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    return str(tmp_path)


def test_a_family_vllm_implements_passes_quietly(tmp_path):
    assert check_architecture(base_with(tmp_path, "llama")) is None
    assert check_architecture(base_with(tmp_path, "qwen3_moe")) is None


def test_a_family_vllm_runs_through_transformers_is_named(tmp_path):
    notice = check_architecture(base_with(tmp_path, "olmo2"))
    assert "Olmo2ForCausalLM" in THROUGH_TRANSFORMERS
    assert notice and "serves Olmo2ForCausalLM through its Transformers backend" in notice


def test_a_family_vllm_does_not_register_is_a_notice(tmp_path):
    unserved = next(
        (t, c) for t, c in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items() if c not in VLLM_ARCHITECTURES
    )
    notice = check_architecture(base_with(tmp_path, unserved[0]))
    assert notice and f"registers no {unserved[1]}" in notice


def test_what_transformers_cannot_build_as_a_causal_lm_is_refused(tmp_path):
    with pytest.raises(TuneshipError, match=r"model_type 'clip' is not a causal language model"):
        check_architecture(base_with(tmp_path, "clip"))
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(TuneshipError, match="is not a JSON object"):
        check_architecture(str(tmp_path))
