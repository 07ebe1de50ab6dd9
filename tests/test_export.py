"""The export stage on a tiny in-process Llama: real merge (peft) and real GPTQ (llm-compressor)."""

from __future__ import annotations

import json

import pytest
from tuneship.export.run import run as export
from tuneship.train.run import run as train

from tuneship.config import ExportConfig, TrainConfig
from tuneship.errors import TuneshipError
from tuneship.fsutil import hash_tree
from tuneship.manifest import read_bundle


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_base):
    from tests.conftest import sharegpt, write_jsonl

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
    )
    return train(cfg)


def test_export_merges_quantizes_and_writes_a_verified_manifest(tmp_path, tiny_run):
    out = export(tiny_run, tmp_path / "bundle", ExportConfig(calibration_samples=4, seed=3))
    bundle = read_bundle(out)
    model = out / "model"
    config = json.loads((model / "config.json").read_text())
    qcfg = config["quantization_config"]
    assert qcfg["quant_method"] == "compressed-tensors"
    weights = qcfg["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["strategy"]) == (4, 64, "group")
    assert "lm_head" in qcfg["ignore"]
    assert bundle.served_model_name == "bundle"
    assert bundle.files == hash_tree(model)
    assert bundle.quantization["calibration"]["samples"] == 4
    assert len(bundle.quantization["calibration"]["ids"]) == 4
    assert bundle.checks["stop_tokens"]["passed"]
    assert bundle.checks["stop_tokens"]["end_of_turn"] == "<|im_end|>"
    assert (
        json.loads((model / "generation_config.json").read_text())["eos_token_id"]
        == (bundle.checks["stop_tokens"]["end_of_turn_id"])
    )
    assert not (out / "merged").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["bundle"]


def test_export_refuses_a_run_whose_adapter_changed_before_loading(tmp_path, tiny_run):
    adapter = tiny_run / "adapter" / "adapter_model.safetensors"
    original = adapter.read_bytes()
    try:
        adapter.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        with pytest.raises(TuneshipError, match=r"adapter_model\.safetensors: sha256 differs"):
            export(tiny_run, tmp_path / "b", ExportConfig())
    finally:
        adapter.write_bytes(original)
    assert not (tmp_path / "b").exists()


def test_group_size_must_divide_layer_widths(tmp_path, tiny_run):
    with pytest.raises(TuneshipError, match="group_size 48 does not divide"):
        export(tiny_run, tmp_path / "b", ExportConfig(group_size=48, calibration_samples=2))
    assert not (tmp_path / "b").exists()
    assert not list(tmp_path.glob(".b.partial-*"))


def test_export_needs_a_run(tmp_path):
    with pytest.raises(TuneshipError, match=r"run\.json not found: is this a `tuneship train` run"):
        export(tmp_path, tmp_path / "b", ExportConfig())
