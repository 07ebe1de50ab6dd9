"""Both images, built with `make images` and run the way users run them: the train container
trains and exports on mounted volumes, the serve image checks the bundle (`tuneship bundle
check`) and serves it as Kubernetes runs it (non-root, read-only root filesystem, no
capabilities, the bundle mounted read-only, keys from a mounted Secret-like file), an OpenAI SDK
client gets answers, and `docker stop` drains it and exits 0.

The one-off commands share one container per image (`docker exec` through the image's
entrypoint): with vfs storage each new container copies the whole image first.

Needs a Docker engine: `.ci/run` installs and starts one (scripts/docker/engine.sh); elsewhere
these tests are skipped, saying so. Set TUNESHIP_CONTAINER_TIMINGS=FILE to keep the timings.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.request_mix import send_the_request_mix
from tests.support import REPO, render_overlay
from tuneship.infra.fsutil import make_readable, sha256_file
from tuneship.infra.launch import free_port
from tuneship.infra.paths import default_base_dir

DOCKER = shutil.which("/usr/bin/docker") or shutil.which("docker") or "docker"
SERVE, TRAIN = "tuneship-serve:cpu", "tuneship-train:cpu"
USER = "10001:10001"
KEY = "sk-container-test"


def engine_answers() -> bool:
    try:
        return subprocess.run([DOCKER, "info"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = [
    pytest.mark.e2e,
    pytest.mark.docker,
    pytest.mark.skipif(not engine_answers(), reason="no Docker engine answers `docker info`"),
]


def docker(*args: str, check: bool = True, timeout: float = 1800) -> subprocess.CompletedProcess:
    done = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, f"docker {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def timings():
    found: dict[str, float] = {}
    yield found
    if os.environ.get("TUNESHIP_CONTAINER_TIMINGS"):
        Path(os.environ["TUNESHIP_CONTAINER_TIMINGS"]).write_text(json.dumps(found, indent=2))


@pytest.fixture(scope="module")
def images(timings) -> None:
    """`make images` (its build cache makes a second build quick)."""
    started = time.monotonic()
    done = subprocess.run(
        [str(REPO / "scripts/docker/images.sh")], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    timings["make images (s)"] = round(time.monotonic() - started, 1)
    for image in (SERVE, TRAIN):
        size = int(docker("image", "inspect", "-f", "{{.Size}}", image).stdout)
        timings[f"{image} size (GB)"] = round(size / 1e9, 2)


@pytest.fixture(scope="module")
def volumes(default_base) -> dict[str, Path]:
    """/data (the demo data), /models (the fetched default base) and /output, writable by the
    images' user, in a folder other users can reach, as a node's volumes are."""
    root = Path(tempfile.mkdtemp(prefix="tuneship-containers-"))
    root.chmod(0o755)
    shutil.copytree(REPO / "data" / "demo", root / "data")
    shutil.copytree(default_base, root / "models" / "tuneship" / "base" / default_base.name)
    make_readable(root / "models")  # a base fetched by an older tuneship may be private (0600)
    (root / "output").mkdir(mode=0o777)
    (root / "output").chmod(0o777)  # the images' user (uid 10001) writes there
    yield {
        "root": root,
        "data": root / "data",
        "models": root / "models",
        "output": root / "output",
    }
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def default_base() -> Path:
    """The default base, fetched on the host (the images reach no hub either)."""
    from tuneship.train.base import fetch

    return fetch(default_base_dir())


def mounts(volumes: dict[str, Path]) -> list[str]:
    return [
        "-v", f"{volumes['data']}:/data:ro", "-v", f"{volumes['models']}:/models:ro",
        "-v", f"{volumes['output']}:/output",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def train_box(images, volumes):
    """One train container the train image's commands run in, one after another. With vfs
    storage every `docker run` copies the whole image first (1.5 to 2 minutes on 2 cores), so
    the commands that need no container of their own share this one (`docker exec`), each
    through the image's entrypoint as `docker run IMAGE ARGS` would run it."""
    yield from box(TRAIN, volumes)


@pytest.fixture(scope="module")
def serve_box(images, volumes):
    """The same for the serve image's one-off commands (`bundle check`, the secret scan); the
    servers themselves get containers of their own, set up as Kubernetes runs them."""
    yield from box(SERVE, volumes, "--shm-size", "1g")  # as the check Job's memory /dev/shm


