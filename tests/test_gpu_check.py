"""scripts/gpu_check.py at toy scale on CPU: the LoRA check trains and is measured beside the
fit estimate; the QLoRA check says why it was skipped where there is no CUDA."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.support import REPO

pytestmark = pytest.mark.processes


def test_gpu_check_runs_tiny_on_cpu(tmp_path, tiny_base):
    work = tmp_path / "work"
    argv = [sys.executable, "scripts/gpu_check.py", "--work", str(work), "--tiny",
            "--tokenizer", str(tiny_base), "--steps", "2", "--batch-size", "2",
            "--max-length", "64"]  # fmt: skip
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((work / "gpu-check.json").read_text())
    lora = results["lora"]
    assert lora["steps"] == 2 and lora["tokens_per_s"] > 0 and lora["peak_memory_bytes"] > 0
    weights = load_file(work / "base-tiny" / "model.safetensors")
    assert lora["estimate"]["parameters"] == sum(v.numel() for v in weights.values())
    assert lora["estimate"]["tokens_per_micro_batch"] == 2 * 64
    assert lora["estimate_bytes"] > 0 and "| lora | 2 x 64 |" in done.stdout
    if not torch.cuda.is_available():
        assert "no GPU here" in results["qlora"]["skipped"]
        assert lora["estimate_tokens_per_s"] is None  # no GPU to estimate the speed of
