"""`make images` (scripts/docker/images.sh) when a build cannot finish: it says why. A fake docker
CLI stands in for the engine here (the real builds are in test_containers.py), so these run
everywhere."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.support import REPO

FAKE_DOCKER = """#!/bin/bash
case "$1 $2" in
  "info -f") [ "$3" = '{{.Driver}}' ] && echo vfs || echo {root} ;;
  "build "*) echo "#1 [internal] load build definition"
             echo "ERROR: failed to copy files: write /var/lib/docker/vfs: no space left on device"
             exit 1 ;;
  *) exit 0 ;;
esac
"""


def images_sh(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    fake = tmp_path / "docker"
    fake.write_text(FAKE_DOCKER.replace("{root}", str(tmp_path)))
    fake.chmod(0o755)
    settings = {**os.environ, "DOCKER": str(fake), "WHEELS": str(tmp_path / "no-wheels"), **env}
    return subprocess.run(
        [str(REPO / "scripts/docker/images.sh")], cwd=REPO, env=settings,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_a_failed_build_prints_the_builds_own_error(tmp_path):
    done = images_sh(tmp_path, BUILD_FREE_GB="0")
    assert done.returncode == 1
    # the error is the build's last lines, which the progress filter on stdout leaves out
    assert "no space left on device" in done.stderr
    assert "building tuneship-serve:cpu failed (whole log:" in done.stderr
    assert "built tuneship-serve:cpu" not in done.stdout


def test_too_little_disk_for_the_builds_is_refused_before_building(tmp_path):
    done = images_sh(tmp_path, BUILD_FREE_GB="100000")
    assert done.returncode == 1
    assert f"need about 100000 GB free under {tmp_path} (vfs storage)" in done.stderr
    assert "BUILD_FREE_GB" in done.stderr
    assert "building" not in done.stdout
