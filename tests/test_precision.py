"""The compute-precision rule (tuneship/modelops/precision.py) for machines the tests do not run
on: the capability is a value, so each class is one line here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support import AVX2_ENV
from tuneship.infra.errors import TuneshipError
from tuneship.modelops.precision import Capability, pick

AMX = Capability("cpu", avx512=True, avx512_bf16=True, amx=True, torch_isa="AVX512")
ZEN4 = Capability("cpu", avx512=True, avx512_bf16=True, torch_isa="AVX512")
SKYLAKE = Capability("cpu", avx512=True, torch_isa="AVX512")
ZEN3 = Capability("cpu", torch_isa="AVX2")
# AVX512-BF16 hardware whose torch was told to stop at AVX2 (the simulation of ZEN3)
CAPPED = Capability("cpu", avx512=True, avx512_bf16=True, torch_isa="AVX2",
                    onednn_max_isa="AVX2")  # fmt: skip
GRAVITON3 = Capability("cpu", arch="aarch64", arm_bf16=True, torch_isa="SVE256")
GRAVITON2 = Capability("cpu", arch="aarch64", torch_isa="DEFAULT")
H100 = Capability("cuda", cuda_bf16=True)
T4 = Capability("cuda")


@pytest.mark.parametrize(
    ("cap", "auto", "kernel"),
    [(AMX, "bf16", True), (ZEN4, "bf16", True), (SKYLAKE, "fp32", True), (ZEN3, "fp32", False),
     (CAPPED, "fp32", True), (GRAVITON3, "bf16", False), (GRAVITON2, "fp32", False),
     (H100, "bf16", False), (T4, "fp16", False)],
)  # fmt: skip
def test_auto_follows_native_bf16_and_the_4bit_kernel_follows_avx512(cap, auto, kernel):
    chosen = pick("auto", cap)
    assert chosen.name == auto and chosen.warning is None
    assert chosen.reason.startswith(f"auto: {auto}")
    assert cap.wna16_kernel is kernel


def test_bf16_where_it_is_emulated_is_honoured_with_one_warning_that_gives_cost_and_fix():
    for cap in (ZEN3, SKYLAKE, CAPPED, GRAVITON2):
        chosen = pick("bf16", cap)
        assert chosen.name == "bf16" and chosen.reason == "set to bf16"
        assert "about 100x" in chosen.warning and "precision: auto (fp32 here)" in chosen.warning
    assert pick("bf16", ZEN4).warning is None and pick("fp32", ZEN4).warning is None
    assert pick("bf16", T4).warning is None  # a GPU's own business


def test_fp16_needs_cuda():
    assert pick("fp16", T4).name == "fp16"
    with pytest.raises(TuneshipError, match="fp16 needs CUDA"):
        pick("fp16", AMX)


def test_the_reason_names_the_machine():
    assert "AVX2, no AVX-512" in pick("auto", ZEN3).reason
    assert "AMX and AVX512-BF16" in pick("auto", AMX).reason
    assert "oneDNN capped at AVX2" in pick("auto", CAPPED).reason


DETECT = (
    "import json; from tuneship.modelops.precision import compute_precision; "
    "p, c = compute_precision(); print(json.dumps([p.name, c.as_dict()]))"
)


def test_the_simulated_avx2_machine_is_detected_as_one():
    """scripts/avx2 (what the AVX2 tests run under) makes this machine look like an AVX2 one
    to torch's checks, whatever its class."""
    done = subprocess.run(
        [sys.executable, "-c", DETECT], env=os.environ | AVX2_ENV, capture_output=True, text=True
    )
    name, cap = json.loads(done.stdout)
    assert name == "fp32" and not cap["native_bf16"] and not cap["wna16_kernel"], done.stderr
    assert cap["torch_isa"] == "AVX2"
