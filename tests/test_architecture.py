"""The codebase's shape: stages stand alone; manifests written by another tuneship still load."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError

from tests.support import REPO
from tuneship.config.schema import ExportConfig, TrainConfig
from tuneship.export.run import run as export
from tuneship.handoff.manifest import read_bundle, read_run

STAGES = ("train", "export", "serve", "eval")


def imported_modules(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file of `package`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.append((node.lineno, base))
    return found


def cross_stage_imports() -> list[str]:
    found = []
    for stage in STAGES:
        for path in sorted((REPO / stage).rglob("*.py")):
            for line, module in imported_modules(path, f"tuneship.{stage}"):
                for other in STAGES:
                    target = f"tuneship.{other}"
                    if other != stage and (module == target or module.startswith(target + ".")):
                        found.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    return found


def test_no_stage_imports_another_stage():
    """What two stages share lives in the core (tuneship/); run.json and bundle.json are the
    only hand-off between them."""
    assert cross_stage_imports() == []


def test_the_rule_catches_a_cross_stage_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from ..export import checks\nfrom tuneship.train.data import prepare\n")
    assert [m for _, m in imported_modules(module, "tuneship.eval")] == [
        "tuneship.export",
        "tuneship.train.data",
    ]


def is_stage(module: str) -> bool:
    """tuneship.serve and tuneship.serve.run are a stage; a core module whose name merely
    starts with a stage's (tuneship.serverlog) is not."""
    return any(module == f"tuneship.{s}" or module.startswith(f"tuneship.{s}.") for s in STAGES)


def core_modules() -> list[tuple[Path, str]]:
    """Every core file with the package it is in (tuneship, tuneship.handoff, ...)."""
    found = []
    for path in sorted((REPO / "tuneship").rglob("*.py")):
        folder = path.parent.relative_to(REPO).as_posix().replace("/", ".")
        found.append((path, folder))
    return found


def test_the_core_imports_no_stage():
    assert is_stage("tuneship.serve.run") and not is_stage("tuneship.serverlog")
    assert len(core_modules()) > 25  # the subpackages are scanned too
    for path, package in core_modules():
        for line, module in imported_modules(path, package):
            assert not is_stage(module) or (
                path.name == "cli.py"  # the CLI imports a stage when its command runs
            ), f"{path.relative_to(REPO)}:{line} imports {module}"


def test_no_module_name_is_used_twice():
    """A name says where to look: no two modules of the core and the stages share one (the
    stages' entry points are all run.py on purpose: `run(cfg, out_dir)` in each)."""
    seen: dict[str, list[str]] = {}
    for folder in ("tuneship", *STAGES):
        for path in (REPO / folder).rglob("*.py"):
            if path.name not in ("__init__.py", "__main__.py", "run.py"):
                seen.setdefault(path.stem, []).append(path.relative_to(REPO).as_posix())
    assert {name: paths for name, paths in seen.items() if len(paths) > 1} == {}


def test_the_core_subpackages_import_nothing_when_imported():
    """Their __init__ files are empty, so `tuneship --help` and the serve middleware load only
    the modules they name (the always-imported part imports neither torch nor vLLM)."""
    for init in (REPO / "tuneship").glob("*/__init__.py"):
        tree = ast.parse(init.read_text(encoding="utf-8"))
        assert not [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)], init


def test_a_run_written_by_an_older_tuneship_still_exports(tmp_path, tiny_run, capsys):
    """An older run.json: datasets without a role, examples without the mix, metrics with a
    figure since dropped, a config with keys this tuneship no longer has and data as plain
    paths. The machine-specific parts (paths, hashes) come from a run made here."""
    old = json.loads((REPO / "tests" / "data" / "run-older.json").read_text())
    here = json.loads((tiny_run / "run.json").read_text())
    data = here["datasets"][0]
    old["base"] |= {"path": here["base"]["path"], "weights_sha256": here["base"]["weights_sha256"]}
    old["datasets"][0] |= {"path": data["path"], "sha256": data["sha256"]}
    old["config"]["data"] = [data["path"]]
    old["adapter"] = here["adapter"]
    with pytest.raises(ValidationError, match="packing"):  # what export did before
        TrainConfig.model_validate(old["config"])
    run_dir = tmp_path / "older"
    shutil.copytree(tiny_run, run_dir)
    (run_dir / "run.json").write_text(json.dumps(old))

    manifest = read_run(run_dir)
    assert manifest.datasets[0].role == "train" and manifest.metrics.best is None
    assert "metrics.samples_per_s" in capsys.readouterr().err  # reported, not refused
    out = export(run_dir, tmp_path / "bundle", ExportConfig(calibration_samples=2, checks=False))
    bundle = read_bundle(out)
    assert bundle.run.name == "older" and bundle.quantization.calibration.samples == 2


def test_a_manifest_from_a_newer_tuneship_is_refused(tmp_path, tiny_run):
    run_dir = tmp_path / "newer"
    shutil.copytree(tiny_run, run_dir)
    manifest = json.loads((run_dir / "run.json").read_text()) | {"schema_version": 2}
    (run_dir / "run.json").write_text(json.dumps(manifest))
    with pytest.raises(Exception, match="schema_version 2, newer than this tuneship"):
        read_run(run_dir)
