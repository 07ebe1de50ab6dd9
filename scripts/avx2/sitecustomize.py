"""A CPU without AVX-512, simulated on an AVX-512 one, for tests and benchmarks.

With this folder on PYTHONPATH and ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 in the
environment (tests/support.py: AVX2_ENV), a process sees what it would see on an AVX2-only
machine: torch's own kernels and oneDNN stop at AVX2 (a bf16 matmul is about 100x slower than
fp32 there too), and torch reports no AVX-512, so vLLM's CPU build loads its AVX2 library, which
has no 4-bit kernel (cpu_gemm_wna16; vLLM issue 55613). Every process Python starts with this
environment (vLLM's engine and workers too) imports it first.

SIMULATED_CPU=no-vllm-4bit-kernel (without the two variables above) hides only AVX-512 from
vLLM's choice of library: native bf16 stays, the 4-bit kernel goes (NO_KERNEL_ENV).
"""

import os

import torch.cpu

torch.cpu._is_avx512_supported = lambda: False
if os.environ.get("SIMULATED_CPU", "avx2") == "avx2":
    torch.cpu._is_avx512_bf16_supported = lambda: False
    torch.cpu._is_avx512_vnni_supported = lambda: False
    torch.cpu._is_amx_tile_supported = lambda: False
    torch.cpu._is_amx_fp16_supported = lambda: False
