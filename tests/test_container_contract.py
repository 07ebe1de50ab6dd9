"""The images' contracts, run locally (no Docker engine here): the exact entry commands,
environment variables, copied files, writable paths, port and probes that Dockerfile.train,
Dockerfile.serve and the Kubernetes manifests declare. Container paths are mapped under a
temporary root; the port is the only value replaced (8000 is taken on a shared machine)."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support import REPO, SERVE_BIN, TRAIN_BIN, render_overlay
from tuneship.launch import Server, free_port
from tuneship.paths import home as tuneship_home

pytestmark = pytest.mark.e2e


def final_stage(dockerfile: Path) -> dict:
    """ENV, WORKDIR, EXPOSE, COPY (from the build context), HEALTHCHECK, ENTRYPOINT and CMD of
    the last stage."""
    text = dockerfile.read_text().replace("\\\n", " ")
    stages: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("FROM "):
            stages.append([])
        elif stages and line and not line.startswith("#"):
            stages[-1].append(line)
    stage: dict = {"env": {}, "copy": [], "expose": []}
    for line in stages[-1] if "AS final" not in text else _merged_final(stages, text):
        word, _, rest = line.partition(" ")
        if word == "ENV":
            stage["env"] |= dict(pair.split("=", 1) for pair in shlex.split(rest))
        elif word == "COPY" and not rest.startswith("--from"):
            src, dst = rest.split()
            stage["copy"].append((src, dst))
        elif word in ("ENTRYPOINT", "CMD"):
            stage[word.lower()] = json.loads(rest)
        elif word == "HEALTHCHECK":
            stage["healthcheck"] = json.loads(rest[rest.index("CMD ") + 4 :])
        elif word == "WORKDIR":
            stage["workdir"] = rest
        elif word == "EXPOSE":
            stage["expose"].append(int(rest))
    return stage


def _merged_final(stages: list[list[str]], text: str) -> list[str]:
    """Dockerfile.serve ends with `FROM ${VARIANT} AS final`: the CPU variant's stage plus the
    final one is what the CPU image (the one testable here) runs."""
    froms = [line.split()[1:] for line in text.splitlines() if line.startswith("FROM ")]
    cpu = next(i for i, f in enumerate(froms) if f[-1] == "cpu")
    return stages[cpu] + stages[-1]


def mapped(value: str, root: Path) -> str:
    """A container path (or KEY=path, as in --set output_dir=/output/runs) under root."""
    key, sep, rest = value.partition("=")
    if sep and rest.startswith("/"):
        return f"{key}={root / rest.lstrip('/')}"
    return str(root / value.lstrip("/")) if value.startswith("/") else value


def rendered(overlay: str, kind: str, name: str) -> dict:
    docs = render_overlay(overlay)
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def test_train_image_entry_runs_the_cpu_job_as_a_dry_run(tmp_path, bundle):
    """bundle: the session fixture has fetched the default base into TUNESHIP_HOME."""
    stage = final_stage(REPO / "Dockerfile.train")
    root = tmp_path / "root"
    for src, dst in stage["copy"]:
        if (REPO / src).is_dir():
            shutil.copytree(REPO / src, root / dst.lstrip("/"))
    for volume in ("/data", "/output", "/tmp"):
        (root / volume.lstrip("/")).mkdir(parents=True, exist_ok=True)
    env = {k: mapped(v, root) for k, v in stage["env"].items()}
    models = Path(env["TUNESHIP_HOME"])
    models.parent.mkdir(parents=True, exist_ok=True)
    models.symlink_to(tuneship_home())  # the /models volume holds the fetched base
    job = rendered("cpu", "Job", "tuneship-train")["spec"]["template"]["spec"]["containers"][0]
    assert stage["entrypoint"] == ["tuneship"]
    argv = [str(TRAIN_BIN), *(mapped(a, root) for a in job["args"]), "--dry-run"]
    done = subprocess.run(
        argv, cwd=mapped(stage["workdir"], root), env=env | {"PATH": str(TRAIN_BIN.parent)},
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = yaml.safe_load(done.stdout)
    assert report["config"]["output_dir"] == str(root / "output/runs")
    demo = [REPO / "data/demo" / f for f in ("train.jsonl", "general_replay.jsonl")]
    conversations = sum(len(f.read_text().splitlines()) for f in demo)  # no duplicates there
    assert report["data"]["used"] == conversations and report["data"]["eval"]["used"] == 114


def test_serve_image_entry_env_port_and_probes_answer(tmp_path, bundle):
    stage = final_stage(REPO / "Dockerfile.serve")
    deployment = rendered("cpu", "Deployment", "tuneship-serve")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    root = tmp_path / "root"
    (root / "models").mkdir(parents=True)
    (root / "models/bundle").symlink_to(bundle)  # the PVC subPath mount
    for mount in container["volumeMounts"]:  # the emptyDirs: the only writable paths
        if mount["name"] in ("tmp", "home", "dshm"):
            (root / mount["mountPath"].lstrip("/")).mkdir(parents=True, exist_ok=True)
    env = {k: mapped(v, root) for k, v in stage["env"].items()}
    env |= {e["name"]: mapped(e["value"], root) for e in container["env"]}
    keys = Path(env["TUNESHIP_API_KEYS_FILE"])  # where the Secret is mounted
    keys.parent.mkdir(parents=True)
    keys.write_text("sk-contract\n")
    assert stage["entrypoint"] == ["tuneship", "serve", "/models/bundle"]
    assert stage["expose"] == [8000] and container["ports"][0]["containerPort"] == 8000
    port = free_port()
    args = [a if a != "8000" else str(port) for a in container["args"]]
    argv = [str(SERVE_BIN), "serve", mapped("/models/bundle", root), *args]
    env["PATH"] = str(SERVE_BIN.parent) + ":/usr/bin:/bin"
    with Server(argv, port, tmp_path / "serve.log", env=env) as server:
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            path = container[probe]["httpGet"]["path"]
            assert httpx.get(f"{server.base_url}{path}").status_code == 200, probe
        health = [p.replace("8000", str(port)) for p in stage["healthcheck"]]
        health[0] = str(SERVE_BIN.parent / health[0])
        assert subprocess.run(health, env=env).returncode == 0
        key = {"Authorization": "Bearer sk-contract"}
        assert httpx.get(f"{server.base_url}/v1/models", headers=key).status_code == 200
        assert httpx.get(f"{server.base_url}/v1/models").status_code == 401
