"""Containers and manifests, checked without a Docker engine or a cluster: hadolint, kustomize
rendering with strict Kubernetes schema validation, and the promises the README makes."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support import REPO, render_overlay

LINT = REPO / ".venv" / "lint" / "bin"
pytestmark = pytest.mark.deploy


def hadolint(*files: Path) -> subprocess.CompletedProcess:
    argv = [str(LINT / "hadolint"), "--format", "json", *map(str, files)]
    return subprocess.run(argv, capture_output=True, text=True, cwd=REPO)


def check_k8s(k8s: Path) -> list[dict]:
    argv = [str(LINT / "python"), str(REPO / "scripts/check_k8s.py"), "--json", "--k8s", str(k8s)]
    return json.loads(subprocess.run(argv, capture_output=True, text=True).stdout)


def test_dockerfiles_pass_hadolint_and_hadolint_does_look(tmp_path):
    done = hadolint(REPO / "Dockerfile.train", REPO / "Dockerfile.serve")
    assert done.returncode == 0 and json.loads(done.stdout) == []
    sloppy = tmp_path / "Dockerfile"
    sloppy.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y curl\n")
    found = {finding["code"] for finding in json.loads(hadolint(sloppy).stdout)}
    assert {"DL3006", "DL3008"} <= found  # untagged base, unpinned apt packages


def test_every_overlay_renders_and_validates(tmp_path):
    reports = {r["overlay"]: r for r in check_k8s(REPO / "k8s")}
    assert set(reports) == {"gpu", "cpu", "gpu-70b-tp4", "examples"}
    assert reports["examples"]["objects"] == ["PyTorchJob/tuneship-train-70b"]
    for report in (reports["gpu"], reports["cpu"]):
        assert {"Deployment/tuneship-serve", "Service/tuneship-serve", "Job/tuneship-train",
                "HorizontalPodAutoscaler/tuneship-serve", "PodDisruptionBudget/tuneship-serve",
                "NetworkPolicy/tuneship-serve", "ConfigMap/tuneship-grafana-dashboard",
                } <= set(report["objects"])  # fmt: skip
    assert "Job/tuneship-train-8gpu" in reports["gpu"]["objects"]
    assert "Deployment/tuneship-serve" in reports["gpu-70b-tp4"]["objects"]
    assert not any(o.startswith("Job/") for o in reports["gpu-70b-tp4"]["objects"])
    for report in reports.values():
        assert report["problems"] == [] and report["not_schema_checked"] == []


SCRAPE_TOKEN = (REPO / "k8s/base/servicemonitor.yaml").read_text().partition("      authorization:")
SCRAPE_TOKEN = SCRAPE_TOKEN[1] + SCRAPE_TOKEN[2]  # the ServiceMonitor's token, to the end


@pytest.mark.parametrize(
    ("file", "old", "new", "problem"),
    [
        ("base/serve-deployment.yaml", "path: /ready", "path: /health", "probes should be"),
        ("base/serve-deployment.yaml", "readOnlyRootFilesystem: true",
         "readOnlyRootFilesystem: false", "root filesystem is writable"),
        ("base/serve-deployment.yaml", "terminationGracePeriodSeconds: 90",
         "terminationGracePeriodSeconds: 40", "terminationGracePeriodSeconds 40 <= preStop"),
        ("base/serve-deployment.yaml", 'TUNESHIP_STOP_TIMEOUT\n              value: "15"',
         'TUNESHIP_STOP_TIMEOUT\n              value: "30"',
         "terminationGracePeriodSeconds 90 <= preStop 5 + drain 60 + vLLM stop 30"),
        ("overlays/gpu/bundle.yaml", "subPath: bundles/handbook/v1", "subPath: bundles/handbook",
         "is not a versioned bundle folder"),
        ("overlays/cpu/bundle.yaml", "value: \"0000", "value: \"zz00",
         "TUNESHIP_BUNDLE_SHA256 does not pin"),
        ("base/serve-deployment.yaml", "claimName: tuneship-models\n            readOnly: true",
         "claimName: tuneship-models", "volume bundle is not mounted read-only"),
        ("base/servicemonitor.yaml", SCRAPE_TOKEN, "", "the endpoint sends no token"),
        ("overlays/gpu-70b-tp4/serve-70b.yaml", "failureThreshold: 150", "failureThreshold: 60",
         "startupProbe allows 600 s < 2 x (185 s hashing + 420 s loading)"),
        ("overlays/cpu/bundle.yaml", "    tuneship.io/load-seconds: \"30\"\n", "",
         "annotate tuneship.io/bundle-bytes and tuneship.io/load-seconds"),
        ("base/serve-service.yaml", "targetPort: http", "targetPort: http\n      nodePortt: 1",
         "Additional properties are not allowed ('nodePortt'"),
        ("base/train-job.yaml", "  backoffLimit: 6\n", "", "needs backoffLimit"),
        ("base/prometheusrule.yaml", "for: 10m", "for: 10", "/for must be string"),
        ("examples/pytorchjob-multinode.yaml", "restartPolicy: ExitCode",
         "restartPolicy: OnFail", "restartPolicy 'OnFail'"),
        ("examples/pytorchjob-multinode.yaml", '["tuneship-torchrun",', '["torchrun",',
         "use tuneship-torchrun"),
        ("overlays/gpu/train-job-8gpu.yaml", 'value: "150"', 'value: "200"',
         "TORCH_ELASTIC_SHUTDOWN_TIMEOUT 200 >= terminationGracePeriodSeconds 180"),
        ("examples/pytorchjob-multinode.yaml", "mountPath: /tmp}", "mountPath: /tmp, ro: 1}",
         "Additional properties are not allowed ('ro'"),
        ("examples/pytorchjob-multinode.yaml", 'nprocPerNode: "8"', 'nprocsPerNode: "8"',
         "unknown field nprocsPerNode (of KubeflowOrgV1PyTorchJobSpec)"),
        ("examples/pytorchjob-multinode.yaml", "backoffLimit: 6", "backoffLimit: six",
         "runPolicy/backoffLimit: 'six' is not int"),
    ],
)  # fmt: skip
def test_a_broken_manifest_is_named(tmp_path, file, old, new, problem):
    k8s = tmp_path / "k8s"
    shutil.copytree(REPO / "k8s", k8s)
    text = (k8s / file).read_text()
    assert old in text
    (k8s / file).write_text(text.replace(old, new))
    problems = [p for r in check_k8s(k8s) for p in r["problems"]]
    assert problems and all(problem in p for p in problems), problems


def test_the_70b_overlay_spreads_one_engine_over_four_gpus():
    docs = render_overlay("gpu-70b-tp4")
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TUNESHIP_TENSOR_PARALLEL_SIZE"] == "4"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    dshm = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "dshm")
    assert dshm["emptyDir"]["sizeLimit"] == "32Gi"


def test_dashboard_config_map_carries_the_dashboard_file():
    docs = render_overlay("gpu")
    config_map = next(d for d in docs if d["metadata"]["name"] == "tuneship-grafana-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["grafana-dashboard.json"]) == json.loads(
        (REPO / "k8s/base/grafana-dashboard.json").read_text()
    )


def test_checkov_passes_with_only_the_written_skips_and_catches_a_regression(tmp_path):
    def checkov(k8s: Path) -> subprocess.CompletedProcess:
        argv = [str(LINT / "python"), str(REPO / "scripts/check_k8s.py"), "--checkov"]
        return subprocess.run([*argv, "--k8s", str(k8s)], capture_output=True, text=True)

    clean = checkov(REPO / "k8s")
    assert clean.returncode == 0 and "checkov: 0 failed checks" in clean.stdout
    k8s = tmp_path / "k8s"
    shutil.copytree(REPO / "k8s", k8s)
    deployment = k8s / "base/serve-deployment.yaml"
    deployment.write_text(
        deployment.read_text().replace(
            "      automountServiceAccountToken: false\n",
            "      automountServiceAccountToken: false\n      hostNetwork: true\n",
        )
    )
    broken = checkov(k8s)
    assert broken.returncode == 1 and "CKV_K8S_19" in broken.stdout


@pytest.mark.parametrize("dockerfile", ["Dockerfile.train", "Dockerfile.serve"])
def test_images_copy_every_package_folder_the_wheel_is_built_from(dockerfile):
    import tomllib

    folders = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"
    ].values())  # fmt: skip
    copied = {
        line.split()[1]
        for line in (REPO / dockerfile).read_text().splitlines()
        if line.startswith("COPY ") and not line.startswith("COPY --")
    }
    assert folders <= copied, f"{dockerfile} does not copy {sorted(folders - copied)}"
