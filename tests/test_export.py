"""The export stage on a tiny in-process Llama: real merge (peft) and real GPTQ (llm-compressor)."""

from __future__ import annotations

import json

import pytest

from tuneship.config import ExportConfig
from tuneship.errors import TuneshipError
from tuneship.export.run import run as export
from tuneship.fsutil import hash_tree
from tuneship.manifest import read_bundle


def test_export_merges_quantizes_and_writes_a_verified_manifest(tmp_path, tiny_run):
    out = export(
        tiny_run, tmp_path / "bundle", ExportConfig(calibration_samples=4, seed=3, checks=False)
    )
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
    assert bundle.quantization.calibration.samples == 4
    assert len(bundle.quantization.calibration.ids) == 4
    assert bundle.checks["stop_tokens"].passed
    assert bundle.checks["stop_tokens"].end_of_turn == "<|im_end|>"
    assert json.loads((model / "generation_config.json").read_text())["eos_token_id"] == (
        bundle.checks["stop_tokens"].end_of_turn_id
    )
    assert not (out / "merged").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["bundle"]


def test_asymmetric_scheme_stores_a_zero_point_per_group(tmp_path, tiny_run):
    from safetensors import safe_open

    cfg = ExportConfig(scheme="W4A16_ASYM", group_size=32, calibration_samples=4, checks=False)
    out = export(tiny_run, tmp_path / "bundle", cfg)
    weights = json.loads((out / "model" / "config.json").read_text())["quantization_config"]
    weights = weights["config_groups"]["group_0"]["weights"]
    assert (weights["symmetric"], weights["group_size"]) == (False, 32)
    with safe_open(str(out / "model" / "model.safetensors"), "pt") as tensors:
        names = set(tensors.keys())
        scale = tensors.get_tensor("model.layers.0.mlp.down_proj.weight_scale")
        zero = tensors.get_tensor("model.layers.0.mlp.down_proj.weight_zero_point")
    assert "model.layers.0.self_attn.q_proj.weight_zero_point" in names
    # one int4 zero point per group and output row, packed eight to an int32 along the rows
    assert tuple(zero.shape) == (scale.shape[0] // 8, scale.shape[1])
    assert zero.unique().numel() > 1  # fitted per group, not one constant offset
    recipe = read_bundle(out).quantization
    assert (recipe.scheme, recipe.symmetric) == ("W4A16_ASYM", False)


def test_keep_16bit_layers_stay_unquantized_in_the_bundle(tmp_path, tiny_run):
    from safetensors import safe_open

    cfg = ExportConfig(keep_16bit=[r"re:.*layers\.1\."], calibration_samples=4, checks=False)
    out = export(tiny_run, tmp_path / "bundle", cfg)
    with safe_open(str(out / "model" / "model.safetensors"), "pt") as tensors:
        names = set(tensors.keys())
    assert "model.layers.1.mlp.down_proj.weight" in names  # a plain 16-bit weight
    assert not any(n.startswith("model.layers.1.") and "weight_packed" in n for n in names)
    assert "model.layers.0.mlp.down_proj.weight_packed" in names
    qcfg = json.loads((out / "model" / "config.json").read_text())["quantization_config"]
    assert "model.layers.1.mlp.down_proj" in qcfg["ignore"]  # expanded to layer names
    assert not any(name.startswith("model.layers.0.") for name in qcfg["ignore"])
    assert read_bundle(out).quantization.ignore == ["lm_head", r"re:.*layers\.1\."]


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [("model.layers.0.mlp.down_prj", "matches no linear layer"), ("re:layers[", "not a valid")],
)
def test_keep_16bit_entries_must_name_a_layer(tmp_path, tiny_run, pattern, problem):
    with pytest.raises(TuneshipError, match=f"keep_16bit: .* {problem}"):
        export(tiny_run, tmp_path / "b", ExportConfig(keep_16bit=[pattern], checks=False))
    assert not (tmp_path / "b").exists()


