"""The export stage on a tiny in-process Llama: real merge (peft) and real GPTQ (llm-compressor)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from tuneship.chat.records import Conversation
from tuneship.config.schema import ExportConfig
from tuneship.export.run import run as export
from tuneship.handoff.manifest import read_bundle
from tuneship.infra.errors import TuneshipError
from tuneship.infra.fsutil import hash_tree
from tuneship.modelops.gptq import ROUTERS


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


def test_observer_picks_the_group_ranges_and_imatrix_weighs_them_by_the_calibration(
    tmp_path, tiny_run
):
    from safetensors import safe_open

    def scales(observer: str):
        cfg = ExportConfig(observer=observer, calibration_samples=4, checks=False)
        out = export(tiny_run, tmp_path / observer, cfg)
        weights = json.loads((out / "model" / "config.json").read_text())["quantization_config"]
        assert weights["config_groups"]["group_0"]["weights"]["observer"] == observer
        assert read_bundle(out).quantization.observer == observer
        with safe_open(str(out / "model" / "model.safetensors"), "pt") as tensors:
            return tensors.get_tensor("model.layers.0.mlp.down_proj.weight_scale").float()

    minmax, mse, imatrix = (
        scales(o) for o in ("memoryless_minmax", "memoryless_mse", "imatrix_mse")
    )
    # a searched range clips outliers: no group's scale grows, and some shrink
    assert (mse <= minmax + 1e-3).all() and (mse < minmax - 1e-3).any()
    # weighed by the calibration activations, the search settles elsewhere in some groups
    assert not torch.equal(imatrix, mse)


def conversations(dataset: str, n: int) -> list[Conversation]:
    turns = ({"role": "user", "content": "q"}, {"role": "assistant", "content": "a"})
    return [Conversation(f"data/{dataset}:{line}", "openai", turns) for line in range(1, n + 1)]


def test_calibration_gives_each_training_dataset_an_equal_share_until_it_runs_out():
    from tuneship.modelops.calibration import calibration_sample, dataset_of

    rows = conversations("chat.jsonl", 400) + conversations("tools.jsonl", 10)
    rows += conversations("replay.jsonl", 300)
    picked = calibration_sample(rows, 64, seed=0)
    assert len({c.id for c in picked}) == 64
    assert Counter(dataset_of(c.id) for c in picked) == {
        "data/tools.jsonl": 10,
        "data/chat.jsonl": 27,
        "data/replay.jsonl": 27,
    }
    assert calibration_sample(rows, 64, seed=0) == picked  # seeded
    assert [dataset_of(i) for i in ("d.parquet#3", "shards#part-1.parquet:7")] == [
        "d.parquet",
        "shards",
    ]
    plain = calibration_sample(rows, 64, seed=0, mix="rows")  # a dataset weighs its rows
    assert Counter(dataset_of(c.id) for c in plain)["data/tools.jsonl"] < 10
    assert sorted(calibration_sample(rows[:20], 64, seed=1), key=lambda c: c.id) == sorted(
        rows[:20], key=lambda c: c.id
    )


def test_token_mix_gives_each_training_dataset_an_equal_share_of_the_tokens():
    from tuneship.modelops.calibration import calibration_sample, dataset_of

    rows = conversations("chat.jsonl", 400) + conversations("tools.jsonl", 40)
    length = {"data/chat.jsonl": 100, "data/tools.jsonl": 1000}  # tool sessions: 10x longer

    def tokens(conv):
        return length[dataset_of(conv.id)]

    picked = calibration_sample(rows, 66, seed=0, mix="tokens", length=tokens)
    assert len({c.id for c in picked}) == 66
    assert Counter(dataset_of(c.id) for c in picked) == {
        "data/chat.jsonl": 60,
        "data/tools.jsonl": 6,
    }
    by_rows = calibration_sample(rows, 66, seed=0, mix="datasets", length=tokens)
    assert Counter(dataset_of(c.id) for c in by_rows)["data/tools.jsonl"] == 33


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
    assert read_bundle(out).quantization.ignore == ["lm_head", *ROUTERS, r"re:.*layers\.1\."]


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
    recorded = json.loads((out / "bundle.json").read_text())
    del recorded["config"]["observer"]  # as in a bundle made before the key was added
    (out / "bundle.json").write_text(json.dumps(recorded))
    export(tiny_run, tmp_path / "b", cfg)
    assert "nothing to do" in capsys.readouterr().out
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
    from tuneship.handoff.bundles import show

    out = export(tiny_run, tmp_path / "b", ExportConfig(calibration_samples=2, checks=False))
    text = show(out)
    assert "served model name: b" in text
    assert "W4A16 GPTQ via llmcompressor, group size 64, ranges by memoryless_minmax, " in text
    assert "ignored lm_head" in text
    assert "calibrated on 2 conversations" in text and "train.jsonl 2)" in text
    assert "stop_tokens: pass" in text and "preflight: skipped" in text
    assert "quality_gate: pass (data=" in text or "quality_gate: FAIL" in text


def test_merged_checkpoint_is_hashed_and_verified_when_kept(tmp_path, tiny_run):
    from tuneship.handoff.bundles import verify

    cfg = ExportConfig(calibration_samples=2, checks=False, keep_merged=True)
    out = export(tiny_run, tmp_path / "b", cfg)
    bundle = read_bundle(out)
    assert bundle.merged_files == hash_tree(out / "merged")
    verify(out)
    (out / "merged" / "config.json").write_text("{}")
    with pytest.raises(TuneshipError, match=r"merged/config\.json: sha256 differs"):
        verify(out)


def test_checks_later_record_a_plan_and_the_bundle_waits_for_bundle_check(tmp_path, tiny_run):
    """The train image has no vLLM: the export records what the vLLM checks need, and
    `bundle verify` refuses the bundle until `tuneship bundle check` has run."""
    from tuneship.handoff.bundles import verify

    out = export(
        tiny_run,
        tmp_path / "b",
        ExportConfig(calibration_samples=2, checks="later", check_samples=3),
    )
    bundle = read_bundle(out)
    plan = bundle.check_plan
    assert len(plan.prompts) == 3 and all(p.trained_ids for p in plan.prompts)
    assert plan.merged_answers is None  # training samples name no fact: no recall baseline
    assert plan.perplexity_merged > 1 and plan.stop_tokens.passed
    assert set(bundle.pending_checks()) == {
        "stop_tokens", "template_parity", "preflight", "quality_gate"
    }  # fmt: skip
    with pytest.raises(TuneshipError, match=r"checks not run yet: .* run `tuneship bundle check"):
        verify(out)
    assert verify(out, require_checked=False).name == "b"


def test_a_check_record_for_another_bundle_json_is_refused(tmp_path, tiny_run):
    from tuneship.handoff.bundles import verify
    from tuneship.handoff.manifest import CheckRecord, header
    from tuneship.infra.fsutil import sha256_file, write_json_atomic
    from tuneship.quality.probes import ProbeAnswer, ProbeResult
    from tuneship.quality.verdicts import judge

    out = export(tiny_run, tmp_path / "b", ExportConfig(calibration_samples=2, checks="later"))
    plan = read_bundle(out).check_plan
    served = ProbeResult(
        flavour="cpu", argv=[], load_s=1.0, peak_rss_bytes=1, chat_s=1.0,
        tokenize=[p.trained_ids[:5] for p in plan.prompts],
        chats=[ProbeAnswer(id=p.id, model="m", text="ok", finish_reason="stop", latency_s=0.1)
               for p in plan.prompts],
    )  # fmt: skip
    record = CheckRecord(
        **header("tuneship.checks", "b"),
        bundle_json_sha256=sha256_file(out / "bundle.json"),
        checks=judge(plan, served),
    )
    write_json_atomic(out / "checks.json", record.model_dump(mode="json"))
    assert verify(out).checks["template_parity"].passed  # checked: accepted
    manifest = json.loads((out / "bundle.json").read_text()) | {"served_model_name": "edited"}
    (out / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(TuneshipError, match=r"checks\.json was written for another bundle\.json"):
        verify(out)


def test_bundles_are_world_readable_whatever_the_umask(tmp_path, tiny_run):
    import os
    import stat

    old = os.umask(0o077)
    try:
        out = export(tiny_run, tmp_path / "b", ExportConfig(calibration_samples=2, checks="off"))
    finally:
        os.umask(old)
    modes = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*")}
    assert modes["model/model.safetensors"] == 0o644 and modes["bundle.json"] == 0o644
    assert {m for p, m in modes.items() if (out / p).is_dir()} == {0o755}
    assert all(m & 0o444 == 0o444 for m in modes.values()), modes


def test_verify_names_a_file_the_serving_user_cannot_read(tmp_path, tiny_run):
    """A bundle copied with a private file mode: verify, as the serving user, names the file.
    As root (which reads anything) the check runs in a forked child as uid 65534."""
    import os
    import shutil
    import tempfile

    from tuneship.handoff.bundles import verify

    out = export(tiny_run, tmp_path / "b", ExportConfig(calibration_samples=2, checks="off"))
    shared = Path(tempfile.mkdtemp(prefix="tuneship-modes-"))
    try:
        shared.chmod(0o755)  # reachable by the other user, as a mounted volume is
        bundle = shutil.copytree(out, shared / "b")
        weights = bundle / "model" / "model.safetensors"
        weights.chmod(0o600 if os.geteuid() == 0 else 0o000)
        assert f"{weights}: not readable by this user" in verify_as_another_user(verify, bundle)
    finally:
        shutil.rmtree(shared)


def verify_as_another_user(verify, bundle: Path) -> str:
    """verify's error message, run as uid 65534 when we are root (else as ourselves)."""
    import os

    if os.geteuid() != 0:
        with pytest.raises(TuneshipError) as info:
            verify(bundle)
        return str(info.value)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody, verify, report, exit without pytest's cleanup
        os.close(read)
        os.setgid(65534)
        os.setuid(65534)
        try:
            verify(bundle)
            message = "verified"
        except TuneshipError as exc:
            message = str(exc)
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as fh:
        message = fh.read()
    os.waitpid(pid, 0)
    return message


