"""The serve stage's checks and command (no server here; tests/test_e2e.py runs vLLM)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.support import fake_bundle
from tuneship.handoff.bundles import verify as verify_bundle
from tuneship.handoff.manifest import BUNDLE_FILE
from tuneship.infra.errors import TuneshipError
from tuneship.serve.run import build_command
from tuneship.serve.weights import Weights

WEIGHTS = Weights(Path("model"), "bfloat16", "16-bit in bf16", "test")


def test_a_flipped_byte_in_a_weight_file_is_refused_naming_the_file(tmp_path):
    bundle = fake_bundle(tmp_path / "b")
    assert verify_bundle(bundle).served_model_name == "handbook"
    weights = bundle / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(TuneshipError, match=r"model\.safetensors: sha256 differs"):
        verify_bundle(bundle)


def test_missing_and_extra_files_are_refused(tmp_path):
    bundle = fake_bundle(tmp_path / "b")
    (bundle / "model" / "config.json").unlink()
    (bundle / "model" / "extra.bin").write_bytes(b"x")
    with pytest.raises(TuneshipError) as info:
        verify_bundle(bundle)
    assert "config.json: missing" in str(info.value)
    assert "extra.bin: not listed in the manifest" in str(info.value)


def test_not_a_bundle(tmp_path):
    with pytest.raises(TuneshipError, match=r"bundle\.json not found"):
        verify_bundle(tmp_path)
    (tmp_path / BUNDLE_FILE).write_text('{"schema_version": 1}')
    with pytest.raises(TuneshipError, match="not a valid bundle manifest: 'kind': Field required"):
        verify_bundle(tmp_path)


def test_vllm_command_uses_the_bundle_name_and_cpu_settings(tmp_path):
    bundle = fake_bundle(tmp_path / "b")
    manifest = verify_bundle(bundle)
    name, length = manifest.served_model_name, manifest.serving.max_model_len
    weights = Weights(bundle / "model", "bfloat16", "16-bit in bf16", "test")
    argv, env = build_command(
        weights, name, "127.0.0.1", 9000, "cpu", length, extra=("--seed", "1")
    )
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--served-model-name") + 1] == "handbook"
    assert argv[argv.index("--model") + 1] == str(bundle / "model")
    assert argv[argv.index("--max-model-len") + 1] == "2048"
    assert "--enforce-eager" in argv and argv[-2:] == ["--seed", "1"]
    assert argv[argv.index("--dtype") + 1] == "bfloat16"
    assert env["VLLM_CPU_KVCACHE_SPACE"]
    assert argv[argv.index("--middleware") + 1] == "tuneship.serve.middleware.TuneshipMiddleware"
    weights = Weights(bundle / "model", None, "16-bit as stored", "test")
    argv, env = build_command(weights, name, "0.0.0.0", 8000, "cuda", length)
    assert "--enforce-eager" not in argv and "--dtype" not in argv
    assert env == {}


def test_eager_cpu_serving_compiles_nothing_unless_the_operator_says_so(tmp_path, monkeypatch):
    """vLLM's torch.compile'd helpers (the logprobs ranks) need a C++ compiler on CPU at the
    first request that uses them: the serve image has none, so eager CPU serving turns them off."""
    monkeypatch.delenv("TORCH_COMPILE_DISABLE", raising=False)
    _, env = build_command(WEIGHTS, "m", "127.0.0.1", 9000, "cpu", 2048)
    assert env["TORCH_COMPILE_DISABLE"] == "1"
    _, env = build_command(WEIGHTS, "m", "127.0.0.1", 9000, "cpu", 2048, eager=False)
    assert "TORCH_COMPILE_DISABLE" not in env
    _, env = build_command(WEIGHTS, "m", "127.0.0.1", 9000, "cuda", 2048)
    assert "TORCH_COMPILE_DISABLE" not in env  # the CUDA image has its compilers
    monkeypatch.setenv("TORCH_COMPILE_DISABLE", "0")  # the operator's choice stands
    _, env = build_command(WEIGHTS, "m", "127.0.0.1", 9000, "cpu", 2048)
    assert env["TORCH_COMPILE_DISABLE"] == "0"


def test_compiled_cpu_serving_without_a_compiler_is_refused_before_vllm_starts(
    tmp_path, monkeypatch
):
    from tuneship.config.schema import ServeConfig
    from tuneship.serve import run as serve_run

    bundle = fake_bundle(tmp_path / "b")
    monkeypatch.setattr(serve_run, "vllm_flavour", lambda: "cpu")
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(TuneshipError, match=r"needs a C\+\+ compiler, and .*no-such-compiler"):
        serve_run.prepare(bundle, ServeConfig(eager=False), ())
    monkeypatch.setenv("CXX", "sh")  # found on PATH: accepted
    argv, _, _ = serve_run.prepare(bundle, ServeConfig(eager=False), ())
    assert "--enforce-eager" not in argv


@pytest.mark.parametrize(
    ("cores", "preset", "reserved"), [(2, None, "0"), (8, None, None), (2, "1", None)]
)
def test_vllm_computes_on_every_core_of_a_small_cpu_machine(
    tmp_path, monkeypatch, cores, preset, reserved
):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)))
    if preset is None:
        monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    else:
        monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", preset)  # the operator's choice stands
    _, env = build_command(WEIGHTS, "m", "127.0.0.1", 9000, "cpu", 2048)
    assert env.get("VLLM_CPU_NUM_OF_RESERVED_CPU") == reserved
    _, env = build_command(WEIGHTS, "m", "127.0.0.1", 9000, "cuda", 2048)
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in env


def test_serve_settings_become_vllm_limits_and_reach_the_middleware_in_one_piece():
    from tuneship.config.schema import ServeConfig
    from tuneship.serve.middleware import MiddlewareSettings
    from tuneship.serve.run import limit_args

    cfg = ServeConfig(
        api_keys="sk-a, sk-b", api_keys_file="keys.txt", max_running=4, max_waiting=8,
        metrics_auth=True,
    )  # fmt: skip
    assert cfg.capacity == 12 and ServeConfig(max_waiting=0).capacity == 256
    assert limit_args(cfg) == ["--max-num-seqs", "4", "--max-num-queued-reqs", "24"]
    assert limit_args(ServeConfig(max_waiting=0)) == ["--max-num-queued-reqs", "512"]
    assert limit_args(ServeConfig()) == []
    sent = MiddlewareSettings(serve=cfg, bundle_dir="bundles/b").to_env()
    received = MiddlewareSettings.model_validate_json(sent)
    assert received.serve.key_list() == ["sk-a", "sk-b"] and received.serve == cfg
    assert received.bundle_dir == "bundles/b"
    assert "sk-a" not in cfg.model_dump_json() and "sk-a" not in repr(cfg)  # masked elsewhere
    secret = ServeConfig(key_id_secret="s3cret-s3cret-s3cret")
    assert "s3cret" not in secret.model_dump_json() and "s3cret" not in repr(secret)
    sent = MiddlewareSettings(serve=secret).to_env()
    assert MiddlewareSettings.model_validate_json(sent).serve.key_id_secret == secret.key_id_secret


def test_a_symlink_anywhere_in_a_bundle_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "payload.py").write_text("print('not from the bundle')")
    bundle = fake_bundle(tmp_path / "b")
    (bundle / "model" / "extra").symlink_to(outside)  # hashing never entered it
    with pytest.raises(TuneshipError, match=r"model/extra: a symlink"):
        verify_bundle(bundle)
    (bundle / "model" / "extra").unlink()
    config = bundle / "model" / "config.json"
    (outside / "config.json").write_text(config.read_text())
    config.unlink()
    config.symlink_to(outside / "config.json")  # same bytes, but it can change under the bundle
    with pytest.raises(TuneshipError, match=r"model/config\.json: a symlink"):
        verify_bundle(bundle)


@pytest.mark.parametrize("name", ["../../etc", "a/b", "..", ".hidden", "a b"])
def test_an_adapter_name_that_could_leave_the_bundle_is_refused(tmp_path, name):
    bundle = fake_bundle(tmp_path / "b")
    manifest = json.loads((bundle / BUNDLE_FILE).read_text())
    manifest["adapters"] = {name: {"run": "r", "run_json_sha256": "0", "rank": 8, "files": {}}}
    (bundle / BUNDLE_FILE).write_text(json.dumps(manifest))
    with pytest.raises(TuneshipError, match=r"adapters.*name"):
        verify_bundle(bundle)


def test_a_pinned_bundle_json_sha256_refuses_an_edited_manifest(tmp_path, monkeypatch):
    bundle = fake_bundle(tmp_path / "b")
    pinned = hashlib.sha256((bundle / BUNDLE_FILE).read_bytes()).hexdigest()
    assert verify_bundle(bundle, pinned).served_model_name == "handbook"
    manifest = json.loads((bundle / BUNDLE_FILE).read_text())
    manifest["served_model_name"] = "gpt-4"  # edited, hashes of the weights left as they were
    (bundle / BUNDLE_FILE).write_text(json.dumps(manifest))
    assert verify_bundle(bundle).served_model_name == "gpt-4"  # unpinned: nothing can tell
    with pytest.raises(TuneshipError, match=f"not the pinned {pinned}"):
        verify_bundle(bundle, pinned)
    from tuneship.config.schema import ServeConfig
    from tuneship.serve.run import prepare

    monkeypatch.setattr("tuneship.serve.run.vllm_flavour", lambda: "cpu")
    with pytest.raises(TuneshipError, match="not the pinned"):
        prepare(bundle, ServeConfig(bundle_sha256=pinned), ())  # what `tuneship serve` runs
    assert ServeConfig(bundle_sha256=pinned.upper()).bundle_sha256 == pinned
    with pytest.raises(ValueError, match="bundle_sha256"):
        ServeConfig(bundle_sha256="abc")


LLAMA_70B = {
    "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 80, "hidden_size": 8192,
    "num_attention_heads": 64, "num_key_value_heads": 8, "max_position_embeddings": 8192,
}  # fmt: skip


def big_bundle(root: Path, **serving) -> Path:
    """A fake bundle of a 70B W4A16 model: its config.json, a 37 GB size, the preflight's
    engine settings in bundle.json's serving section."""
    bundle = fake_bundle(root)
    manifest = json.loads((bundle / BUNDLE_FILE).read_text())
    (bundle / "model" / "config.json").write_text(json.dumps(LLAMA_70B))
    manifest["files"]["config.json"] = hashlib.sha256(json.dumps(LLAMA_70B).encode()).hexdigest()
    manifest["sizes"]["model_bytes"] = 37_000_000_000
    manifest["serving"] |= {"max_model_len": 8192, "startup_s": 300.0, **serving}
    (bundle / BUNDLE_FILE).write_text(json.dumps(manifest))
    return bundle