def box(image: str, volumes: dict[str, Path], *options: str):
    name = f"tuneship-box-{image.split(':')[0]}-{os.getpid()}"
    docker("run", "-d", "--name", name, "--user", USER, *mounts(volumes), *options,
           "--entrypoint", "sleep", image, "infinity")  # fmt: skip
    try:
        yield name
    finally:
        docker("rm", "-f", name, check=False)


def run_in(box: str, image: str, *args: str, entrypoint: tuple[str, ...] | None = None,
           user: str | None = None) -> subprocess.CompletedProcess:  # fmt: skip
    """`docker run IMAGE ARGS` in a box: the image's entrypoint (or `entrypoint`) and args."""
    if entrypoint is None:
        found = docker("image", "inspect", "-f", "{{json .Config.Entrypoint}}", image).stdout
        entrypoint = tuple(json.loads(found))
    return docker("exec", *(["--user", user] if user else []), box, *entrypoint, *args)


def test_no_ca_bundle_or_secret_ends_up_in_an_image(train_box, serve_box):
    """The build's CA bundle and index URL came as BuildKit secrets: not in the history, not in
    a layer's files. The build machine's own CA certificates (lines of PIP_CERT that Debian's
    bundle in the image lacks) are looked for everywhere they could have been copied (before
    any other test has run a command in these containers)."""
    cert = os.environ.get("PIP_CERT")
    image_bundle = run_in(serve_box, SERVE, "/etc/ssl/certs/ca-certificates.crt",
                          entrypoint=("cat",)).stdout  # fmt: skip
    own = []
    if cert and Path(cert).is_file():
        own = [
            line
            for line in Path(cert).read_text().splitlines()
            if len(line) == 64 and line not in image_bundle and not line.startswith("-----")
        ][:3]
    for image, name in ((SERVE, serve_box), (TRAIN, train_box)):
        history = docker("history", "--no-trunc", image).stdout
        assert not cert or cert not in history
        patterns = " ".join(f"-e {line}" for line in own) or "-e no-such-line"
        script = (
            "ls -A /run/secrets 2>/dev/null; "
            f"grep -rlF {patterns} /etc /opt /home /root /tmp /usr/local /app 2>/dev/null; true"
        )
        found = run_in(name, image, "-c", script, entrypoint=("sh",), user="0")
        assert found.stdout.strip() == "", f"{image}: secrets or the build CA in {found.stdout}"


def test_the_cpu_jobs_arguments_run_in_the_train_image(train_box):
    """The CPU overlay's training Job, its arguments as Kubernetes passes them, as a dry run."""
    job = rendered("cpu", "Job", "tuneship-train")["spec"]["template"]["spec"]["containers"][0]
    done = run_in(train_box, TRAIN, *job["args"], "--dry-run")
    report = yaml.safe_load(done.stdout)
    assert report["config"]["output_dir"] == "/output/runs"
    demo = [
        REPO / "data/demo" / f for f in ("train.jsonl", "tool_train.jsonl", "general_replay.jsonl")
    ]
    conversations = sum(len(f.read_text().splitlines()) for f in demo)  # no duplicates there
    assert report["data"]["used"] == conversations and report["data"]["eval"]["used"] == 114