def tensor_layout(folder: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    from safetensors import safe_open

    layout = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as tensors:
            for name in tensors.keys():  # noqa: SIM118 (safe_open has no __iter__)
                tensor = tensors.get_slice(name)
                layout[name] = (tensor.get_dtype(), tuple(tensor.get_shape()))
    return layout


def test_a_bundle_computed_in_fp32_is_stored_as_one_computed_in_bf16(tmp_path, tiny_run):
    """An AVX2 machine exports in fp32 (no native bf16), an AMX one in bf16: the bundles are the
    same format and size, their 16-bit tensors in bf16 either way (the tiny base itself is
    stored in fp32, so nothing is inherited from it), and bundle.json says which it was."""
    out = {}
    for precision in ("fp32", "bf16"):
        cfg = ExportConfig(calibration_samples=4, checks=False, keep_merged=True,
                           precision=precision)  # fmt: skip
        out[precision] = export(tiny_run, tmp_path / precision, cfg)
    layouts = [tensor_layout(out[p] / "model") for p in out]
    assert layouts[0] == layouts[1]
    dtypes = {dtype for dtype, _ in layouts[0].values()}
    assert dtypes == {"BF16", "I32", "I64"}, dtypes  # bf16 scales and layers, packed int4
    assert layouts[0]["model.layers.0.self_attn.q_proj.weight_scale"][0] == "BF16"
    merged = [tensor_layout(out[p] / "merged") for p in out]
    assert merged[0] == merged[1] and {d for d, _ in merged[0].values()} == {"BF16"}
    sizes = [read_bundle(out[p]).sizes for p in out]
    assert sizes[0].model_bytes == sizes[1].model_bytes
    assert sizes[0].merged_bytes == sizes[1].merged_bytes
    for precision in out:
        compute = read_bundle(out[precision]).compute
        assert compute.precision == precision and compute.reason == f"set to {precision}"
        config = json.loads((out[precision] / "model" / "config.json").read_text())
        assert config["dtype"] == "bfloat16"


def test_scale_tuning_keeps_the_4bit_integers_and_brings_the_bundle_closer_to_the_merged_model(
    tmp_path, tiny_run
):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig

    from tuneship.handoff.bundles import show
    from tuneship.handoff.manifest import read_run
    from tuneship.handoff.runs import training_conversations
    from tuneship.modelops.calibration import tuning_examples
    from tuneship.modelops.scale_tuning import mean_kl

    settings = dict(calibration_samples=8, checks=False, keep_merged=True, precision="fp32")
    plain = export(tiny_run, tmp_path / "plain", ExportConfig(**settings))
    tuned_cfg = ExportConfig(
        **settings, scale_tuning_epochs=8, scale_tuning_lr=0.02, scale_tuning_batch=8
    )
    tuned = export(tiny_run, tmp_path / "tuned", tuned_cfg)

    def tensors(out: Path, layer: str = "model.layers.1.mlp.down_proj"):
        with safe_open(str(out / "model" / "model.safetensors"), "pt") as t:
            return t.get_tensor(f"{layer}.weight_packed"), t.get_tensor(f"{layer}.weight_scale")

    (plain_ints, plain_scales), (tuned_ints, tuned_scales) = tensors(plain), tensors(tuned)
    assert torch.equal(plain_ints, tuned_ints)  # GPTQ's integers, untouched
    assert not torch.equal(plain_scales, tuned_scales)
    info = read_bundle(tuned).quantization.scale_tuning
    assert info is not None and read_bundle(plain).quantization.scale_tuning is None
    assert info.steps == 8 and 0 < info.largest_change < 1  # 64 conversations, 8 a step
    assert "; scales tuned toward the merged model (8 epochs, 8 steps, KL " in show(tuned)

    def load(path: Path):
        config = CompressedTensorsConfig(run_compressed=False) if path.name == "model" else None
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, quantization_config=config
        ).eval()

    ids = set(read_bundle(tuned).quantization.calibration.ids)
    sample = [c for c in training_conversations(read_run(tiny_run)) if c.id in ids]
    tokenizer = AutoTokenizer.from_pretrained(tuned / "model")
    examples = tuning_examples(tokenizer, sample, tuned_cfg.calibration_max_length)
    merged = load(tuned / "merged")
    assert mean_kl(load(tuned / "model"), merged, examples) < 0.8 * mean_kl(
        load(plain / "model"), merged, examples
    )