def test_engine_settings_come_from_the_bundle_unless_the_operator_overrides_them(
    tmp_path, monkeypatch
):
    from tuneship.config.schema import ServeConfig
    from tuneship.serve.run import prepare

    monkeypatch.setattr("tuneship.serve.run.vllm_flavour", lambda: "cuda")
    bundle = big_bundle(tmp_path / "b", tensor_parallel_size=4, gpu_memory_utilization=0.92,
                        max_num_batched_tokens=8192, max_num_seqs=64)  # fmt: skip

    def flags(argv: list[str]) -> dict[str, str]:
        names = ("--tensor-parallel-size", "--gpu-memory-utilization",
                 "--max-num-batched-tokens", "--max-num-seqs")  # fmt: skip
        return {n: argv[argv.index(n) + 1] for n in names if n in argv}

    argv, _, _ = prepare(bundle, ServeConfig(), ())
    assert flags(argv) == {"--tensor-parallel-size": "4", "--gpu-memory-utilization": "0.92",
                           "--max-num-batched-tokens": "8192", "--max-num-seqs": "64"}  # fmt: skip
    cfg = ServeConfig(tensor_parallel_size=8, gpu_memory_utilization=0.8, max_running=32)
    argv, _, _ = prepare(bundle, cfg, ())
    assert flags(argv) == {"--tensor-parallel-size": "8", "--gpu-memory-utilization": "0.8",
                           "--max-num-batched-tokens": "8192", "--max-num-seqs": "32"}  # fmt: skip
    argv, _, _ = prepare(fake_bundle(tmp_path / "small"), ServeConfig(), ())
    assert flags(argv) == {}  # nothing recorded, nothing set: vLLM's defaults


