"""Where tuneship keeps things it fetches (TUNESHIP_HOME, default ~/.cache/tuneship)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_BASE_NAME = "SmolLM2-135M-Instruct"
DEFAULT_BASE_ALIAS = "default"


def home() -> Path:
    return Path(os.environ.get("TUNESHIP_HOME", Path.home() / ".cache" / "tuneship"))


def default_base_dir() -> Path:
    return home() / "base" / DEFAULT_BASE_NAME