def test_a_step_dequantizes_once_with_the_gradient_of_dequantizing_every_pass():
    """tune_scales dequantizes each weight once per optimizer step and sums the step's
    gradients in fp32 before they reach the scales: the same gradient as autograd through a
    dequantization in every forward pass."""
    import torch

    from tuneship.modelops.scale_tuning import TunedLayer, tuned_forward

    gen = torch.Generator().manual_seed(0)
    module = torch.nn.Linear(64, 8, bias=False)
    offsets = torch.randint(-8, 8, (8, 64), generator=gen, dtype=torch.int8)
    scale = torch.rand(8, 2, generator=gen) / 10 + 0.01
    inputs = [torch.randn(5, 64, generator=gen) for _ in range(3)]
    grads = []
    for per_step in (False, True):
        layer = TunedLayer(module, offsets, 32, scale, torch.zeros(8, 2, requires_grad=True))
        if per_step:
            weight = layer.begin_step()
            forward = tuned_forward(layer)
            for x in inputs:
                (forward(x).square().sum() / 3).backward()
            torch.autograd.backward([weight], [layer.step_grad])
        else:
            for x in inputs:
                ((x @ layer.weight().T).square().sum() / 3).backward()
        grads.append(layer.log_gain.grad.clone())
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_scale_tuning_needs_assistant_tokens_in_the_calibration_sample():
    from tuneship.modelops.scale_tuning import tune_scales

    prompts_only = [([1, 2, 3], [-100, -100, -100])]
    with pytest.raises(TuneshipError, match="no calibration conversation has an assistant token"):
        tune_scales(
            torch.nn.Linear(2, 2), Path("unused"), prompts_only, 1, 1e-3, 0, torch.float32, 8
        )


def test_scale_tuning_settings_are_checked_at_the_boundary():
    with pytest.raises(ValueError, match="scale_tuning_epochs"):
        ExportConfig(scale_tuning_epochs=-1)
    with pytest.raises(ValueError, match="scale_tuning_lr"):
        ExportConfig(scale_tuning_lr=0)