def test_export_refuses_a_run_whose_adapter_changed_before_loading(tmp_path, tiny_run):
    adapter = tiny_run / "adapter" / "adapter_model.safetensors"
    original = adapter.read_bytes()
    try:
        adapter.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        with pytest.raises(TuneshipError, match=r"adapter_model\.safetensors: sha256 differs"):
            export(tiny_run, tmp_path / "b", ExportConfig(checks=False))
    finally:
        adapter.write_bytes(original)
    assert not (tmp_path / "b").exists()


def test_group_size_must_divide_layer_widths(tmp_path, tiny_run):
    with pytest.raises(TuneshipError, match="group_size 48 does not divide"):
        export(
            tiny_run,
            tmp_path / "b",
            ExportConfig(group_size=48, calibration_samples=2, checks=False),
        )
    assert not (tmp_path / "b").exists()
    assert not list(tmp_path.glob(".b.partial-*"))


def test_export_needs_a_run(tmp_path):
    with pytest.raises(TuneshipError, match=r"run\.json not found: is this a `tuneship train` run"):
        export(tmp_path, tmp_path / "b", ExportConfig(checks=False))


def test_second_export_sees_the_verified_bundle_and_returns_at_once(tmp_path, tiny_run, capsys):
    cfg = ExportConfig(calibration_samples=2, checks=False)
    out = export(tiny_run, tmp_path / "b", cfg)
    stamp = (out / "bundle.json").stat().st_mtime_ns
    capsys.readouterr()
    export(tiny_run, tmp_path / "b", cfg)
    assert "nothing to do" in capsys.readouterr().out
    assert (out / "bundle.json").stat().st_mtime_ns == stamp
    with pytest.raises(TuneshipError, match="already exists"):
        export(tiny_run, tmp_path / "b", cfg.model_copy(update={"calibration_samples": 3}))


def test_perplexity_gate_figures_are_recorded(tmp_path, tiny_run):
    out = export(tiny_run, tmp_path / "b", ExportConfig(calibration_samples=2, checks=False))
    gate = read_bundle(out).checks["quality_gate"]
    assert gate.perplexity_merged > 1 and gate.perplexity_quantized > 1
    assert "sampled training conversations" in gate.data
    assert read_bundle(out).checks["preflight"].passed is None  # skipped, and says so


@pytest.mark.processes
def test_killed_export_leaves_nothing_verify_accepts_and_rerun_completes(tmp_path, tiny_run):
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    tuneship = str(Path(sys.executable).parent / "tuneship")
    argv = [tuneship, "export", str(tiny_run), "--out", str(tmp_path / "b")]
    argv += ["--set", "checks=false", "--set", "calibration_samples=2"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".b.partial-*/merged")) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b").exists()
    assert list(tmp_path.glob(".b.partial-*"))  # the killed export's leftovers ...
    verify = subprocess.run(
        [tuneship, "bundle", "verify", str(tmp_path / "b")], capture_output=True
    )
    assert verify.returncode != 0
    subprocess.run(argv, check=True, capture_output=True)
    assert subprocess.run([tuneship, "bundle", "verify", str(tmp_path / "b")]).returncode == 0
    assert not list(tmp_path.glob(".b.partial-*"))  # ... are cleared by the rerun


def test_bundle_show_summarises_provenance_recipe_and_checks(tmp_path, tiny_run):
    from tuneship.bundles import show

    out = export(tiny_run, tmp_path / "b", ExportConfig(calibration_samples=2, checks=False))
    text = show(out)
    assert "served model name: b" in text
    assert "W4A16 GPTQ via llmcompressor, group size 64, ignored lm_head" in text
    assert "calibrated on 2 conversations" in text
    assert "stop_tokens: pass" in text and "preflight: skipped" in text
    assert "quality_gate: pass (data=" in text or "quality_gate: FAIL" in text


def test_merged_checkpoint_is_hashed_and_verified_when_kept(tmp_path, tiny_run):
    from tuneship.bundles import verify

    cfg = ExportConfig(calibration_samples=2, checks=False, keep_merged=True)
    out = export(tiny_run, tmp_path / "b", cfg)
    bundle = read_bundle(out)
    assert bundle.merged_files == hash_tree(out / "merged")
    verify(out)
    (out / "merged" / "config.json").write_text("{}")
    with pytest.raises(TuneshipError, match=r"merged/config\.json: sha256 differs"):
        verify(out)