def test_the_whole_path_in_containers(train_box, serve_box, volumes, timings):
    # train on the mounted data, a few steps
    started = time.monotonic()
    run_in(
        train_box, TRAIN, "train", "--config", "/app/configs/demo.yaml",
        "--set", "data=[/data/train.jsonl]", "--set", "eval_data=/data/validation.jsonl",
        "--set", "limit=48", "--set", "max_steps=4", "--set", "eval_steps=2",
        "--set", "warmup_steps=0", "--set", "output_dir=/output/runs", "--set", "name=c",
    )  # fmt: skip
    timings["train, 4 steps (s)"] = round(time.monotonic() - started, 1)

    # export in the train image: no vLLM there, so the vLLM checks are recorded for later
    started = time.monotonic()
    export = run_in(
        train_box, TRAIN, "export", "/output/runs/c", "--out", "/output/bundles/c",
        "--set", "calibration_samples=8", "--set", "eval_data=/data/heldout.jsonl",
        "--set", "check_samples=12", "--set", "min_stop_rate=0.5",
        "--set", "max_perplexity_ratio=2.0", "--set", "max_recall_drop=100",
    )  # fmt: skip
    timings["export (s)"] = round(time.monotonic() - started, 1)
    assert "recorded for `tuneship bundle check`" in export.stdout
    bundle = volumes["output"] / "bundles" / "c"
    assert json.loads((bundle / "bundle.json").read_text())["check_plan"]["prompts"]

    # serving refuses it until the serve image has checked it
    refused = serve_container(bundle, volumes)
    assert wait_exit(refused) != 0
    assert "checks not run yet" in docker("logs", refused, check=False).stderr
    docker("rm", "-f", refused, check=False)
    started = time.monotonic()
    checked = run_in(serve_box, SERVE, "bundle", "check", "/output/bundles/c",
                     entrypoint=("tuneship",))  # fmt: skip
    timings["bundle check (s)"] = round(time.monotonic() - started, 1)
    assert "checked" in checked.stdout
    assert json.loads((bundle / "checks.json").read_text())["checks"]["template_parity"]["passed"]

    # serve it as Kubernetes runs it
    port = free_port()
    started = time.monotonic()
    name = serve_container(bundle, volumes, port=port)
    try:
        wait_ready(name, port)
        timings["serve start-up to ready (s)"] = round(time.monotonic() - started, 1)
        ask_with_the_openai_sdk(port)
        started = time.monotonic()
        send_the_request_mix(f"http://127.0.0.1:{port}", KEY)  # the host server gets it too
        timings["request mix (s)"] = round(time.monotonic() - started, 1)
        started = time.monotonic()
        docker("stop", "-t", "60", name)
        timings["docker stop (s)"] = round(time.monotonic() - started, 1)
        state = json.loads(docker("inspect", name).stdout)[0]["State"]
        assert state["ExitCode"] == 0, docker("logs", name, check=False).stderr[-3000:]
        logs = docker("logs", name).stdout
        assert '"event": "drained"' in logs or '"event": "sigterm"' in logs
    finally:
        docker("rm", "-f", name, check=False)


def serve_container(bundle: Path, volumes: dict, port: int | None = None) -> str:
    """The serve image started as the CPU overlay's Deployment runs it: its arguments and
    environment, non-root, read-only root filesystem, no capabilities, the bundle read-only,
    the keys file where the Secret is mounted. Returns the container's name."""
    spec = rendered("cpu", "Deployment", "tuneship-serve")["spec"]["template"]["spec"]
    container = spec["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    env["TUNESHIP_BUNDLE_SHA256"] = sha256_file(bundle / "bundle.json")  # as bundle.yaml pins it
    keys_file = Path(env["TUNESHIP_API_KEYS_FILE"])
    secret = volumes["root"] / "secret"
    secret.mkdir(exist_ok=True)
    (secret / keys_file.name).write_text(f"{KEY}\n")
    (secret / keys_file.name).chmod(0o444)
    user = f"{spec['securityContext']['runAsUser']}:{spec['securityContext']['runAsGroup']}"
    assert container["securityContext"]["readOnlyRootFilesystem"]
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    name = f"tuneship-serve-test-{os.getpid()}-{time.monotonic_ns()}"
    argv = ["run", "-d", "--name", name, "--user", user, "--read-only", "--cap-drop", "ALL"]
    argv += ["--security-opt", "no-new-privileges", "--tmpfs", "/tmp", "--tmpfs", "/home/tuneship"]
    argv += ["--shm-size", "1g", "-v", f"{bundle}:/models/bundle:ro"]
    argv += ["-v", f"{secret}:{keys_file.parent}:ro"]
    argv += [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]
    argv += ["-p", f"127.0.0.1:{port}:{container['ports'][0]['containerPort']}"] if port else []
    docker(*argv, SERVE, *container["args"])
    return name


def rendered(overlay: str, kind: str, name: str) -> dict:
    docs = render_overlay(overlay)
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def wait_exit(name: str, timeout_s: float = 120) -> int:
    return int(docker("wait", name, timeout=timeout_s).stdout.strip())


def wait_ready(name: str, port: int, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = json.loads(docker("inspect", name).stdout)[0]["State"]
        assert state["Running"], docker("logs", name, check=False).stderr[-3000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=3).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise AssertionError("the serve container was not ready in time")


def ask_with_the_openai_sdk(port: int) -> None:
    from openai import AuthenticationError, OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, timeout=120)
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=32, temperature=0,
    )  # fmt: skip
    assert reply.choices[0].message.content.strip() and reply.usage.completion_tokens > 0
    chunks = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=16,
        stream=True,
    )  # fmt: skip
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-wrong").models.list()
