"""`tuneship bundle verify|show`: re-hash a bundle against bundle.json, or summarise it.

Core code (standard library + pydantic): runs in the train and the serve environment alike, and is
what `tuneship serve` runs before it starts vLLM.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tuneship.handoff.manifest import (
    BUNDLE_FILE,
    CHECKS_FILE,
    BundleManifest,
    Check,
    CheckRecord,
    ScaleTuningInfo,
    read_bundle,
    read_manifest,
    verify_files,
)
from tuneship.infra.errors import ProblemsError
from tuneship.infra.fsutil import sha256_file, symlinks_under


def verify(
    bundle_dir: Path, bundle_sha256: str | None = None, require_checked: bool = True
) -> BundleManifest:
    """Raise TuneshipError naming every file that is missing, changed, unlisted, unreadable or
    a symlink (hashing would follow a file link out of the bundle and never enter a linked
    folder), every check that failed (or, with require_checked, has not run yet), or when
    bundle.json's sha256 is not the pinned bundle_sha256. The manifest returned carries the
    verdicts of `tuneship bundle check` (checks.json) where it ran."""
    bundle_dir = Path(bundle_dir)
    problems = [
        f"{link}: a symlink (a bundle holds plain files only; copy the file in)"
        for link in symlinks_under(bundle_dir)
    ]
    problems += unreadable(bundle_dir)
    if problems:  # nothing can be hashed before these are fixed
        raise ProblemsError(f"bundle {bundle_dir} failed verification:", problems)
    manifest = read_bundle(bundle_dir, bundle_sha256)
    problems = with_recorded_checks(bundle_dir, manifest)
    problems += verify_files(bundle_dir / "model", manifest.files)
    if (bundle_dir / "merged").is_dir():
        problems += verify_files(bundle_dir / "merged", manifest.merged_files)
    for name, adapter in manifest.adapters.items():
        problems += verify_files(bundle_dir / "adapters" / name, adapter.files)
    problems += [f"check '{name}' failed" for name in manifest.failed_checks()]
    if require_checked and manifest.pending_checks():
        problems.append(
            f"checks not run yet: {', '.join(manifest.pending_checks())} (the bundle was exported "
            f"without vLLM): run `tuneship bundle check {bundle_dir}` where vLLM is installed"
        )
    if problems:
        raise ProblemsError(f"bundle {bundle_dir} failed verification:", problems)
    return manifest


def with_recorded_checks(bundle_dir: Path, manifest: BundleManifest) -> list[str]:
    """Put checks.json's verdicts into the manifest (in memory); problems if it is not this
    bundle's."""
    path = bundle_dir / CHECKS_FILE
    if not path.is_file():
        return []
    record = read_manifest(path, CheckRecord, "check record", "written by `tuneship bundle check`")
    if record.bundle_json_sha256 != sha256_file(bundle_dir / BUNDLE_FILE):
        return [
            f"{path} was written for another bundle.json (edited since the check?): run "
            f"`tuneship bundle check {bundle_dir}` again"
        ]
    manifest.checks = manifest.checks | record.checks
    return []


def unreadable(bundle_dir: Path) -> list[str]:
    """Files and folders the serving user could not read (vLLM would fail on them later)."""
    problems = []
    for path in sorted([bundle_dir, *bundle_dir.rglob("*")]):
        if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
            problems.append(
                f"{path}: not readable by this user (uid {os.getuid()}); bundles are "
                "written world-readable, so its mode was changed (chmod -R a+rX)"
            )
    return problems


def vllm_rank(rank: int) -> int:
    """vLLM accepts a fixed set of max_lora_rank values: the smallest one that fits."""
    for allowed in (8, 16, 32, 64, 128, 256, 320, 512):
        if rank <= allowed:
            return allowed
    return rank


def lora_arguments(bundle_dir: Path, ranks: dict[str, int]) -> list[str]:
    """vLLM flags that serve every adapter of a bundle under its own name."""
    if not ranks:
        return []
    args = ["--enable-lora", "--max-loras", str(len(ranks))]
    args += ["--max-lora-rank", str(vllm_rank(max(ranks.values())))]
    args += ["--lora-modules", *(f"{n}={Path(bundle_dir) / 'adapters' / n}" for n in ranks)]
    return args


ENGINE_FLAGS = {
    "tensor_parallel_size": "--tensor-parallel-size",
    "gpu_memory_utilization": "--gpu-memory-utilization",
    "max_num_batched_tokens": "--max-num-batched-tokens",
    "max_num_seqs": "--max-num-seqs",
}


def engine_arguments(settings: dict[str, Any]) -> list[str]:
    """vLLM flags for the engine settings that are set (ENGINE_FLAGS' keys)."""
    args = []
    for key, flag in ENGINE_FLAGS.items():
        if settings.get(key) is not None:
            args += [flag, str(settings[key])]
    return args


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _figures(figures: dict[str, Any], prefix: str = "") -> list[str]:
    found = []
    for key, value in figures.items():
        if key == "passed" or isinstance(value, list):
            continue
        if isinstance(value, dict):
            found += _figures(value, f"{prefix}{key}.")
        else:
            found.append(f"{prefix}{key}={value}")
    return found


def _check_line(name: str, check: Check) -> str:
    status = {True: "pass", False: "FAIL", None: "skipped"}[check.passed]
    shown = ([f"reason={check.reason}"] if check.reason else []) + _figures(check.figures())
    return f"  {name}: {status}" + (f" ({', '.join(shown)})" if shown else "")


def _scale_tuning(tuning: ScaleTuningInfo | None) -> str:
    if tuning is None:
        return ""
    kl = f", KL {tuning.kl_first} -> {tuning.kl_last}" if tuning.kl_first is not None else ""
    return (
        f"; scales tuned toward the merged model ({tuning.epochs:g} epochs, {tuning.steps} "
        f"steps{kl}, largest change {tuning.largest_change:.1%})"
    )


def show(bundle_dir: Path) -> str:
    m = read_bundle(Path(bundle_dir))
    q, cal = m.quantization, m.quantization.calibration
    calibrated = (
        f", calibrated on {cal.samples} conversations ({cal.tokens} tokens, seed {cal.seed}"
        + "".join(f"; {name} {n}" for name, n in cal.datasets.items())
        + ")"
        if cal
        else ""
    )
    lines = [
        f"bundle {m.name} (created {m.created}, tuneship {m.tuneship_version})",
        f"served model name: {m.served_model_name}",
        f"base: {m.base.ref} ({m.base.path})",
        f"run: {m.run.name} ({m.run.path}), run.json sha256 {(m.run.run_json_sha256 or '')[:12]}",
        f"merge: into the {m.merge.into} in {m.merge.dtype}",
        f"quantization: {q.scheme} {q.algorithm} via {q.engine}, group size {q.group_size}, "
        + (f"ranges by {q.observer}, " if q.observer else "")
        + f"ignored {', '.join(q.ignore)}{calibrated}"
        + _scale_tuning(q.scale_tuning),
        f"layout: {m.layout}" + (f", adapters {', '.join(m.adapters)}" if m.adapters else ""),
        f"size: {_mb(m.sizes.model_bytes)} (merged 16-bit {_mb(m.sizes.merged_bytes or 0)}), "
        f"{len(m.files)} files",
        "checks:",
        *(_check_line(n, c) for n, c in m.checks.items()),
        "versions: " + ", ".join(f"{k} {v}" for k, v in m.versions.items()),
    ]
    return "\n".join(lines)
