"""`make lint`'s type checker: mypy over the core and the stages as the one package they install
as (the stage folders at the top of the repository are tuneship.train, tuneship.export,
tuneship.serve and tuneship.eval, a mapping mypy cannot follow through an editable install).

A tree of links in .venv/typecheck/tuneship puts each folder where its package name says, mypy
checks `-p tuneship` there with pyproject.toml's settings, and the paths it reports are turned
back into the repository's own.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("train", "export", "serve", "eval")


def main() -> int:
    tree = REPO / ".venv" / "typecheck"
    shutil.rmtree(tree, ignore_errors=True)
    package = tree / "tuneship"
    package.mkdir(parents=True)
    for entry in (REPO / "tuneship").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    for stage in STAGES:
        (package / stage).symlink_to(REPO / stage)
    argv = [sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml")]
    done = subprocess.run([*argv, "-p", "tuneship"], cwd=tree, capture_output=True, text=True)
    for line in (done.stdout + done.stderr).splitlines():
        for stage in STAGES:
            line = line.replace(f"tuneship/{stage}/", f"{stage}/")
        print(line)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
