"""What a bundle needs to serve, estimated before a GPU is booked: how many sequences the KV
cache holds at max_model_len, and how long a start takes (hashing, then loading). Printed by
`tuneship serve` at every start, so `--dry-run` shows it too.

Estimates, said as such: vLLM measures the real activation peak when it starts, and the KV
cache here is 16-bit (vLLM's default --kv-cache-dtype auto for 16-bit activations).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

from tuneship.config.schema import VLLM_DEFAULT_MAX_NUM_SEQS, ServeConfig
from tuneship.handoff.manifest import BundleManifest

GIB = 1 << 30
KV_BYTES = 2  # a 16-bit cache
ACTIVATION_RESERVE_GIB = 2.0  # per GPU; vLLM profiles the real peak at start
# reading a bundle from a network volume and hashing it; sha256 alone ran at 1.7 GB/s on one
# core of the CI machine, so the storage is the bound
HASH_BYTES_PER_S = 200e6


def _size(n: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def kv_bytes_per_token(config: dict, tp: int) -> tuple[int, int] | None:
    """KV-cache bytes per token, (whole model, per GPU at tensor parallelism tp), from a
    Hugging Face config.json; None when it lacks the dimensions. K and V for each layer and
    KV head; vLLM splits KV heads over the GPUs and replicates them when there are fewer."""
    text = config.get("text_config") or config
    layers, heads = text.get("num_hidden_layers"), text.get("num_attention_heads")
    if not layers or not heads:
        return None
    kv_heads = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim") or text.get("hidden_size", 0) // heads
    if not head_dim:
        return None
    per_head = 2 * layers * head_dim * KV_BYTES
    return per_head * kv_heads, per_head * max(1, kv_heads // tp)


def gpu_memory_gib(cfg: ServeConfig) -> float | None:
    """Memory of one GPU: the setting, else nvidia-smi's first GPU (never a CUDA context in
    this process: it would hold GPU memory for as long as the server runs)."""
    if cfg.gpu_memory_gib is not None or shutil.which("nvidia-smi") is None:
        return cfg.gpu_memory_gib
    query = ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"]
    try:
        done = subprocess.run(query, capture_output=True, text=True, timeout=10, check=True)
        return int(done.stdout.split()[0]) / 1024
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def kv_line(
    manifest: BundleManifest, cfg: ServeConfig, model_dir: Path, flavour: str, env: dict
) -> str:
    max_len = cfg.max_model_len or manifest.serving.max_model_len
    tp = cfg.tensor_parallel_size or 1
    try:
        sizes = kv_bytes_per_token(json.loads((model_dir / "config.json").read_text()), tp)
    except (OSError, ValueError):
        sizes = None
    if sizes is None:
        return "KV cache: unknown (config.json lacks the layer and head counts)"
    whole, per_gpu = sizes
    per_sequence = per_gpu * max_len
    if flavour == "cpu":
        budget = float(env.get("VLLM_CPU_KVCACHE_SPACE", 0)) * GIB
        line = (
            f"KV cache: {_size(whole)} per token; {_size(per_sequence)} per sequence at "
            f"max_model_len {max_len}; VLLM_CPU_KVCACHE_SPACE {_size(budget)}"
        )
    else:
        line = (
            f"KV cache: {_size(whole)} per token ({_size(per_gpu)} per GPU at "
            f"tensor_parallel_size {tp}); {_size(per_sequence)} per sequence per GPU at "
            f"max_model_len {max_len}; "
        )
        memory = gpu_memory_gib(cfg)
        if memory is None:
            return line + "set gpu_memory_gib (memory of one GPU) for the sequences that fit"
        util = cfg.gpu_memory_utilization or 0.9
        weights = manifest.sizes.model_bytes / tp
        budget = memory * GIB * util - weights - ACTIVATION_RESERVE_GIB * GIB
        line += (
            f"{memory:g} GiB x {util:g} - weights {_size(weights)} - ~{ACTIVATION_RESERVE_GIB:g}"
            f" GiB activations = {_size(max(budget, 0))} per GPU"
        )
    fits = max(0, math.floor(budget / per_sequence))
    running = cfg.max_running or VLLM_DEFAULT_MAX_NUM_SEQS
    line += f": {fits} sequences of {max_len} tokens fit"
    if fits < running:
        line += f" (max_running {running}: beyond that vLLM preempts when contexts grow long)"
    return line


def startup_line(manifest: BundleManifest) -> str:
    """How long a start takes, to size the Kubernetes startupProbe from the bundle."""
    hashing = manifest.sizes.model_bytes / HASH_BYTES_PER_S
    load = manifest.serving.startup_s
    if load is None:
        return f"startup: ~{hashing:.0f} s hashing + loading (no preflight time recorded)"
    total = hashing + load
    return (
        f"startup: ~{hashing:.0f} s hashing + ~{load:.0f} s loading (the export's preflight) = "
        f"~{total:.0f} s; give the startupProbe at least twice that (periodSeconds 10, "
        f"failureThreshold {math.ceil(2 * total / 10)})"
    )
