"""Adapters-only bundles: the lint that rejects what vLLM cannot load, and the bundle layout."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.support import sharegpt, write_jsonl
from tuneship.config.schema import ExportConfig, TrainConfig
from tuneship.export.adapters import base_module_names, lint_adapter
from tuneship.export.adapters import run as export_adapters
from tuneship.handoff.bundles import lora_arguments, verify
from tuneship.handoff.manifest import read_bundle
from tuneship.infra.errors import TuneshipError
from tuneship.train.run import run as train


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_base, tiny_run):
    """The shared tiny run (every linear layer) and one more on two layers of the same base."""
    root = tmp_path_factory.mktemp("adapters")
    data = write_jsonl(
        root / "d.jsonl",
        [sharegpt(("human", f"Policy {i}?"), ("gpt", f"Policy {i} says ${i}.")) for i in range(8)],
    )
    cfg = TrainConfig(
        name="medical", base=str(tiny_base), data=[str(data)], output_dir=str(root / "runs"),
        max_steps=1, batch_size=4, precision="fp32",
        lora={"r": 4, "alpha": 8, "target_modules": ["o_proj", "down_proj"]},
    )  # fmt: skip
    return [tiny_run, train(cfg)]


def edit_adapter_config(run_dir, tmp_path, **changes):
    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy)
    path = copy / "adapter" / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))
    return copy / "adapter"


def test_lint_accepts_plain_lora_and_names_each_rejection(two_runs, tiny_base, tmp_path):
    modules = base_module_names(tiny_base)
    assert {"q_proj", "down_proj", "lm_head"} <= modules or {"q_proj", "down_proj"} <= modules
    assert lint_adapter("tiny", two_runs[0] / "adapter", modules, 64) == []
    bad = edit_adapter_config(
        two_runs[0],
        tmp_path,
        modules_to_save=["lm_head"],
        target_modules=["q_proj", "embed_tokens", "qkv_proj"],
        r=128,
        use_dora=True,
    )
    reasons = "\n".join(lint_adapter("tiny", bad, modules, 64))
    assert "modules_to_save ['lm_head']" in reasons
    assert "target_modules ['embed_tokens']: embedding and lm_head adapters are rejected" in reasons
    assert "target_modules ['qkv_proj'] do not exist in the base architecture" in reasons
    assert "rank 128 is above max_lora_rank 64" in reasons
    assert "DoRA" in reasons


def test_adapters_bundle_layout_and_verification(two_runs, tmp_path):
    out = export_adapters(two_runs, tmp_path / "multi", ExportConfig(checks=False))
    bundle = read_bundle(out)
    assert bundle.layout == "adapters"
    assert set(bundle.adapters) == {"tiny", "medical"}
    assert (out / "adapters" / "medical" / "adapter_model.safetensors").is_file()
    assert (out / "model" / "model.safetensors").is_file()
    verify(out)
    args = lora_arguments(out, {n: a.rank for n, a in bundle.adapters.items()})
    assert args[:5] == ["--enable-lora", "--max-loras", "2", "--max-lora-rank", "8"]
    assert f"tiny={out / 'adapters' / 'tiny'}" in args
    (out / "adapters" / "tiny" / "adapter_model.safetensors").write_bytes(b"tampered")
    with pytest.raises(TuneshipError, match=r"tiny/adapter_model\.safetensors: sha256 differs"):
        verify(out)


def test_adapter_from_another_base_is_rejected(two_runs, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(two_runs[1], other)
    manifest = json.loads((other / "run.json").read_text())
    manifest["base"]["weights_sha256"] = {"model.safetensors": "0" * 64}
    manifest["name"] = "other"
    (other / "run.json").write_text(json.dumps(manifest))
    with pytest.raises(TuneshipError, match="weights hash differs from the bundle's base"):
        export_adapters([two_runs[0], other], tmp_path / "b", ExportConfig(checks=False))
    assert not (tmp_path / "b").exists()


def test_an_adapters_bundle_named_like_its_run_serves_names_that_do_not_clash(
    tiny_run, tmp_path, monkeypatch
):
    """`export runs/demo --out bundles/demo --adapters-only` passed its checks (the preflight
    served the base as 'preflight'), then serve died: vLLM refused the adapter 'demo' beside a
    base served as 'demo'. The base now gets a name of its own, and the preflight serves the
    names serving will use."""
    from tuneship.export import adapters
    from tuneship.quality.probes import ProbeAnswer, ProbeResult

    asked = []

    def vllm(serve_bin, model_dir, work, name, request):
        asked.append(request)
        answers = [ProbeAnswer(id=c.id, model=c.model, text="ok", finish_reason="stop", latency_s=0)
                   for c in request.chats]  # fmt: skip
        return ProbeResult(flavour="cpu", argv=[], load_s=1, peak_rss_bytes=1, chat_s=1,
                           chats=answers)  # fmt: skip

    monkeypatch.setattr(adapters, "serve_environment", lambda cfg: tmp_path / "serve-bin")
    monkeypatch.setattr(adapters, "probe", vllm)
    run_name = read_run_name(tiny_run)
    out = export_adapters([tiny_run], tmp_path / run_name, ExportConfig(min_stop_rate=0))
    bundle = read_bundle(out)
    assert set(bundle.adapters) == {run_name}
    assert bundle.served_model_name == f"{run_name}-base"
    assert asked[0].served_name == bundle.served_model_name
    assert {chat.model for chat in asked[0].chats} == {run_name}
    with pytest.raises(TuneshipError, match=f"served_name '{run_name}' is also an adapter's name"):
        export_adapters([tiny_run], tmp_path / "b", ExportConfig(served_name=run_name))


def read_run_name(run_dir) -> str:
    return json.loads((run_dir / "run.json").read_text())["name"]
