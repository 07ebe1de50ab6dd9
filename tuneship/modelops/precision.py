"""The compute precision every stage uses, chosen from the machine by one rule.

bf16 where the hardware computes it natively: CUDA that supports it (else fp16), and CPUs with
AMX or AVX512-BF16 whose torch kernels use them. fp32 on every other CPU: without native bf16
(AVX2 only, or AVX-512 without BF16) torch emulates it, and a bf16 matmul takes 100 times as
long as the fp32 one (docs/benchmarks.md, "CPU classes"). The rule (`pick`) takes the machine's
capability as a value, so it is tested for machines the tests do not run on; `detect` reads it
from torch. Artefacts do not follow the compute precision: merged checkpoints and bundles keep
their 16-bit tensors in bf16 whatever the machine that made them.

vLLM's 4-bit CPU kernel (`cpu_gemm_wna16`, used for W4A16 bundles) is built into its AVX-512
libraries only (vLLM issue 55613), and takes bf16 activations only: `Capability.wna16_kernel`
says whether the vLLM on this machine has it.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

Name = Literal["bf16", "fp16", "fp32"]
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) below which it has no bf16 instructions
ONEDNN_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE",
                       "AVX512_CORE_VNNI")  # fmt: skip
BF16_COST = (
    "a bf16 matmul takes about 100x as long as in fp32 here (1,506 ms against 12 ms for "
    "1024x576 by 576x1536 on an AVX2 CPU; docs/benchmarks.md)"
)


@dataclass(frozen=True)
class Capability:
    """What the machine offers for compute, as torch sees it."""

    device: Literal["cuda", "cpu"]
    arch: str = "x86_64"
    cuda_bf16: bool = False
    avx512: bool = False
    avx512_bf16: bool = False
    amx: bool = False
    arm_bf16: bool = False
    torch_isa: str = ""  # torch.backends.cpu.get_cpu_capability(): AVX2, AVX512, SVE256, ...
    onednn_max_isa: str = ""  # ONEDNN_MAX_CPU_ISA, where set

    @property
    def native_bf16(self) -> bool:
        if self.device == "cuda":
            return self.cuda_bf16
        if self.arch in ("aarch64", "arm64"):
            return self.arm_bf16
        capped = self.onednn_max_isa.upper() in ONEDNN_WITHOUT_BF16
        return (self.amx or self.avx512_bf16) and self.torch_isa.startswith("AVX512") and not capped

    @property
    def wna16_kernel(self) -> bool:
        """vLLM's CPU build has its 4-bit kernel here (it loads its AVX-512 library)."""
        return self.device == "cpu" and self.arch in ("x86_64", "AMD64") and self.avx512

    def describe(self) -> str:
        if self.device == "cuda":
            return "CUDA GPU" + (" with bf16" if self.cuda_bf16 else " without bf16")
        if self.arch in ("aarch64", "arm64"):
            return "arm64 CPU" + (" with bf16" if self.arm_bf16 else " without bf16")
        features = [f for f, on in (("AMX", self.amx), ("AVX512-BF16", self.avx512_bf16)) if on]
        if not features:
            features = ["AVX-512, no BF16"] if self.avx512 else ["AVX2, no AVX-512"]
        isa = f", torch kernels {self.torch_isa}" if self.torch_isa else ""
        capped = f", oneDNN capped at {self.onednn_max_isa}" if self.onednn_max_isa else ""
        return f"x86-64 CPU with {' and '.join(features)}{isa}{capped}"

    def as_dict(self) -> dict:
        return asdict(self) | {"native_bf16": self.native_bf16, "wna16_kernel": self.wna16_kernel}


@dataclass(frozen=True)
class Precision:
    """The precision a stage computes in, why, and a warning when the choice is a costly one."""

    name: Name
    reason: str
    warning: str | None = None

    @property
    def torch_dtype(self):  # torch.dtype; torch is imported only by the stages that compute
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.name]

    @property
    def vllm_dtype(self) -> str:
        return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[self.name]

    def record(self) -> dict[str, str]:
        return {"precision": self.name, "reason": self.reason}


def pick(requested: str, cap: Capability) -> Precision:
    """The rule: `auto` follows the hardware; an explicit choice is honoured (fp16 needs CUDA),
    with a warning where it is slow."""
    where = cap.describe()
    if requested == "auto":
        if cap.device == "cuda":
            name: Name = "bf16" if cap.cuda_bf16 else "fp16"
            return Precision(name, f"auto: {name} on a {where}")
        if cap.native_bf16:
            return Precision("bf16", f"auto: bf16, native on this {where}")
        return Precision("fp32", f"auto: fp32, as this {where} has no native bf16")
    if requested == "fp16" and cap.device != "cuda":
        from tuneship.infra.errors import TuneshipError

        raise TuneshipError("precision fp16 needs CUDA; use auto, fp32 or bf16 on CPU")
    if requested not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"unknown precision {requested!r}")
    warning = None
    if requested == "bf16" and not cap.native_bf16 and cap.device == "cpu":
        warning = (
            f"precision bf16 on this {where}, which has no native bf16: {BF16_COST}. "
            "Set precision: auto (fp32 here) to avoid it."
        )
    return Precision(requested, f"set to {requested}", warning)  # type: ignore[arg-type]


def detect() -> Capability:
    """This machine's capability, from torch (CUDA when torch sees a GPU)."""
    import torch

    if torch.cuda.is_available():
        return Capability("cuda", platform.machine(), cuda_bf16=torch.cuda.is_bf16_supported())
    arch = platform.machine()
    return Capability(
        "cpu",
        arch,
        avx512=bool(torch.cpu._is_avx512_supported()),
        avx512_bf16=bool(torch.cpu._is_avx512_bf16_supported()),
        amx=bool(torch.cpu._is_amx_tile_supported()),
        arm_bf16=arch in ("aarch64", "arm64") and "bf16" in cpu_flags(),
        torch_isa=torch.backends.cpu.get_cpu_capability(),
        onednn_max_isa=os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
    )


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def compute_precision(requested: str = "auto") -> tuple[Precision, Capability]:
    """The rule on this machine; its warning, if any, printed once (stderr)."""
    cap = detect()
    chosen = pick(requested, cap)
    if chosen.warning:
        print(f"warning: {chosen.warning}", file=sys.stderr, flush=True)
    return chosen, cap
