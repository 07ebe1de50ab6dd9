"""Typed configs: unknown keys named, all problems reported together, --set overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuneship.config.loading import load_config, parse_overrides
from tuneship.config.schema import EvalConfig, ExportConfig, TrainConfig
from tuneship.infra.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "train" / "configs").glob("*.yaml")))
def test_every_shipped_config_validates(path):
    cfg = load_config(TrainConfig, path)
    assert cfg.name and cfg.data
    for data in cfg.data_paths + ([cfg.eval_data] if cfg.eval_data else []):
        # GPU configs name the container's data volume; the demo names files in the repo
        assert data.startswith("/data/") or (REPO / data).is_file(), f"{path}: {data}"
    if cfg.base != "default":  # hub ids of the GPU configs: real models, not typos
        assert cfg.base.startswith("meta-llama/Meta-Llama-3-") and cfg.precision == "bf16"
        assert cfg.checkpoint_steps and cfg.log_format == "json" and cfg.metrics_port


def test_shipped_gpu_configs_say_what_they_claim():
    configs = {p.stem: load_config(TrainConfig, p) for p in (REPO / "train/configs").glob("*.yaml")}
    one_gpu = configs["llama3-8b-qlora-1gpu"]
    assert one_gpu.qlora and "8B" in one_gpu.base and one_gpu.data[0].weight == 7
    ddp = configs["llama3-8b-lora-8gpu-ddp"]
    assert not ddp.qlora and ddp.distributed.strategy == "ddp"
    fsdp = configs["llama3-70b-qlora-fsdp"]
    assert fsdp.qlora and "70B" in fsdp.base and fsdp.distributed.strategy == "fsdp"


@pytest.mark.parametrize("path", sorted((REPO / "export" / "configs").glob("*.yaml")))
def test_every_shipped_export_config_validates(path):
    cfg = load_config(ExportConfig, path)
    if cfg.eval_data:
        assert (REPO / cfg.eval_data).is_file()


@pytest.mark.parametrize("path", sorted((REPO / "eval" / "configs").glob("*.yaml")))
def test_every_shipped_eval_config_validates(path):
    cfg = load_config(EvalConfig, path)
    assert (REPO / cfg.heldout).is_file() and (REPO / cfg.general).is_file()


def test_eval_target_keys_are_checked():
    with pytest.raises(ConfigError, match=r"targets\.min_recal"):
        load_config(EvalConfig, None, parse_overrides(["targets.min_recal=0.5"]))
    with pytest.raises(ConfigError, match="min_retention"):
        load_config(EvalConfig, None, parse_overrides(["targets.min_retention=1.5"]))


def test_unknown_keys_are_named_with_a_suggestion_and_all_problems_reported(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ndata: [a.jsonl]\nepoch: 3\nlora:\n  rnak: 8\nlearning_rate: -1\n")
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, path)
    text = str(info.value)
    assert f"{path}: unknown key 'epoch'; did you mean 'epochs'?" in text
    assert "unknown key 'lora.rnak'" in text and "known: r, alpha" in text
    assert "'learning_rate': Input should be greater than 0" in text
    assert len(info.value.problems) == 3


def test_missing_required_keys_and_bad_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 2\n")
    with pytest.raises(ConfigError, match="missing required key 'name'"):
        load_config(TrainConfig, path)
    path.write_text("name: x\n data: [oops\n")
    with pytest.raises(ConfigError, match=r"not valid YAML"):
        load_config(TrainConfig, path)
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(TrainConfig, path)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(TrainConfig, tmp_path / "nope.yaml")


def test_set_overrides_are_typed_and_nested(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ndata: [a.jsonl]\nlora: {r: 4}\n")
    cfg = load_config(
        TrainConfig, path, parse_overrides(["epochs=2", "lora.alpha=16", "learning_rate=1e-3"])
    )
    assert (cfg.epochs, cfg.lora.r, cfg.lora.alpha, cfg.learning_rate) == (2, 4, 16, 1e-3)
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides(["epochs"])
    with pytest.raises(ConfigError, match="unknown key 'group'"):
        load_config(ExportConfig, None, parse_overrides(["group=64"]))


def test_problems_name_the_file_or_the_set_option_they_came_from(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ndata: [a.jsonl]\nlora: {r: 0}\n")
    overrides = parse_overrides(["epochs=-1", "lora.alpha=0", "keep_16bit=x"])
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, path, overrides)
    problems = "\n".join(err.value.problems)
    assert f"{path}: 'lora.r'" in problems
    assert "--set: 'epochs'" in problems and "--set: 'lora.alpha'" in problems
    assert "--set: unknown key 'keep_16bit'" in problems
    # a YAML value --set cannot parse stays a string, and the error says it came from --set
    export = tmp_path / "export.yaml"
    export.write_text("seed: 1\n")
    bad = parse_overrides(['keep_16bit=["re:a\\.b"]'])
    with pytest.raises(ConfigError) as err:
        load_config(ExportConfig, export, bad)
    assert err.value.problems[0].startswith("--set: 'keep_16bit': Input should be a valid list")


def test_run_name_must_be_a_safe_folder_name(tmp_path):
    with pytest.raises(ConfigError, match="'name'"):
        load_config(TrainConfig, None, {"name": "../escape", "data": ["a.jsonl"]})
