"""The training data, tokenized once per run start and shared by the ranks.

Loading, mixing and tokenizing millions of conversations takes minutes; under torchrun every
rank did it at once, on the same files. Rank 0 now does it, and writes the result to the run's
work folder under a hash of everything it depends on (settings, data files, tokenizer); the
other ranks compute the same hash and read that file. A rank that does not find it (a work
folder not shared by every node, or inputs that differ there) tokenizes for itself, and says so.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

from tuneship.config.schema import TrainConfig
from tuneship.infra.fsutil import sha256_file, sha256_text

from .checkpoints import RUNTIME_KEYS

PREFIX = "tokenized-"


def cache_key(cfg: TrainConfig, tokenizer: Any) -> str:
    """A hash of what the tokenized rows depend on."""
    files = cfg.data_paths + ([cfg.eval_data] if cfg.eval_data else [])
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab())
    inputs = {
        "config": {k: v for k, v in cfg.model_dump(mode="json").items() if k not in RUNTIME_KEYS},
        "data": {path: sha256_file(Path(path)) for path in files},
        "tokenizer": sha256_text(vocabulary),
        "template": tokenizer.chat_template,
        "specials": [tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token],
    }
    return sha256_text(json.dumps(inputs, sort_keys=True, default=str))[:20]


def cache_path(work: Path, key: str) -> Path:
    return work / f"{PREFIX}{key}.pkl"


def write(work: Path, key: str, prepared: Any) -> Path:
    """Write atomically (a rank never reads half a file); drop other starts' files."""
    work.mkdir(parents=True, exist_ok=True)
    path = cache_path(work, key)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        pickle.dump(prepared, fh, protocol=pickle.HIGHEST_PROTOCOL)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    for old in work.glob(f"{PREFIX}*.pkl"):
        if old != path:
            old.unlink(missing_ok=True)
    return path


def read(work: Path, key: str) -> Any | None:
    """What rank 0 wrote for this key, or None. (Pickle: the file is this run's own, written
    by its rank 0 into its work folder, as its checkpoints are.)"""
    path = cache_path(work, key)
    if not path.is_file():
        return None
    with open(path, "rb") as fh:
        return pickle.load(fh)
