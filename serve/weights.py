"""What vLLM loads on this machine, and in which dtype (serve, the export's preflight, bundle check
and eval all start vLLM through this).

On CUDA: the checkpoint as it is, in its own dtype. On CPU the compute precision follows the
machine (tuneship/modelops/precision.py): bf16 where it is native, fp32 elsewhere. A W4A16
checkpoint needs vLLM's 4-bit CPU kernel, which exists only in vLLM's AVX-512 libraries and
takes bf16 activations only (vLLM issue 55613). Where it cannot run (an AVX2 CPU, or one without
native bf16), vLLM is given a copy dequantized from the W4A16 tensors instead: every weight
exactly (q - zero point) x scale in fp32, so the numbers served are the bundle's 4-bit weights,
never the merged 16-bit model's. The copy is made once per checkpoint (keyed by its files'
sha256) under TUNESHIP_HOME/dequantized, checked against its own hashes when reused, and costs
the memory of a 16-bit-or-wider model (measured in docs/benchmarks.md, "CPU classes").
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from tuneship.infra.errors import TuneshipError
from tuneship.infra.fsutil import hash_tree, staged_dir
from tuneship.infra.paths import home
from tuneship.modelops.precision import Capability, detect, pick

RECORD = "dequantized.json"
PACKED = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")
KERNEL = "vLLM's 4-bit CPU kernel (cpu_gemm_wna16)"


@dataclass(frozen=True)
class Weights:
    """What vLLM loads (model_dir), its --dtype (None: the checkpoint's own), both in words,
    and whether model_dir is still to be replaced by its dequantized copy (prepare)."""

    model_dir: Path
    dtype: str | None
    served_as: str
    why: str
    dequantize: bool = False

    def line(self) -> str:
        return f"weights: {self.served_as} ({self.why})"


EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def is_moe(model_dir: Path) -> bool:
    """A mixture-of-experts model (its config counts experts)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    text = config.get("text_config") or config
    return any(isinstance(text.get(key), int) and text[key] > 1 for key in EXPERT_KEYS)


def is_w4a16(model_dir: Path) -> bool:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    quantization = config.get("quantization_config") or {}
    return quantization.get("quant_method") == "compressed-tensors" and (
        quantization.get("format") == "pack-quantized"
    )


def plan(model_dir: Path, flavour: str, cap: Capability | None = None) -> Weights:
    """The decision alone (cheap: no copy made). cap: this machine's, unless given."""
    model_dir = Path(model_dir)
    quantized = is_w4a16(model_dir)
    form = "W4A16" if quantized else "16-bit"
    if flavour != "cpu":
        return Weights(model_dir, None, f"{form} as stored", "CUDA: vLLM's GPU kernels")
    cap = cap or detect()
    precision = pick("auto", cap)
    if not quantized:
        return Weights(model_dir, precision.vllm_dtype, f"16-bit in {precision.name}",
                       precision.reason)  # fmt: skip
    moe = is_moe(model_dir)
    if cap.wna16_kernel and precision.name == "bf16" and not moe:
        return Weights(model_dir, "bfloat16", f"W4A16 through {KERNEL}, bf16 activations",
                       f"{cap.describe()}: the kernel is there")  # fmt: skip
    if moe:
        missing = (
            "vLLM's CPU build has no 4-bit kernel for mixture-of-experts layers (it fails "
            "with 'No WNA16 MoE backend supports the deployment configuration')"
        )
    elif cap.wna16_kernel:
        missing = (
            f"{KERNEL} takes bf16 activations only, and this {cap.describe()} has no native bf16"
        )
    else:
        missing = (
            "vLLM's CPU build has no 4-bit kernel without AVX-512 (vLLM issue 55613): "
            f"this is an {cap.describe()}"
        )
    return Weights(
        model_dir,
        precision.vllm_dtype,
        f"W4A16 dequantized to an fp32 copy, computed in {precision.name}",
        missing,
        dequantize=True,
    )


def prepare(model_dir: Path, flavour: str, files: dict[str, str] | None = None) -> Weights:
    """plan(), with the dequantized copy made (or reused) where the plan needs one. files: the
    checkpoint's sha256 per file when already verified (a bundle), else they are hashed."""
    weights = plan(model_dir, flavour)
    if not weights.dequantize:
        return weights
    source = files if files is not None else hash_tree(Path(model_dir))
    copy = dequantized_copy(Path(model_dir), source)
    return Weights(copy, weights.dtype, weights.served_as, weights.why)


def dequantized_copy(model_dir: Path, source: dict[str, str]) -> Path:
    """The fp32 copy of a W4A16 checkpoint, made once per set of source files."""
    key = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()
    target = home() / "dequantized" / key[:32]
    if reusable(target, key):
        return target
    print(f"dequantizing {model_dir} to {target} (fp32, once per bundle) ...", flush=True)
    with staged_dir(target) as stage:
        dequantize(model_dir, stage)
        record = {"source_sha256": key, "files": hash_tree(stage)}
        (stage / RECORD).write_text(json.dumps(record, indent=2))
    return target


def reusable(target: Path, key: str) -> bool:
    """A finished copy of this source whose files still hash as they did when made."""
    try:
        record = json.loads((target / RECORD).read_text())
    except (OSError, ValueError):
        return False
    if record.get("source_sha256") != key:
        return False
    current = {k: v for k, v in hash_tree(target).items() if k != RECORD}
    return current == record.get("files")


def dequantize(model_dir: Path, out_dir: Path) -> None:
    """Every pack-quantized weight of model_dir as (q - zero point) x scale in fp32, the other
    tensors widened to fp32, into out_dir with the tokenizer and a config without
    quantization_config. compressed-tensors does the unpacking and the arithmetic."""
    import torch
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors import safe_open
    from safetensors.torch import save_file

    config = json.loads((model_dir / "config.json").read_text())
    groups = list(config["quantization_config"]["config_groups"].values())
    if len(groups) != 1:
        raise TuneshipError(
            f"{model_dir}: {len(groups)} quantization groups; a dequantized copy is made for "
            "the one-group W4A16 checkpoints tuneship exports"
        )
    scheme = QuantizationScheme.model_validate(groups[0])
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors: dict[str, torch.Tensor] = {}
        packed: dict[str, dict[str, torch.Tensor]] = {}
        with safe_open(str(path), "pt") as source:
            for name in source.keys():  # noqa: SIM118 (safe_open has no __iter__)
                module, _, leaf = name.rpartition(".")
                if leaf in PACKED:
                    packed.setdefault(module, {})[leaf] = source.get_tensor(name)
                else:
                    tensor = source.get_tensor(name)
                    tensors[name] = tensor.float() if tensor.is_floating_point() else tensor
        for module, state in packed.items():
            state["weight_scale"] = state["weight_scale"].float()  # q x scale exact in fp32
            tensors[f"{module}.weight"] = PackedQuantizationCompressor.decompress(state, scheme)[
                "weight"
            ].float()
        save_file(tensors, str(out_dir / path.name), metadata={"format": "pt"})
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        mapping = json.loads(index.read_text())
        weight_map = {}
        for name, shard in mapping["weight_map"].items():
            module, _, leaf = name.rpartition(".")
            weight_map[f"{module}.weight" if leaf in PACKED else name] = shard
        (out_dir / index.name).write_text(json.dumps({"weight_map": weight_map}, indent=2))
    written = ("config.json", index.name)
    for extra in model_dir.iterdir():
        if extra.is_file() and extra.suffix != ".safetensors" and extra.name not in written:
            shutil.copy(extra, out_dir / extra.name)
    config.pop("quantization_config")
    config["dtype"] = "float32"
    config.pop("torch_dtype", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
