"""Stage manifests: runs/NAME/run.json and bundles/NAME/bundle.json.

Strict on read for the keys a later stage relies on, tolerant of unknown (newer) keys, which
are reported once as a warning. Written atomically.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from tuneship import __version__
from tuneship.errors import TuneshipError
from tuneship.fsutil import hash_tree, sha256_file, write_json_atomic

SCHEMA_VERSION = 1
RUN_FILE = "run.json"
BUNDLE_FILE = "bundle.json"


class _Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")

    schema_version: int
    kind: str
    name: str
    created: str
    tuneship_version: str


class RunManifest(_Manifest):
    base: dict[str, Any]
    datasets: list[dict[str, Any]]
    examples: dict[str, Any]
    config: dict[str, Any]
    versions: dict[str, str]
    device: dict[str, Any]
    metrics: dict[str, Any]
    adapter: dict[str, str]


class BundleManifest(_Manifest):
    served_model_name: str
    layout: str = "merged"  # "merged" (one quantized model) or "adapters" (base + LoRA adapters)
    config: dict[str, Any] = {}
    adapters: dict[str, Any] = {}
    run: dict[str, Any]
    base: dict[str, Any]
    merge: dict[str, Any]
    quantization: dict[str, Any]
    files: dict[str, str]
    merged_files: dict[str, str] = {}
    sizes: dict[str, int]
    checks: dict[str, Any]
    versions: dict[str, str]
    serving: dict[str, Any]


_warned: set[str] = set()


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def versions(*packages: str) -> dict[str, str]:
    found = {"python": sys.version.split()[0], "tuneship": __version__}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def header(kind: str, name: str) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "name": name,
        "created": now(),
        "tuneship_version": __version__,
    }


def _read(path: Path, model: type[_Manifest], what: str, hint: str) -> Any:
    if not path.is_file():
        raise TuneshipError(f"{path} not found: {hint}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        manifest = model.model_validate(data)
    except json.JSONDecodeError as exc:
        raise TuneshipError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    except ValidationError as exc:
        problems = "; ".join(f"'{'.'.join(map(str, e['loc']))}': {e['msg']}" for e in exc.errors())
        raise TuneshipError(f"{path} is not a valid {what}: {problems}") from None
    if manifest.schema_version > SCHEMA_VERSION:
        raise TuneshipError(
            f"{path} has schema_version {manifest.schema_version}, newer than this tuneship "
            f"understands ({SCHEMA_VERSION}); upgrade tuneship"
        )
    extra = sorted(manifest.model_extra or {})
    if extra and str(path) not in _warned:
        _warned.add(str(path))
        print(
            f"warning: {path} has keys this tuneship ignores: {', '.join(extra)}", file=sys.stderr
        )
    return manifest


def read_run(run_dir: Path) -> RunManifest:
    return _read(
        Path(run_dir) / RUN_FILE, RunManifest, "run manifest", "is this a `tuneship train` run?"
    )


def read_bundle(bundle_dir: Path) -> BundleManifest:
    return _read(
        Path(bundle_dir) / BUNDLE_FILE,
        BundleManifest,
        "bundle manifest",
        "is this a `tuneship export` bundle?",
    )


def write_manifest(path: Path, data: dict[str, Any]) -> str:
    write_json_atomic(path, data)
    return sha256_file(path)


def verify_files(root: Path, expected: dict[str, str]) -> list[str]:
    """Problems found re-hashing root against expected {relative path: sha256}."""
    problems = []
    actual = hash_tree(root) if root.is_dir() else {}
    for rel, digest in expected.items():
        if rel not in actual:
            problems.append(f"{root / rel}: missing")
        elif actual[rel] != digest:
            problems.append(f"{root / rel}: sha256 differs from the manifest (corrupted or edited)")
    problems.extend(
        f"{root / rel}: not listed in the manifest" for rel in actual.keys() - expected.keys()
    )
    return problems