def test_the_export_records_its_preflight_engine_settings(tmp_path):
    from tuneship.config.schema import ExportConfig
    from tuneship.export.run import serving_info
    from tuneship.handoff.bundles import engine_arguments

    cfg = ExportConfig(tensor_parallel_size=2, gpu_memory_utilization=0.85, max_num_seqs=128)
    assert engine_arguments(cfg.engine()) == [
        "--tensor-parallel-size", "2", "--gpu-memory-utilization", "0.85", "--max-num-seqs", "128",
    ]  # fmt: skip
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA_70B))
    info = serving_info(model, None, cfg)
    assert (info.tensor_parallel_size, info.gpu_memory_utilization) == (2, 0.85)
    assert (info.max_num_seqs, info.max_num_batched_tokens) == (128, None)


def test_dry_run_prints_the_kv_cache_capacity_it_implies(tmp_path, monkeypatch, capsys):
    from tuneship.config.schema import ServeConfig
    from tuneship.serve.run import run

    monkeypatch.setattr("tuneship.serve.run.vllm_flavour", lambda: "cuda")
    monkeypatch.setattr("tuneship.serve.run.signal.signal", lambda *a: None)
    bundle = big_bundle(tmp_path / "b", tensor_parallel_size=4, gpu_memory_utilization=0.9)
    assert run(bundle, ServeConfig(gpu_memory_gib=80), dry_run=True) == 0
    out = capsys.readouterr().out
    # 2 (K, V) x 80 layers x 8 KV heads x 128 dims x 2 bytes = 320 KiB per token, 80 KiB per
    # GPU at tensor_parallel_size 4; 8192 tokens: 640 MiB per sequence per GPU. 80 GiB x 0.9 -
    # 37 GB / 4 (8.6 GiB) - 2 GiB = 61.4 GiB: 98 sequences at full length
    assert "320.0 KiB per token (80.0 KiB per GPU" in out
    assert "640.0 MiB per sequence per GPU" in out
    assert "98 sequences of 8192 tokens" in out
    # the startup probe needs hashing (37 GB at 200 MB/s: 185 s) + loading (300 s)
    assert "startup: ~185 s hashing + ~300 s loading" in out


def test_the_kv_estimate_matches_what_vllm_reports_on_cpu():
    from tuneship.serve.capacity import kv_bytes_per_token

    smollm2 = {"num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9,
               "num_key_value_heads": 3}  # fmt: skip
    # vLLM 0.32 on CPU, VLLM_CPU_KVCACHE_SPACE=2 with the e2e bundle (SmolLM2-135M): "CPU KV
    # cache size: 93,184 tokens, Maximum concurrency for 4,096 tokens per request: 22.75x"
    assert kv_bytes_per_token(smollm2, 1) == (23040, 23040)
    assert (2 << 30) // 23040 == 93206 and round(93184 / 4096, 2) == 22.75
