"""What vLLM loads on each machine class (serve/weights.py): the dtype, and for a W4A16 bundle
where vLLM has no 4-bit CPU kernel, a copy dequantized from the bundle's own 4-bit tensors."""

from __future__ import annotations

import json

import pytest

from tests.test_precision import CAPPED, SKYLAKE, ZEN3, ZEN4
from tuneship.config.schema import ExportConfig
from tuneship.export.run import run as export
from tuneship.serve import weights as serve_weights
from tuneship.serve.weights import dequantize, is_w4a16, plan


@pytest.fixture(scope="module", params=["W4A16", "W4A16_ASYM"])
def tiny_bundle(request, tmp_path_factory, tiny_run):
    out = tmp_path_factory.mktemp(request.param) / "bundle"
    cfg = ExportConfig(scheme=request.param, calibration_samples=4, checks=False)
    return export(tiny_run, out, cfg)


def test_each_machine_class_gets_the_kernel_or_the_dequantized_copy(tiny_bundle):
    model = tiny_bundle / "model"
    assert is_w4a16(model)
    kernel = plan(model, "cpu", ZEN4)
    assert (kernel.dtype, kernel.dequantize) == ("bfloat16", False)
    assert kernel.served_as.startswith("W4A16 through vLLM's 4-bit CPU kernel")
    for cap, missing in ((ZEN3, "no 4-bit kernel without AVX-512 (vLLM issue 55613)"),
                         (CAPPED, "takes bf16 activations only"),
                         (SKYLAKE, "takes bf16 activations only")):  # fmt: skip
        copy = plan(model, "cpu", cap)
        assert (copy.dtype, copy.dequantize) == ("float32", True), cap
        assert copy.served_as.startswith("W4A16 dequantized") and missing in copy.why, copy.why
    assert plan(model, "cuda").dtype is None  # the checkpoint's own dtype on a GPU


def test_a_16bit_model_is_served_in_the_machines_precision(tiny_base):
    assert plan(tiny_base, "cpu", ZEN4).dtype == "bfloat16"
    assert plan(tiny_base, "cpu", ZEN3).dtype == "float32"
    assert not plan(tiny_base, "cpu", ZEN3).dequantize


def test_the_dequantized_copy_holds_the_bundles_4bit_weights_exactly(tiny_bundle, tmp_path):
    """Every weight is (q - zero point) x scale in fp32: rounded to bf16 it is exactly what
    transformers computes when it decompresses the bundle (compressed-tensors, in bf16); the
    model around it is the same."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    def decompressed(dtype):
        return AutoModelForCausalLM.from_pretrained(
            tiny_bundle / "model", dtype=dtype,
            quantization_config=CompressedTensorsConfig(run_compressed=False),
        )  # fmt: skip

    dequantize(tiny_bundle / "model", tmp_path)
    mine = load_file(str(tmp_path / "model.safetensors"))
    assert {t.dtype for t in mine.values()} == {torch.float32}
    config = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert (tmp_path / "tokenizer.json").is_file() and (
        tmp_path / "generation_config.json"
    ).exists()
    expected = decompressed(torch.bfloat16).state_dict()
    quantized = [name for name in mine if name.endswith("proj.weight")]
    assert len(quantized) == 14  # 7 linear layers x 2 blocks
    for name in quantized:
        assert torch.equal(mine[name].to(torch.bfloat16), expected[name]), name
        assert mine[name].unique().numel() > 16  # a real weight, not a constant
    merged_like = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 12, 7]])
    with torch.no_grad():
        ours = merged_like(ids).logits
        theirs = decompressed(torch.float32)(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-2)


def test_the_copy_is_made_once_and_remade_when_tampered_with(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESHIP_HOME", str(tmp_path))
    made = []
    real = serve_weights.dequantize
    monkeypatch.setattr(serve_weights, "dequantize", lambda *a: (made.append(1), real(*a)))
    monkeypatch.setattr(serve_weights, "detect", lambda: ZEN3)
    first = serve_weights.prepare(tiny_bundle / "model", "cpu")
    second = serve_weights.prepare(tiny_bundle / "model", "cpu")
    assert first.model_dir == second.model_dir and len(made) == 1
    assert first.model_dir.parent == tmp_path / "dequantized"
    weights = first.model_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    third = serve_weights.prepare(tiny_bundle / "model", "cpu")
    assert third.model_dir == first.model_dir and len(made) == 2
    assert serve_weights.reusable(third.model_dir, json.loads(
        (third.model_dir / "dequantized.json").read_text())["source_sha256"])  # fmt: skip
