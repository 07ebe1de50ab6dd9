"""A run folder as the stages after training read it: its files checked against run.json before
any model loads, and its training conversations rebuilt from the stored data settings."""

from __future__ import annotations

from pathlib import Path

from tuneship.chat.mixing import prepare
from tuneship.chat.records import Conversation
from tuneship.config.schema import DataMix
from tuneship.handoff.manifest import RUN_FILE, RunManifest, verify_files
from tuneship.infra.errors import ProblemsError
from tuneship.infra.fsutil import sha256_file


def check_run(run_dir: Path, manifest: RunManifest) -> None:
    """Cheap checks before any load: adapter, base weights and data match the run manifest."""
    problems = verify_files(run_dir / "adapter", manifest.adapter)
    base = Path(manifest.base.path)
    if base.is_dir():
        for rel, digest in manifest.base.weights_sha256.items():
            if not (base / rel).is_file():
                problems.append(f"base weights {base / rel}: missing")
            elif sha256_file(base / rel) != digest:
                problems.append(f"base weights {base / rel}: differ from the ones trained on")
    for dataset in manifest.datasets:
        path = Path(dataset.path)
        if not path.is_file():
            problems.append(
                f"{dataset.role} data {path}: missing (the export samples the training "
                "conversations for GPTQ calibration and checks)"
            )
        elif sha256_file(path) != dataset.sha256:
            problems.append(f"{dataset.role} data {path}: changed since training")
    if problems:
        raise ProblemsError(f"run {run_dir} does not match its {RUN_FILE}:", problems)


def training_conversations(manifest: RunManifest) -> list[Conversation]:
    """The conversations the run trained on, rebuilt from its stored data settings (limit,
    de-duplication, eval split and mixing are deterministic)."""
    return prepare(DataMix.from_stored(manifest.config)).train
